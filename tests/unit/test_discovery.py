"""Model discovery in the model directory: layouts, ids, unusable dirs with reasons, Catalog."""

from __future__ import annotations

import json
import struct
import logging
import os
from pathlib import Path

import pytest

from mlxrouter.discovery import Catalog, DiscoveredModel, Source, scan, scan_sources


def make_model(path: Path, *, config: dict | None = None, weights: bool = True,
               tokenizer: str | None = "tokenizer.json") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 8)
    if tokenizer:
        (path / tokenizer).write_text("{}")
    return path


def make_hf_repo(root: Path, org: str, name: str, revs: list[str], main: str | None) -> Path:
    repo = root / f"models--{org}--{name}"
    for rev in revs:
        make_model(repo / "snapshots" / rev)
    if main is not None:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(main + "\n")
    return repo


def age(path: Path, seconds_ago: float) -> None:
    """Set a path's mtime to a fixed time in the past (so the next change is always newer)."""
    t = 1_600_000_000 - seconds_ago
    os.utime(path, (t, t))


@pytest.fixture(autouse=True)
def seconds_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced rescans are rate-limited to one a second; let two seconds pass between calls."""
    import itertools
    import types

    import mlxrouter.discovery as discovery

    clock = itertools.count(1000, 2)
    monkeypatch.setattr(discovery, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))


def test_forced_rescans_are_rate_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import mlxrouter.discovery as discovery

    monkeypatch.setattr(discovery, "time", types.SimpleNamespace(monotonic=lambda: 5.0))
    scans = []
    monkeypatch.setattr(discovery, "scan", lambda root, *a: scans.append(root) or {})
    catalog = Catalog(tmp_path, {})
    for _ in range(50):
        assert not catalog.knows("no/such-model")
    assert len(scans) <= 2  # the first refresh plus at most one forced rescan


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_model(root / "plain-model")
    make_model(root / "mlx-community--Qwen-0.5B-4bit")
    make_model(root / "meta" / "Llama-3.2-1B")
    make_model(root / "meta" / "Llama-3.2-3B", tokenizer="tokenizer.model")
    (root / "meta" / "README.md").write_text("not a model")
    (root / "meta" / "notes").mkdir()

    # HF cache layout: refs/main picks the snapshot even when another one is newer.
    hf = make_hf_repo(root, "org", "with-ref", ["aaa111", "bbb222"], main="aaa111")
    age(hf / "snapshots" / "aaa111", 100)
    age(hf / "snapshots" / "bbb222", 10)
    # Without refs/main: the most recently modified snapshot.
    hf2 = make_hf_repo(root, "org", "no-ref", ["old", "new"], main=None)
    age(hf2 / "snapshots" / "old", 100)
    age(hf2 / "snapshots" / "new", 10)
    # refs/main naming a snapshot that is not there: fall back to the newest.
    make_hf_repo(root, "org", "stale-ref", ["only"], main="gone")
    # A repo dir with nothing downloaded yet.
    (root / "models--org--empty" / "blobs").mkdir(parents=True)

    make_model(root / "half-downloaded", weights=False)
    make_model(root / "no-tokenizer", tokenizer=None)
    make_model(root / "vision-model", config={"model_type": "qwen2_vl", "vision_config": {}})
    make_model(root / "tok-config-only", tokenizer="tokenizer_config.json")
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"")
    (root / "stray-file.safetensors").write_bytes(b"")
    (root / "notes.txt").write_text("hello")
    make_model(root / ".hidden-model")
    return root


def test_scan_finds_every_layout(tree: Path) -> None:
    found = scan(tree)
    assert set(found) == {
        "plain-model",
        "mlx-community/Qwen-0.5B-4bit",
        "meta/Llama-3.2-1B",
        "meta/Llama-3.2-3B",
        "org/with-ref",
        "org/no-ref",
        "org/stale-ref",
        "org/empty",
        "half-downloaded",
        "no-tokenizer",
        "vision-model",
        "tok-config-only",
        "no-config",  # weights without a config.json: listed, unusable, with the reason
    }
    for model_id, model in found.items():
        assert isinstance(model, DiscoveredModel)
        assert model.id == model_id


def test_scan_paths(tree: Path) -> None:
    found = scan(tree)
    assert found["plain-model"].path == str(tree / "plain-model")
    assert found["mlx-community/Qwen-0.5B-4bit"].path == str(tree / "mlx-community--Qwen-0.5B-4bit")
    assert found["meta/Llama-3.2-1B"].path == str(tree / "meta" / "Llama-3.2-1B")
    assert found["org/with-ref"].path == str(tree / "models--org--with-ref" / "snapshots" / "aaa111")
    assert found["org/no-ref"].path == str(tree / "models--org--no-ref" / "snapshots" / "new")
    assert found["org/stale-ref"].path == str(
        tree / "models--org--stale-ref" / "snapshots" / "only")


def test_scan_usable_flags_and_reasons(tree: Path) -> None:
    found = scan(tree)
    usable = {m.id for m in found.values() if m.usable}
    assert usable == {"plain-model", "mlx-community/Qwen-0.5B-4bit", "meta/Llama-3.2-1B",
                      "meta/Llama-3.2-3B", "org/with-ref", "org/no-ref", "org/stale-ref",
                      "vision-model", "tok-config-only"}
    for model in found.values():
        assert (model.reason == "") == model.usable
    assert "weights" in found["half-downloaded"].reason
    assert "tokenizer" in found["no-tokenizer"].reason
    assert "snapshot" in found["org/empty"].reason


def test_vision_comes_from_the_models_config(tree: Path) -> None:
    found = scan(tree)
    assert found["vision-model"].vision is True
    assert found["plain-model"].vision is False


def test_scan_of_missing_or_non_directory_root_is_empty(tmp_path: Path) -> None:
    assert scan(tmp_path / "nope") == {}
    (tmp_path / "file").write_text("x")
    assert scan(tmp_path / "file") == {}
    (tmp_path / "empty").mkdir()
    assert scan(tmp_path / "empty") == {}


def test_scan_survives_broken_entries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "models"
    make_model(root / "good")
    (root / "dangling").symlink_to(tmp_path / "does-not-exist")
    (root / "loop").symlink_to(root / "loop")
    bad_cfg = make_model(root / "bad-config")
    (bad_cfg / "config.json").write_text("{not json")
    snap_file = root / "models--org--snapfile"
    snap_file.mkdir()
    (snap_file / "snapshots").write_text("not a dir")
    with caplog.at_level(logging.WARNING):
        found = scan(root)
    assert found["good"].usable
    assert not found["bad-config"].usable  # listed with why, not offered to load and fail
    assert "not valid JSON" in found["bad-config"].reason
    assert not found["org/snapfile"].usable
    assert "dangling" not in found and "loop" not in found


def test_scan_skips_unreadable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "models"
    make_model(root / "good")
    make_model(root / "locked-org" / "m")
    real_iterdir = Path.iterdir

    def iterdir(self: Path):  # chmod 0 does not stop root, so fake the permission error
        if self.name == "locked-org":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with caplog.at_level(logging.WARNING, logger="mlxrouter.discovery"):
        found = scan(root)
    assert found["good"].usable
    assert "locked-org/m" not in found
    assert "locked-org" in caplog.text


def test_symlinked_model_dir_inside_the_roots_is_found(tmp_path: Path) -> None:
    root = tmp_path / "models"
    hf = tmp_path / "hf"
    target = make_model(hf / "real-model")
    make_model(root / "store" / "kept")
    (root / "linked-model").symlink_to(target)
    (root / "alias").symlink_to(root / "store" / "kept")
    found = scan_sources([Source("model_directory", root), Source("lmstudio", hf)])
    assert found["linked-model"].usable
    assert found["linked-model"].path == str(root / "linked-model")
    assert found["alias"].usable


def test_symlink_escaping_the_roots_is_unusable(tmp_path: Path) -> None:
    outside = make_model(tmp_path / "elsewhere" / "real-model")
    root = tmp_path / "models"
    root.mkdir()
    (root / "escaping").symlink_to(outside)
    inner = make_model(root / "file-escapes")
    (inner / "model.safetensors").unlink()
    (inner / "model.safetensors").symlink_to(outside / "model.safetensors")
    found = scan(root)
    assert not found["escaping"].usable
    assert "outside" in found["escaping"].reason
    assert not found["file-escapes"].usable
    assert "outside" in found["file-escapes"].reason


def test_empty_refs_main_falls_back_to_a_snapshot(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_hf_repo(root, "org", "m", ["abc"], main="")
    found = scan(root)
    assert found["org/m"].usable
    assert found["org/m"].path == str(root / "models--org--m" / "snapshots" / "abc")


def test_scan_never_raises_on_undecodable_refs_main(tmp_path: Path) -> None:
    root = tmp_path / "models"
    repo = make_hf_repo(root, "org", "m", ["abc"], main=None)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_bytes(b"\xff\xfe\x00garbage")
    try:
        found = scan(root)
    except Exception as exc:  # noqa: BLE001 - the point is that nothing escapes
        pytest.fail(f"scan raised {exc!r}")
    assert "org/m" in found


def test_a_dangling_weights_link_makes_the_model_unusable_not_the_scan_fail(
        tmp_path: Path) -> None:
    """A Hugging Face cache whose weights blob was deleted: the snapshot's link dangles."""
    from mlxrouter.memory import weights_bytes

    root = tmp_path / "models"
    repo = make_hf_repo(root, "dang", "ling", ["r1"], main="r1")
    snap = repo / "snapshots" / "r1"
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(repo / "blobs" / "gone")
    make_model(root / "fine")
    found = scan(root)
    assert found["fine"].usable
    assert not found["dang/ling"].usable
    assert "model.safetensors is missing or not a file" in found["dang/ling"].reason
    assert weights_bytes(snap) == 0
    catalog = Catalog(root, {})
    assert catalog.ids() == ["fine"] and catalog.info("dang/ling").reason


