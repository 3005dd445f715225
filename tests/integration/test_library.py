"""The model library from the user's side: `mlxrouter models list/pull/link/rm` as subprocesses,
pulls through the real huggingface_hub download path against a local fake hub (HF_ENDPOINT),
and on-demand downloads through a chat request to a real daemon with the openai client."""

from __future__ import annotations

import json
import os
import shutil
import struct
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import spawn_daemon, wait_for_gone, write_config
from hubserver import FakeHub

from mlxrouter import library
from mlxrouter.discovery import DiscoveredModel

pytestmark = pytest.mark.timeout(180)

CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in chunks of this size


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    (tmp_path / "lmstudio").mkdir()
    write_config(tmp_path, supervisor={"hf_cache_dir": str(tmp_path / "hf" / "hub"),
                                       "lmstudio_dir": str(tmp_path / "lmstudio")})
    return tmp_path


def cli(root: Path, *args: str, hub: FakeHub | None = None, stdin: str = "",
        timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(root / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("MLX_MODEL_DIR", None)
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    return subprocess.run(
        [sys.executable, "-m", "mlxrouter", *args, "--config", str(root / "supervisor.toml")],
        input=stdin, capture_output=True, text=True, env=env, timeout=timeout)


def listed(root: Path) -> dict[str, dict]:
    out = cli(root, "models", "list", "--json")
    assert out.returncode == 0, out.stderr
    return {m["id"]: m for m in json.loads(out.stdout)}


def big_safetensors(size: int) -> bytes:
    """A valid safetensors file with one F32 tensor of about `size` bytes."""
    n = size // 4
    header = json.dumps({"pad": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (4 * n // 256) + b"\0" * (
        4 * n % 256)


def tiny_files(tiny_model: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()}


# ---- pull


def test_pull_fetches_only_model_files_and_resumes_a_cut_download(
        root: Path, hub: FakeHub, tiny_model: Path) -> None:
    big = big_safetensors(CHUNK + 2 * 2**20)
    hub.add_repo("org/tiny", {**tiny_files(tiny_model), "big.safetensors": big,
                              "README.md": b"# tiny", "pytorch_model.bin": b"\0" * 64,
                              "onnx/model.safetensors": b"\0" * 64, "train.py": b"pass"})
    hub.cut_once["big.safetensors"] = CHUNK + 12345  # the connection drops mid-file

    out = cli(root, "models", "pull", "org/tiny", hub=hub)

    assert out.returncode == 0, out.stderr
    target = root / "models" / "org--tiny"
    on_disk = {p.name for p in target.iterdir() if not p.name.startswith(".")}
    assert on_disk == set(tiny_files(tiny_model)) | {"big.safetensors"}
    assert (target / "big.safetensors").read_bytes() == big
    assert hub.downloads("big.safetensors") == [None, f"bytes={CHUNK}-"]
    for skipped in ("README.md", "pytorch_model.bin", "onnx/model.safetensors", "train.py"):
        assert not hub.downloads(skipped)
    model = listed(root)["org/tiny"]
    assert model["usable"] and model["source"] == "model_directory"
    assert model["architecture"] == "LlamaForCausalLM"
    assert model["weights_bytes"] == sum(
        (target / n).stat().st_size for n in ("model.safetensors", "big.safetensors"))


def test_pull_interrupted_run_resumes_with_only_the_missing_files(
        root: Path, hub: FakeHub, tiny_model: Path) -> None:
    hub.add_repo("org/tiny", tiny_files(tiny_model))
    hub.unavailable.add("model.safetensors")

    first = cli(root, "models", "pull", "org/tiny", hub=hub)

    assert first.returncode != 0
    assert "pull again to resume" in first.stderr
    assert not listed(root)["org/tiny"]["usable"]
    hub.unavailable.clear()
    second = cli(root, "models", "pull", "org/tiny", hub=hub)
    assert second.returncode == 0, second.stderr
    assert listed(root)["org/tiny"]["usable"]
    assert hub.downloads("config.json") == [None]  # kept from the first run
    assert hub.downloads("model.safetensors") == [None]


def test_pull_of_a_repo_that_does_not_exist_fails_clearly(root: Path, hub: FakeHub) -> None:
    out = cli(root, "models", "pull", "nobody/nothing", hub=hub)
    assert out.returncode == 1
    assert "has no model 'nobody/nothing'" in out.stderr
    assert "Traceback" not in out.stderr
    assert list((root / "models").iterdir()) == []


def test_pull_of_an_id_another_directory_holds_is_refused(root: Path, hub: FakeHub,
                                                          tiny_model: Path) -> None:
    """It said "pulled" and the copy was hidden behind the nested org/name one."""
    hub.add_repo("torg/sub", tiny_files(tiny_model))
    shutil.copytree(tiny_model, root / "models" / "torg" / "sub")

    out = cli(root, "models", "pull", "torg/sub", hub=hub)

    assert out.returncode == 1
    assert "there is a model 'torg/sub' already, at" in out.stderr
    assert not (root / "models" / "torg--sub").exists() and hub.requests == []
    shutil.rmtree(root / "models" / "torg")
    assert cli(root, "models", "pull", "torg/sub", hub=hub).returncode == 0
    again = cli(root, "models", "pull", "torg/sub", hub=hub)  # its own copy: pulled again
    assert again.returncode == 0, again.stderr


def test_pull_of_a_pytorch_only_repo_says_it_is_not_mlx(root: Path, hub: FakeHub,
                                                       tiny_model: Path) -> None:
    files = tiny_files(tiny_model)
    del files["model.safetensors"]
    hub.add_repo("org/torch-only", {**files, "pytorch_model.bin": b"\0" * 64})
    out = cli(root, "models", "pull", "org/torch-only", hub=hub)
    assert out.returncode == 1
    assert "not a usable MLX model: no .safetensors weights: it holds a PyTorch" in out.stderr
    assert not hub.downloads("config.json")  # refused before anything was fetched
    assert not (root / "models" / "org--torch-only").exists()


def test_pull_fetches_only_the_shards_the_index_names_and_drops_stale_files_on_repull(
        root: Path, hub: FakeHub, tiny_model: Path) -> None:
    files = tiny_files(tiny_model)
    weights = files.pop("model.safetensors")
    shard = "model-00001-of-00001.safetensors"
    index = json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}).encode()
    hub.add_repo("org/sharded", {**files, shard: weights, "model.safetensors.index.json": index,
                                 "consolidated.safetensors": b"\0" * 4096})

    first = cli(root, "models", "pull", "org/sharded", hub=hub)

    assert first.returncode == 0, first.stderr
    target = root / "models" / "org--sharded"
    assert (target / shard).read_bytes() == weights
    assert not hub.downloads("consolidated.safetensors")  # same weights, another layout
    # The repo moves to a single file; pulling again must not keep the old shard and index,
    # which the new config.json would be loaded with.
    hub.add_repo("org/sharded", {**files, "model.safetensors": weights})

    second = cli(root, "models", "pull", "org/sharded", hub=hub)

    assert second.returncode == 0, second.stderr
    on_disk = {p.name for p in target.iterdir() if not p.name.startswith(".")}
    assert on_disk == set(files) | {"model.safetensors"}
    assert listed(root)["org/sharded"]["weights_bytes"] == len(weights)


def test_pull_never_writes_through_a_link_made_by_models_link(
        root: Path, hub: FakeHub, tiny_model: Path) -> None:
    lms_model = root / "lmstudio" / "org" / "m"
    shutil.copytree(tiny_model, lms_model)
    before = {p.name: p.read_bytes() for p in lms_model.iterdir()}
    assert cli(root, "models", "link").returncode == 0
    assert (root / "models" / "org--m").is_symlink()
    hub.add_repo("org/m", {**tiny_files(tiny_model), "extra.safetensors": b"\0" * 64})

    out = cli(root, "models", "pull", "org/m", hub=hub)

    assert out.returncode == 1
    assert "is a link to" in out.stderr and "models rm org/m" in out.stderr
    assert {p.name: p.read_bytes() for p in lms_model.iterdir()} == before
    assert not hub.requests  # refused before asking the hub


def test_pull_rejects_a_name_that_is_not_a_repo_id(root: Path) -> None:
    out = cli(root, "models", "pull", "../etc")
    assert out.returncode == 1 and "not a Hugging Face repo id" in out.stderr
    dashes = cli(root, "models", "pull", "a--b/c")  # a valid hub id: say why it is refused
    assert dashes.returncode == 1 and "ids with '--' are refused" in dashes.stderr


# ---- list


def hf_cache_repo(hub_dir: Path, repo_id: str, source: Path) -> Path:
    """The real HF cache layout: snapshot files are relative symlinks into blobs/."""
    repo = hub_dir / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in source.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return repo


def test_models_list_json_covers_every_source(root: Path, tiny_model: Path) -> None:
    shutil.copytree(tiny_model, root / "models" / "mine")
    (root / "models" / "broken").mkdir()
    (root / "models" / "broken" / "config.json").write_text("{}")
    hf_cache_repo(root / "hf" / "hub", "org/cached", tiny_model)
    shutil.copytree(tiny_model, root / "lmstudio" / "lmstudio-community" / "tiny-MLX")
    (root / "elsewhere").mkdir()
    shutil.copytree(tiny_model, root / "elsewhere" / "m")
    (root / "models" / "escape").symlink_to(root / "elsewhere" / "m")

    models = listed(root)

    assert set(models) == {"mine", "broken", "org/cached", "lmstudio-community/tiny-MLX",
                           "escape"}
    mine = models["mine"]
    assert mine["usable"] and mine["state"] is None  # no daemon running
    assert (mine["architecture"], mine["quantization"]) == ("LlamaForCausalLM", "float32")
    assert mine["context_length"] == 2048
    assert mine["parameters"] > 0
    assert mine["weights_bytes"] == (tiny_model / "model.safetensors").stat().st_size
    assert mine["estimated_memory_bytes"] > mine["weights_bytes"]
    assert mine["capabilities"] == ["text", "tools", "reasoning"]
    assert models["org/cached"]["source"] == "hf_cache" and models["org/cached"]["usable"]
    assert models["lmstudio-community/tiny-MLX"]["source"] == "lmstudio"
    assert not models["broken"]["usable"] and models["broken"]["reason"]
    assert not models["escape"]["usable"] and "outside" in models["escape"]["reason"]
    table = cli(root, "models", "list")
    assert table.returncode == 0
    assert "unusable: symlink points outside" in table.stdout
    assert "text,tools,reasoning" in table.stdout
    # the table's columns hold the longest usual values whole
    quant = root / "models" / "quant4"
    shutil.copytree(tiny_model, quant)
    config = json.loads((quant / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps(
        {**config, "quantization": {"bits": 4, "group_size": 64}}))
    assert "4-bit, group 64 " in cli(root, "models", "list").stdout
    # sizes in units of 1024, as "GB" means in the config and in the memory messages
    weights = mine["weights_bytes"]
    shown = f"{weights / 2**20:.1f}MB" if weights >= 2**20 else f"{weights / 2**10:.1f}KB"
    assert shown in next(line for line in table.stdout.splitlines()
                         if line.startswith("mine ")), (shown, table.stdout)


# ---- link and rm


def test_link_from_hf_cache_and_lmstudio_and_back(root: Path, tiny_model: Path) -> None:
    repo = hf_cache_repo(root / "hf" / "hub", "org/cached", tiny_model)
    lms_model = root / "lmstudio" / "lmstudio-community" / "tiny-MLX"
    shutil.copytree(tiny_model, lms_model)
    shutil.copytree(tiny_model, root / "models" / "mine")

    out = cli(root, "models", "link")

    assert out.returncode == 0, out.stderr
    linked_hf = root / "models" / "models--org--cached"
    linked_lms = root / "models" / "lmstudio-community--tiny-MLX"
    assert linked_hf.is_symlink() and linked_hf.resolve() == repo.resolve()
    assert linked_lms.is_symlink() and linked_lms.resolve() == lms_model.resolve()
    models = listed(root)
    assert models["org/cached"]["source"] == "model_directory"
    assert models["org/cached"]["usable"]
    assert models["lmstudio-community/tiny-MLX"]["source"] == "model_directory"
    again = cli(root, "models", "link")
    assert "skipped" in again.stdout and "linked" not in again.stdout

    back = cli(root, "models", "link", "--lmstudio", "mine")

    assert back.returncode == 0, back.stderr
    in_lms = root / "lmstudio" / "mlxrouter" / "mine"
    assert in_lms.is_symlink() and in_lms.resolve() == (root / "models" / "mine").resolve()
    assert (in_lms / "model.safetensors").stat().st_ino == (
        root / "models" / "mine" / "model.safetensors").stat().st_ino  # linked, not copied
    # the link is the model directory's `mine` seen from LM Studio: not a second model
    assert "mine" in listed(root) and "mlxrouter/mine" not in listed(root)
    round_trip = cli(root, "models", "link", "mlxrouter/mine")
    assert "skipped mlxrouter/mine (a link into" in round_trip.stdout  # no link to a link
    assert not (root / "models" / "mlxrouter--mine").exists()


def test_links_stay_usable_when_their_source_is_not_scanned(root: Path,
                                                             tiny_model: Path) -> None:
    """`models link`, then discovery_sources = ["model_directory"]: the links into the HF
    cache and LM Studio were "symlink points outside the configured model roots"."""
    hf_cache_repo(root / "hf" / "hub", "org/cached", tiny_model)
    shutil.copytree(tiny_model, root / "lmstudio" / "lms" / "tiny-MLX")
    assert cli(root, "models", "link").returncode == 0
    config = root / "supervisor.toml"
    config.write_text(config.read_text().replace(
        "[supervisor]\n", '[supervisor]\ndiscovery_sources = ["model_directory"]\n'))

    models = listed(root)

    assert models["org/cached"]["usable"], models["org/cached"]
    assert models["lms/tiny-MLX"]["usable"], models["lms/tiny-MLX"]
    assert {m["source"] for m in models.values()} == {"model_directory"}  # nothing else scanned


def test_link_to_lmstudio_takes_models_linked_in_from_the_hf_cache(root: Path,
                                                                   tiny_model: Path) -> None:
    """They were "skipped (symlink points outside the configured model roots)"."""
    repo = hf_cache_repo(root / "hf" / "hub", "org/cached", tiny_model)
    assert cli(root, "models", "link").returncode == 0

    out = cli(root, "models", "link", "--lmstudio", "org/cached")

    assert out.returncode == 0 and "outside" not in out.stdout, out.stdout
    linked = root / "lmstudio" / "org" / "cached"
    assert linked.is_symlink() and linked.resolve().parent.parent == repo.resolve()


def test_link_of_an_unknown_id_fails_and_links_nothing(root: Path, tiny_model: Path) -> None:
    hf_cache_repo(root / "hf" / "hub", "org/cached", tiny_model)
    shutil.copytree(tiny_model, root / "models" / "mine")

    out = cli(root, "models", "link", "org/cached", "org/typo")
    back = cli(root, "models", "link", "--lmstudio", "mine", "nope")

    assert out.returncode == 1
    assert "no model 'org/typo' in the HF cache or LM Studio (ids there: org/cached)" in out.stderr
    assert not (root / "models" / "models--org--cached").exists()  # nothing half done
    assert back.returncode == 1
    assert "no model 'nope' in" in back.stderr and "ids there: mine" in back.stderr
    assert not (root / "lmstudio" / "mlxrouter").exists()


def test_rm_unlinks_links_deletes_dirs_and_asks_first(root: Path, tiny_model: Path) -> None:
    lms_model = root / "lmstudio" / "org" / "linked"
    shutil.copytree(tiny_model, lms_model)
    (root / "models" / "org--linked").symlink_to(lms_model)
    shutil.copytree(tiny_model, root / "models" / "org" / "nested")
    shutil.copytree(tiny_model, root / "models" / "plain")

    no = cli(root, "models", "rm", "plain", stdin="n\n")
    assert no.returncode == 1 and (root / "models" / "plain").is_dir()
    yes = cli(root, "models", "rm", "plain", stdin="y\n")
    assert yes.returncode == 0 and not (root / "models" / "plain").exists()

    out = cli(root, "models", "rm", "org/linked", "--yes")
    assert out.returncode == 0 and "unlinked" in out.stdout
    # LM Studio still has it: the daemon serves that copy from now on, and rm says so
    assert f"'org/linked' is still served, from {lms_model} (lmstudio)" in out.stdout
    assert not (root / "models" / "org--linked").is_symlink()
    assert (lms_model / "model.safetensors").is_file()  # the link's target is untouched

    out = cli(root, "models", "rm", "org/nested", "--yes")
    assert out.returncode == 0
    assert not (root / "models" / "org").exists()  # the emptied org dir goes too

    missing = cli(root, "models", "rm", "no-such-model", "--yes")
    assert missing.returncode == 1 and "no model 'no-such-model'" in missing.stderr


def test_two_directories_of_one_id_are_reported_not_silently_merged(root: Path,
                                                                     tiny_model: Path) -> None:
    shutil.copytree(tiny_model, root / "models" / "dup--same")
    shutil.copytree(tiny_model, root / "models" / "dup" / "same")
    listing = cli(root, "models", "list")
    assert listing.returncode == 0
    assert "two directories are model 'dup/same'" in listing.stderr
    first = cli(root, "models", "rm", "dup/same", "--yes")
    assert first.returncode == 0
    assert "'dup/same' is still served, from" in first.stdout
    assert "dup/same" in listed(root)
    second = cli(root, "models", "rm", "dup/same", "--yes")
    assert second.returncode == 0 and "still served" not in second.stdout
    assert "dup/same" not in listed(root)
    assert not (root / "models" / "dup--same").exists()
    assert not (root / "models" / "dup").exists()


def test_rm_never_deletes_through_a_linked_org_dir(root: Path, tiny_model: Path) -> None:
    outside = root / "outside-org"
    shutil.copytree(tiny_model, outside / "m")
    (root / "models" / "org").symlink_to(outside)
    (root / "models" / "org").resolve()
    out = cli(root, "models", "rm", "org/m", "--yes")
    assert out.returncode == 1
    assert (outside / "m" / "model.safetensors").is_file()


# ---- on-demand download through the daemon


@pytest.fixture
def download_daemon(tmp_path: Path, hub: FakeHub):
    daemons = []

    def start(allow: bool = True, supervisor: dict | None = None,
              defaults: dict | None = None, env: dict | None = None):
        root = tmp_path / f"d{len(daemons)}"
        (root / "models").mkdir(parents=True)
        config = write_config(root, models={}, supervisor={
            "allow_download": allow, "discovery_sources": ["model_directory"],
            **(supervisor or {})},
            defaults={"max_context": 256, "max_running": 2, "prompt_cache_bytes": 0,
                      **(defaults or {})})
        daemon = spawn_daemon(root, config, env={"HF_ENDPOINT": hub.url,
                                                 "HF_HOME": str(root / "hf-home"),
                                                 **(env or {})})
        daemons.append(daemon)
        return daemon

    yield start
    leftovers = []
    for daemon in daemons:
        daemon.stop()
        leftovers += wait_for_gone(daemon)
    assert not leftovers


def test_chat_request_for_an_unknown_repo_downloads_it_first(
        download_daemon, hub: FakeHub, tiny_model: Path) -> None:
    hub.add_repo("org/fresh", {**tiny_files(tiny_model), "README.md": b"x"})
    daemon = download_daemon()
    client = daemon.openai()

    stream = client.chat.completions.create(
        model="org/fresh", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        stream=True)
    chunks = list(stream)

    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    target = daemon.root / "models" / "org--fresh"
    assert (target / "model.safetensors").read_bytes() == (
        tiny_model / "model.safetensors").read_bytes()
    assert not (target / "README.md").exists()
    model = daemon.http.get("/v1/models/org/fresh").json()
    assert model["loaded"] is True and model["capabilities"] == ["text", "tools", "reasoning"]
    assert model["estimated_memory_bytes"] > model["weights_bytes"] > 0
    again = client.chat.completions.create(
        model="org/fresh", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert again.choices[0].finish_reason == "length"
    assert len(hub.downloads("model.safetensors")) == 1


def test_unknown_repo_is_a_clear_404(download_daemon, hub: FakeHub) -> None:
    client = download_daemon().openai()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="nobody/nothing", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.code == "model_not_found"
    assert "nobody/nothing" in err.value.message


def test_without_allow_download_the_hub_is_never_asked(download_daemon, hub: FakeHub,
                                                       tiny_model: Path) -> None:
    hub.add_repo("org/fresh", tiny_files(tiny_model))
    client = download_daemon(allow=False).openai()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="org/fresh", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert hub.requests == []


def test_models_dropped_into_the_directory_appear_without_restart(
        download_daemon, tiny_model: Path) -> None:
    daemon = download_daemon(allow=False)
    assert daemon.http.get("/v1/models").json()["data"] == []

    shutil.copytree(tiny_model, daemon.root / "models" / "org" / "dropped")
    (daemon.root / "models" / "half").mkdir()
    (daemon.root / "models" / "half" / "config.json").write_text("{}")

    data = {m["id"]: m for m in daemon.http.get("/v1/models").json()["data"]}
    assert set(data) == {"org/dropped"}  # the unusable one is not offered
    m = data["org/dropped"]
    assert m["loaded"] is False and m["state"] == "STOPPED"
    assert m["architecture"] == "LlamaForCausalLM"
    assert m["context_length"] == 256  # the daemon's max_context, under the model's 2048
    assert m["capabilities"] == ["text", "tools", "reasoning"]
    assert m["parameters"] > 0 and m["weights_bytes"] > 0
    reply = daemon.openai().chat.completions.create(
        model="org/dropped", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert daemon.http.get("/v1/models/org/dropped").json()["loaded"] is True


def test_context_length_is_the_one_the_server_enforces(start_daemon, tiny_model: Path) -> None:
    """A configured max_context below the model's own (2048) is what /v1/models and
    `models list` give: a client that trims its history to context_length gets no 400."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_context": 100}})
    (daemon.root / "models" / "half").mkdir()
    (daemon.root / "models" / "half" / "config.json").write_text("{}")

    served = daemon.http.get("/v1/models/tiny").json()
    rows = {m["id"]: m for m in json.loads(cli(daemon.root, "models", "list", "--json").stdout)}
    row = rows["tiny"]

    assert served["context_length"] == row["context_length"] == 100
    assert row["state"] == "STOPPED"
    assert rows["half"]["state"] is None  # unusable: the daemon knows no such model
    too_long = daemon.http.post("/v1/completions", json={
        "model": "tiny", "prompt": [5] * 90, "max_tokens": 11})
    assert too_long.status_code == 400 and "maximum context length is 100" in too_long.text


def test_configured_models_that_cannot_be_served_say_why_in_both_lists(
        start_daemon, tiny_model: Path) -> None:
    """A configured model with no path that discovery does not find was in /v1/models as if
    usable (capabilities [], no reason) and missing from `models list`; one whose configured
    path has no model showed no reason either."""
    missing = tiny_model / "nothere"
    daemon = start_daemon({"tiny": {"path": str(tiny_model)}, "ghost": {"max_tokens": 8},
                           "gone": {"path": str(missing)}})
    served = {m["id"]: m for m in daemon.http.get("/v1/models").json()["data"]}
    rows = {m["id"]: m for m in json.loads(cli(daemon.root, "models", "list", "--json").stdout)}
    table = cli(daemon.root, "models", "list").stdout

    assert served["tiny"]["usable"] is True and served["tiny"]["reason"] is None
    for listed_ in (served, rows):
        assert listed_["ghost"]["usable"] is False
        assert listed_["ghost"]["reason"] == "has no path and was not found on disk"
        assert listed_["gone"]["usable"] is False
        assert listed_["gone"]["path"] == str(missing) and listed_["gone"]["reason"]
    assert served["gone"]["reason"] == rows["gone"]["reason"] == "no such directory"
    assert "ghost" in table and "unusable: has no path and was not found on disk" in table
    # the same fields and values in both (models list had no `loaded`, "" for no reason)
    assert set(served["tiny"]) - {"object", "created", "owned_by"} == set(rows["tiny"]) - {
        "vision"}
    assert rows["tiny"]["reason"] is None and rows["tiny"]["loaded"] is False
    assert served["ghost"]["source"] == rows["ghost"]["source"] == "config"
    refused = daemon.http.post("/v1/chat/completions", json={
        "model": "ghost", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 503 and "not found on disk" in refused.text
    # a configured path with no model is refused at once, with the reason; it used to be
    # started (and fail) four times, each a retryable 503, before it went FATAL
    gone = daemon.http.post("/v1/chat/completions", json={
        "model": "gone", "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code == 503 and gone.headers["x-should-retry"] == "false"
    assert f"cannot be served from its configured path {missing}: no such directory" in (
        gone.json()["error"]["message"])
    assert "starting worker model=gone" not in daemon.output()


def test_a_model_whose_id_starts_with_a_dash_loads(download_daemon, tiny_model: Path) -> None:
    """The worker's argv had "--identity -neg/...", which argparse took for an option: every
    load failed with "expected one argument"."""
    daemon = download_daemon(allow=False)
    shutil.copytree(tiny_model, daemon.root / "models" / "-neg")
    reply = daemon.openai().chat.completions.create(
        model="-neg", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


def test_lmstudio_installed_while_the_daemon_runs_is_discovered(
        download_daemon, tmp_path: Path, tiny_model: Path) -> None:
    """With no LM Studio directory at start, LM Studio's default one, made later, is scanned
    (it was a root only after a restart or reload)."""
    home = tmp_path / "home"
    daemon = download_daemon(
        allow=False, supervisor={"discovery_sources": ["model_directory", "lmstudio"]},
        env={"HOME": str(home), "XDG_CACHE_HOME": os.path.expanduser("~/.cache")})
    assert daemon.http.get("/v1/models").json()["data"] == []

    shutil.copytree(tiny_model, home / ".lmstudio" / "models" / "org" / "tiny-MLX")

    data = {m["id"]: m for m in daemon.http.get("/v1/models").json()["data"]}
    assert list(data) == ["org/tiny-MLX"]
    reply = daemon.openai().chat.completions.create(
        model="org/tiny-MLX", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_a_hung_hub_gives_504_and_never_holds_up_shutdown(download_daemon,
                                                          hub: FakeHub) -> None:
    hub.hang.add("org/slow")
    # Each Hub request may wait 60 s: the pull thread is still stuck when SIGTERM comes.
    daemon = download_daemon(defaults={"timeout_s": 2},
                             env={"HF_HUB_DOWNLOAD_TIMEOUT": "60"})

    r = daemon.http.post("/v1/chat/completions", json={"model": "org/slow", **CHAT})

    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout" and "org/slow" in r.json()["error"]["message"]
    assert hub.hung  # the request really reached the hub and is still hanging there
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(timeout=30)
    took = time.monotonic() - started
    assert code == 0 and took < 8, f"exit {code} after {took:.1f}s"
    assert list((daemon.root / "models").iterdir()) == []  # no half-made model folder


def test_a_download_past_its_deadline_fails_and_the_next_request_starts_afresh(
        download_daemon, hub: FakeHub, tiny_model: Path) -> None:
    hub.hang.add("org/slow")
    daemon = download_daemon(supervisor={"download_timeout_s": 2},
                             env={"HF_HUB_DOWNLOAD_TIMEOUT": "60"})

    first = daemon.http.post("/v1/chat/completions", json={"model": "org/slow", **CHAT})

    assert first.status_code == 503, first.text
    assert first.json()["error"]["code"] == "model_load_failed"
    assert "download_timeout_s" in first.json()["error"]["message"]
    assert first.headers.get("retry-after")
    assert not (daemon.root / "models" / "org--slow").exists()
    hub.release_hung()  # the hub is back, and now has the repo
    hub.add_repo("org/slow", tiny_files(tiny_model))

    reply = daemon.openai().chat.completions.create(model="org/slow", **CHAT)

    assert reply.choices[0].finish_reason == "length"
    assert len(hub.downloads("model.safetensors")) == 1
    assert (daemon.root / "models" / "org--slow" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["a--b/c", "a/b--c", "org/name.git", "org/-bad"])
def test_an_id_the_hub_would_reject_is_404_and_never_asked_for(
        download_daemon, hub: FakeHub, name: str) -> None:
    daemon = download_daemon()
    with pytest.raises(openai.NotFoundError) as err:
        daemon.openai().chat.completions.create(model=name, **CHAT)
    assert err.value.code == "model_not_found"
    assert hub.requests == []
    assert list((daemon.root / "models").iterdir()) == []


def test_pull_of_a_rejected_id_or_a_repo_with_nothing_served_leaves_no_folder(
        root: Path, hub: FakeHub, tiny_model: Path) -> None:
    out = cli(root, "models", "pull", "a--b/c", hub=hub)
    assert out.returncode == 1 and "not a Hugging Face repo id" in out.stderr
    hub.add_repo("org/empty", tiny_files(tiny_model))
    hub.unavailable.update(tiny_files(tiny_model))  # listed, but every file answers 404

    out = cli(root, "models", "pull", "org/empty", hub=hub)

    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert any("/resolve/" in path for _, path, _ in hub.requests)  # it did ask for files
    assert list((root / "models").iterdir()) == []


# ---- rm through links inside the model directory


def test_rm_never_deletes_a_model_through_an_alias_of_the_model_directory(
        root: Path, tiny_model: Path) -> None:
    models = root / "models"
    shutil.copytree(tiny_model, models / "precious")
    shutil.copytree(tiny_model, models / "org" / "m")
    (models / "alias").symlink_to(".")  # models/alias -> models
    (models / "orglink").symlink_to("org")

    assert {"precious", "org/m"} <= set(listed(root))
    assert not {"alias/precious", "orglink/m"} & set(listed(root))
    for name in ("alias/precious", "orglink/m"):
        out = cli(root, "models", "rm", name, "--yes")
        assert out.returncode == 1 and f"no model '{name}'" in out.stderr
    assert (models / "precious" / "model.safetensors").is_file()
    assert (models / "org" / "m" / "model.safetensors").is_file()


def test_remove_refuses_a_target_under_a_linked_directory_even_if_listed(
        root: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery skips such aliases; remove() must still refuse on its own."""
    models = root / "models"
    shutil.copytree(tiny_model, models / "precious")
    (models / "alias").symlink_to(".")
    aliased = DiscoveredModel("alias/precious", str(models / "alias" / "precious"))
    monkeypatch.setattr(library.discovery, "scan",
                        lambda *a, **k: {"alias/precious": aliased})

    with pytest.raises(library.LibraryError, match="symlink"):
        library.remove(models, "alias/precious")

    assert (models / "precious" / "model.safetensors").is_file()
    assert (models / "alias").is_symlink()


def test_a_reader_that_leaves_early_gets_no_traceback(root: Path, tiny_model: Path) -> None:
    """`mlxrouter models list | head -1` printed a BrokenPipeError traceback."""
    shutil.copytree(tiny_model, root / "models" / "mine")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mlxrouter", "models", "list", "--config",
             str(root / "supervisor.toml")], stdout=write_end, stderr=subprocess.PIPE,
            text=True, timeout=60)
    finally:
        os.close(write_end)
    assert out.returncode == 141
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