# ---- Catalog

def test_catalog_lists_configured_and_usable_discovered_ids(tree: Path) -> None:
    catalog = Catalog(tree, {"my/configured": "/somewhere/else", "plain-model": None})
    ids = catalog.ids()
    assert ids == sorted(ids)
    assert "my/configured" in ids
    assert "plain-model" in ids
    assert "mlx-community/Qwen-0.5B-4bit" in ids
    assert "org/with-ref" in ids
    # Unusable dirs are not offered as models.
    assert "half-downloaded" not in ids
    assert "org/empty" not in ids
    assert "no-config" not in ids


def test_catalog_knows_and_path_of(tree: Path) -> None:
    catalog = Catalog(tree, {"my/configured": "/somewhere/else"})
    assert catalog.knows("my/configured")
    assert catalog.path_of("my/configured") is None  # config.spec_for supplies that path
    assert catalog.knows("meta/Llama-3.2-1B")
    assert catalog.path_of("meta/Llama-3.2-1B") == str(tree / "meta" / "Llama-3.2-1B")
    assert catalog.path_of("org/no-ref") == str(tree / "models--org--no-ref" / "snapshots" / "new")
    assert not catalog.knows("half-downloaded")
    assert catalog.path_of("half-downloaded") is None
    assert not catalog.knows("nobody/has-this")
    assert catalog.path_of("nobody/has-this") is None


def test_catalog_with_missing_root(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "nope", {"cfg": None})
    assert catalog.ids() == ["cfg"]
    assert catalog.knows("cfg")
    assert not catalog.knows("other")


def test_catalog_picks_up_model_added_at_the_root(tree: Path) -> None:
    age(tree, 1000)
    catalog = Catalog(tree, {})
    assert "new-model" not in catalog.ids()
    make_model(tree / "new-model")
    assert "new-model" in catalog.ids()
    assert catalog.knows("new-model")


def test_catalog_picks_up_model_added_in_a_subdirectory(tree: Path) -> None:
    age(tree, 1000)
    catalog = Catalog(tree, {})
    assert "meta/Llama-New" not in catalog.ids()
    make_model(tree / "meta" / "Llama-New")
    # Root mtime is unchanged, but asking for the model by name finds it.
    assert catalog.path_of("meta/Llama-New") == str(tree / "meta" / "Llama-New")
    assert catalog.knows("meta/Llama-New")
    assert "meta/Llama-New" in catalog.ids()


def test_catalog_forgets_a_removed_model(tree: Path) -> None:
    age(tree, 1000)
    catalog = Catalog(tree, {})
    assert catalog.knows("plain-model")
    for f in (tree / "plain-model").iterdir():
        f.unlink()
    (tree / "plain-model").rmdir()
    assert "plain-model" not in catalog.ids()
    assert not catalog.knows("plain-model")


def test_catalog_finished_download_becomes_known(tree: Path) -> None:
    age(tree, 1000)
    catalog = Catalog(tree, {})
    assert not catalog.knows("half-downloaded")
    (tree / "half-downloaded" / "model.safetensors").write_bytes(b"\0")
    assert catalog.knows("half-downloaded")
    assert catalog.path_of("half-downloaded") == str(tree / "half-downloaded")


def test_catalog_ids_list_a_finished_download(tree: Path) -> None:
    age(tree, 1000)
    catalog = Catalog(tree, {})
    assert "half-downloaded" not in catalog.ids()
    (tree / "half-downloaded" / "model.safetensors").write_bytes(b"\0")
    assert "half-downloaded" in catalog.ids()


# ---- completeness, non-MLX checkpoints, metadata, sources


def safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A real safetensors file (header + zero data) with these (dtype, shape) tensors."""
    import struct

    sizes = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_sharded_weights_need_every_shard_in_the_index(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name, present in (("complete", 2), ("partial", 1)):
        m = make_model(root / name, weights=False)
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                                "b": "model-00002-of-00002.safetensors"}}
        (m / "model.safetensors.index.json").write_text(json.dumps(index))
        for i in range(1, present + 1):
            safetensors(m / f"model-0000{i}-of-00002.safetensors", {f"w{i}": ("F32", [2, 2])})
    found = scan(root)
    assert found["complete"].usable
    assert found["complete"].parameters == 8
    assert not found["partial"].usable
    assert "incomplete download" in found["partial"].reason
    assert "1 of 2" in found["partial"].reason


def test_non_mlx_checkpoints_are_unusable_with_the_reason(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_model(root / "torch", weights=False)
    (root / "torch" / "pytorch_model.bin").write_bytes(b"\0")
    (root / "lms" / "TheBloke").mkdir(parents=True)
    (root / "lms" / "TheBloke" / "model.Q4_K_M.gguf").write_bytes(b"GGUF")
    (root / "top-gguf").mkdir()  # a GGUF dir at the top, not inside an org dir
    (root / "top-gguf" / "smollm2.Q8_0.gguf").write_bytes(b"GGUF")
    found = scan(root)
    assert not found["torch"].usable and "PyTorch" in found["torch"].reason
    assert not found["lms/TheBloke"].usable and "GGUF" in found["lms/TheBloke"].reason
    assert not found["top-gguf"].usable and "import-gguf" in found["top-gguf"].reason
    (root / "no-config").mkdir()  # weights and a tokenizer, the config.json missing
    (root / "no-config" / "model.safetensors").write_bytes(b"\0" * 16)
    (root / "no-config" / "tokenizer.json").write_text("{}")
    assert scan(root)["no-config"].reason == "no config.json"


def test_metadata_comes_from_the_models_own_files(tmp_path: Path) -> None:
    root = tmp_path / "models"
    q = make_model(root / "quantized", config={
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "quantization": {"bits": 4, "group_size": 64}, "max_position_embeddings": 4096})
    safetensors(q / "model.safetensors", {
        "layers.0.w.weight": ("U32", [8, 2]), "layers.0.w.scales": ("F16", [8, 1]),
        "layers.0.w.biases": ("F16", [8, 1]), "norm.weight": ("F16", [16])})
    (q / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% if tools %}{{ tools }}{% endif %}{{ messages }}"}))
    r = make_model(root / "thinker", config={"model_type": "qwen3", "torch_dtype": "bfloat16",
                                             "text_config": {"max_position_embeddings": 512}})
    (r / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"content": "<think>"}, {"content": "</think>"}]}))
    make_model(root / "vlm-by-arch", config={"model_type": "qwen2_vl"})
    make_model(root / "named-vision-but-text", config={"model_type": "llama"})
    found = scan(root)
    m = found["quantized"]
    assert (m.architecture, m.model_type, m.quantization) == (
        "LlamaForCausalLM", "llama", "4-bit, group 64")
    assert m.parameters == 8 * 2 * 8 + 16  # packed uint32 hold 8 four-bit values
    assert m.weights_bytes == (q / "model.safetensors").stat().st_size
    assert m.context_length == 4096
    assert m.capabilities == ("text", "tools")
    t = found["thinker"]
    assert t.quantization == "bfloat16" and t.context_length == 512
    assert t.capabilities == ("text", "reasoning")
    assert found["vlm-by-arch"].vision and "vision" in found["vlm-by-arch"].capabilities
    assert not found["named-vision-but-text"].vision


def test_sources_in_order_first_id_wins_and_hf_cache_holds_only_repos(tmp_path: Path) -> None:
    mine = tmp_path / "models"
    hf = tmp_path / "hf" / "hub"
    lms = tmp_path / "lmstudio"
    make_model(mine / "org--shared")
    make_hf_repo(hf, "org", "shared", ["r1"], main="r1")
    make_hf_repo(hf, "org", "cached", ["r1"], main="r1")
    make_model(hf / "not-a-repo")
    (hf / "datasets--org--data" / "snapshots" / "x").mkdir(parents=True)
    make_model(lms / "lmstudio-community" / "Llama-3.2-1B-MLX")
    found = scan_sources([Source("model_directory", mine), Source("hf_cache", hf),
                          Source("lmstudio", lms)])
    assert set(found) == {"org/shared", "org/cached", "lmstudio-community/Llama-3.2-1B-MLX"}
    assert found["org/shared"].source == "model_directory"
    assert found["org/cached"].source == "hf_cache"
    assert found["lmstudio-community/Llama-3.2-1B-MLX"].source == "lmstudio"
    assert all(m.usable for m in found.values())


def test_a_link_to_another_sources_model_hides_neither_id_unless_the_later_is_the_link(
        tmp_path: Path) -> None:
    """`models link --lmstudio` puts `mlxrouter/mine` into LM Studio, a link to the model
    directory's `mine`: one model, served once. A user's own link in the model directory to
    an HF snapshot or an LM Studio model must not hide that source's own id."""
    mine = tmp_path / "models"
    hf = tmp_path / "hf" / "hub"
    lms = tmp_path / "lmstudio"
    make_model(mine / "own")
    make_hf_repo(hf, "org", "cached", ["r1"], main="r1")
    make_model(lms / "org" / "real")
    (mine / "alias-hf").symlink_to(hf / "models--org--cached" / "snapshots" / "r1")
    (mine / "alias-lms").symlink_to(lms / "org" / "real")
    (lms / "mlxrouter").mkdir()
    (lms / "mlxrouter" / "own").symlink_to(mine / "own")
    found = scan_sources([Source("model_directory", mine), Source("hf_cache", hf),
                          Source("lmstudio", lms)])
    assert set(found) == {"own", "alias-hf", "alias-lms", "org/cached", "org/real"}


def test_hf_cache_symlinks_to_blobs_stay_inside_the_root(tmp_path: Path) -> None:
    hf = tmp_path / "hub"
    repo = hf / "models--org--m"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, body in (("config.json", b'{"model_type": "llama"}'),
                       ("model.safetensors", b"\0" * 8), ("tokenizer.json", b"{}")):
        (repo / "blobs" / name).write_bytes(body)
        (snap / name).symlink_to(Path("../../blobs") / name)
    found = scan(hf, "hf_cache")
    assert found["org/m"].usable, found["org/m"].reason


def test_catalog_with_sources_sees_a_new_model_without_restart(tmp_path: Path) -> None:
    mine, hf = tmp_path / "models", tmp_path / "hub"
    mine.mkdir()
    hf.mkdir()
    catalog = Catalog(mine, {}, [Source("model_directory", mine), Source("hf_cache", hf)])
    assert catalog.ids() == []
    make_hf_repo(hf, "org", "new", ["r"], main="r")
    assert catalog.ids() == ["org/new"]
    assert catalog.info("org/new").source == "hf_cache"
    assert catalog.models()["org/new"].usable


def test_scan_of_a_model_without_readable_headers_does_not_crash(tmp_path: Path) -> None:
    root = tmp_path / "models"
    m = make_model(root / "m")
    (m / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage")
    found = scan(root)
    assert found["m"].usable and found["m"].parameters is None


def test_sources_follow_the_config_and_the_hf_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxrouter.config import load_config
    from mlxrouter.discovery import sources_for

    monkeypatch.delenv("MLX_MODEL_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".cache" / "lm-studio" / "models").mkdir(parents=True)
    cfg = tmp_path / "supervisor.toml"
    cfg.write_text('[supervisor]\nmodel_directory = "models"\n')
    sources = sources_for(load_config(cfg))
    assert [(s.name, s.root) for s in sources] == [
        ("model_directory", tmp_path / "models"),
        ("hf_cache", tmp_path / "hf-home" / "hub"),
        ("lmstudio", tmp_path / "home" / ".cache" / "lm-studio" / "models")]

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    cfg.write_text('[supervisor]\nmodel_directory = "models"\n'
                   'discovery_sources = ["hf_cache", "model_directory"]\n')
    sources = sources_for(load_config(cfg))
    assert [(s.name, s.root, s.scanned) for s in sources] == [
        ("hf_cache", tmp_path / "hub-cache", True),
        ("model_directory", tmp_path / "models", True),
        # left out, not scanned; still a root that `models link`'s links may lead into
        ("lmstudio", tmp_path / "home" / ".cache" / "lm-studio" / "models", False)]


def test_org_level_links_back_into_the_root_are_skipped(tmp_path: Path) -> None:
    """`alias -> .` or `orglink -> org` would only list the same models under a second id
    (and `rm alias/m` would name the real `m`); a linked org from elsewhere still counts."""
    root = tmp_path / "models"
    make_model(root / "precious")
    make_model(root / "org" / "m")
    (root / "alias").symlink_to(".")
    (root / "orglink").symlink_to(root / "org")
    elsewhere = tmp_path / "lmstudio"
    make_model(elsewhere / "vendor" / "x")
    (root / "vendor").symlink_to(elsewhere / "vendor")

    found = scan_sources([Source("model_directory", root), Source("lmstudio", elsewhere)])

    assert set(found) == {"precious", "org/m", "vendor/x"}
    assert found["vendor/x"].usable and found["vendor/x"].source == "model_directory"
    outside_only = scan(root)  # vendor/ resolves outside this root alone: listed, unusable
    assert set(outside_only) == {"precious", "org/m", "vendor/x"}
    assert not outside_only["vendor/x"].usable


def safetensors_with_header(header: object) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize("header", [
    [1, 2],  # not an object
    {"w": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [2, None], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}},
])
def test_a_safetensors_header_of_the_wrong_shape_gives_no_count_and_breaks_nothing(
        tmp_path: Path, header: object) -> None:
    root = tmp_path / "models"
    make_model(root / "good")
    bad = make_model(root / "bad", config={"model_type": "llama",
                                            "quantization": {"bits": 4, "group_size": 64}})
    (bad / "model.safetensors").write_bytes(safetensors_with_header(header))
    found = scan(root)
    assert found["good"].usable
    assert found["bad"].usable and found["bad"].parameters is None


@pytest.mark.parametrize("weight_map", [["a.safetensors"], {"w": ["a.safetensors"]}, {"w": 5},
                                        {"w": "../escape.safetensors"}])
def test_an_index_with_a_malformed_weight_map_is_unusable_with_the_reason(
        tmp_path: Path, weight_map: object) -> None:
    root = tmp_path / "models"
    make_model(root / "good")
    bad = make_model(root / "bad", weights=False)
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    found = scan(root)
    assert found["good"].usable
    assert not found["bad"].usable and "weight_map" in found["bad"].reason


def test_a_usable_copy_wins_over_an_incomplete_one_in_an_earlier_source(tmp_path: Path) -> None:
    mine, hf = tmp_path / "models", tmp_path / "hub"
    half = make_model(mine / "org--m", weights=False)
    (half / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    make_hf_repo(hf, "org", "m", ["r1"], main="r1")
    make_model(mine / "org--both-broken", weights=False)
    make_model(hf / "models--org--both-broken" / "snapshots" / "r1", weights=False)
    found = scan_sources([Source("model_directory", mine), Source("hf_cache", hf)])
    assert found["org/m"].usable and found["org/m"].source == "hf_cache"
    assert not found["org/both-broken"].usable
    assert found["org/both-broken"].source == "model_directory"  # the first stays


def test_a_fifo_named_like_a_model_file_does_not_hang_the_scan(tmp_path: Path) -> None:
    root = tmp_path / "models"
    m = make_model(root / "m")
    os.mkfifo(m / "chat_template.jinja")
    found = scan(root)  # pytest-timeout fails this test if a read blocks
    assert found["m"].usable
    assert found["m"].capabilities == ("text",)
    (m / "added_tokens.json").symlink_to("/dev/zero")
    assert not scan(root)["m"].usable  # a link out of the roots, never read
    from mlxrouter.discovery import describe
    assert describe(m)["capabilities"] == ("text",)  # a configured path: no roots, still safe


def test_a_tokenizer_linked_from_outside_the_roots_makes_the_model_unusable(
        tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_text('{"added_tokens": ["</think>"]}')
    m = make_model(root / "m", tokenizer=None)
    (m / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    found = scan(root)
    assert not found["m"].usable
    assert "outside the configured model roots" in found["m"].reason


def test_a_damaged_config_json_makes_the_model_unusable_with_the_reason(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_model(root / "good")
    truncated = make_model(root / "truncated")
    (truncated / "config.json").write_text('{"model_type": "llama", "hidden_si')
    make_model(root / "list", config=None)
    (root / "list" / "config.json").write_text("[1, 2]")
    make_model(root / "typeless", config={"hidden_size": 8})
    make_model(root / "null-text", config={"model_type": "llava", "text_config": None})

    found = scan(root)

    assert found["good"].usable
    assert not found["truncated"].usable
    assert found["truncated"].reason == (
        "config.json is not valid JSON (a truncated or damaged file?)")
    assert (found["list"].usable, found["list"].reason) == (
        False, "config.json is not a JSON object")
    assert (found["typeless"].usable, found["typeless"].reason) == (
        False, "config.json has no model_type")
    # "text_config": null made /v1/models and every request to the model a 500
    assert found["null-text"].reason == "config.json's text_config is not an object"


@pytest.mark.parametrize("fields, reason", [
    ({"num_hidden_layers": "two"}, "config.json's num_hidden_layers is not a whole number"),
    ({"hidden_size": 8.5}, "config.json's hidden_size is not a whole number"),
    ({"quantization": [4]}, "config.json's quantization is not an object"),
    ({"quantization": {"bits": "4", "group_size": 64}},
     "config.json's quantization.bits is not a whole number"),
])
def test_a_config_value_the_memory_estimate_cannot_read_makes_the_model_unusable(
        tmp_path: Path, fields: dict, reason: str) -> None:
    """`models list` exited with a traceback, /v1/models was a 500 for every model, and the
    supervisor's tick failed every second, holding up every other model's load."""
    from mlxrouter.memory import estimate_cost

    root = tmp_path / "models"
    bad = make_model(root / "bad", config={"model_type": "llama", **fields})
    nulls = make_model(root / "nulls", config={"model_type": "llama", "hidden_size": None,
                                               "head_dim": None, "num_hidden_layers": None})
    found = scan(root)
    assert (found["bad"].usable, found["bad"].reason.split(" (")[0]) == (False, reason)
    assert found["nulls"].usable  # null reads as absent: its load says what is wrong
    assert estimate_cost(str(nulls), max_context=64, max_batch=1, overhead_bytes=0) >= 0
    assert bad.is_dir()


def test_a_config_json_linked_outside_the_roots_is_not_read(tmp_path: Path) -> None:
    """Its content was read and judged ("not valid JSON") before the roots check."""
    root = tmp_path / "models"
    model = make_model(root / "m")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not json at all")
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(outside)
    found = scan_sources([Source("model_directory", root)])
    assert found["m"].reason == "a model file links outside the configured model roots"


def test_mixed_bit_quantized_weights_count_with_their_own_bits(tmp_path: Path) -> None:
    """The embedded SmolLM2 has an 8-bit embedding in a 4-bit model: counted at 4 bits, its
    162.8M parameters were shown for 134.5M."""
    from mlxrouter.discovery import _safetensors_parameters

    def tensor(dtype: str, shape: list[int]) -> dict:
        return {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}

    header = {"model.embed_tokens.weight": tensor("U32", [10, 64 * 8 // 32]),
              "model.embed_tokens.scales": tensor("F16", [10, 2]),
              "model.proj.weight": tensor("U32", [64, 64 * 4 // 32]),
              "model.proj.scales": tensor("F16", [64, 2]),
              "model.norm.weight": tensor("F16", [64])}
    raw = json.dumps(header).encode()
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(raw)) + raw)
    quant = {"bits": 4, "group_size": 32, "model.embed_tokens": {"bits": 8, "group_size": 32}}

    assert _safetensors_parameters([file], 4, quant) == 10 * 64 + 64 * 64 + 64


def test_the_served_context_is_read_as_the_worker_reads_it(tmp_path: Path) -> None:
    """A max_position_embeddings only at the top level of a config with a text_config: the
    worker enforces 4096, and /v1/models said 8192."""
    from types import SimpleNamespace

    from mlxrouter.discovery import served_context

    model = make_model(tmp_path / "vlm", config={
        "model_type": "llava", "text_config": {"hidden_size": 8},
        "max_position_embeddings": 100_000})
    assert served_context(SimpleNamespace(max_context=8192, path=str(model))) == 4096
    assert served_context(SimpleNamespace(max_context=1000, path=str(model))) == 1000
