"""Config loading: supervisor.toml + workers/*.toml, the seed's config.json, precedence, and the
environment a worker process is started with."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest

from mlxrouter import config as cfg
from mlxrouter import gemv, mlx_ops
from mlxrouter.config import (
    Config,
    ConfigError,
    ModelOptions,
    ModelSpec,
    ServerConfig,
    SupervisorConfig,
    load_config,
    worker_environment,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No test sees the developer's ~/.mlxrouter, MLX_MODEL_DIR or MLXROUTER_CONFIG."""
    home = tmp_path / "home"
    monkeypatch.setenv("MLXROUTER_HOME", str(home))
    monkeypatch.delenv("MLX_MODEL_DIR", raising=False)
    monkeypatch.delenv("MLXROUTER_CONFIG", raising=False)
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


MAIN_TOML = """
    [server]
    host = "0.0.0.0"
    port = 9001
    max_body_bytes = 1024

    [supervisor]
    model_directory = "/srv/models"
    run_dir = "/srv/run"
    log_dir = "/srv/logs"
    default_model = "org/name"
    use_system_blas = false
    load_timeout_s = 60.0

    [defaults]
    max_tokens = 100
    temp = 0.5
    top_k = 40
    max_running = 4

    [models."org/name"]
    path = "/srv/weights/org-name"
    temp = 0.1
"""


@pytest.fixture
def full_config(tmp_path: Path) -> Path:
    main = write(tmp_path / "conf" / "supervisor.toml", MAIN_TOML)
    write(tmp_path / "conf" / "workers" / "qwen.toml", """
        id = "mlx-community/Qwen-0.5B"
        path = "qwen-weights"
        max_tokens = 2048
        env = { MY_FLAG = "1" }
    """)
    write(tmp_path / "conf" / "workers" / "llama-small.toml", """
        top_p = 0.9
    """)
    return main


# ---- TOML main file + workers/

def test_toml_with_worker_files_loads_into_frozen_structs(full_config: Path) -> None:
    config = load_config(full_config)

    assert isinstance(config, Config)
    assert config.server == ServerConfig(host="0.0.0.0", port=9001, max_body_bytes=1024)
    assert config.supervisor.model_directory == "/srv/models"
    assert config.supervisor.default_model == "org/name"
    assert config.supervisor.use_system_blas is False
    assert config.supervisor.load_timeout_s == 60.0
    assert config.model_directory == Path("/srv/models")
    assert config.run_dir == Path("/srv/run")
    assert config.log_dir == Path("/srv/logs")
    assert config.defaults == ModelOptions(max_tokens=100, temp=0.5, top_k=40, max_running=4)
    assert set(config.models) == {"org/name", "mlx-community/Qwen-0.5B", "llama-small"}
    assert config.source == str(full_config)

    for frozen in (config, config.server, config.supervisor, config.defaults,
                   config.models["org/name"]):
        field = type(frozen).__struct_fields__[0]
        with pytest.raises(AttributeError):
            setattr(frozen, field, getattr(frozen, field))


def test_worker_id_comes_from_id_key_or_file_stem(full_config: Path) -> None:
    config = load_config(full_config)
    assert config.models["mlx-community/Qwen-0.5B"].max_tokens == 2048
    assert config.models["llama-small"].top_p == 0.9
    assert "qwen" not in config.models


def test_worker_relative_path_is_resolved_against_workers_dir(full_config: Path) -> None:
    config = load_config(full_config)
    expected = (full_config.parent / "workers" / "qwen-weights").resolve()
    assert config.models["mlx-community/Qwen-0.5B"].path == str(expected)


def test_worker_absolute_and_home_paths_are_kept(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", "")
    write(tmp_path / "workers" / "a.toml", 'path = "/abs/a"\n')
    write(tmp_path / "workers" / "b.toml", 'path = "~/models/b"\n')
    config = load_config(main)
    assert config.models["a"].path == "/abs/a"
    assert config.models["b"].path == "~/models/b"
    assert config.spec_for("b").path == str(Path("~/models/b").expanduser())


def test_spec_for_merges_defaults_under_model_options(full_config: Path) -> None:
    config = load_config(full_config)
    spec = config.spec_for("org/name", "/discovered/elsewhere")
    assert isinstance(spec, ModelSpec)
    assert spec.id == "org/name"
    assert spec.path == "/srv/weights/org-name"  # configured path wins over discovered one
    assert spec.temp == 0.1  # model option beats [defaults]
    assert spec.max_tokens == 100  # from [defaults]
    assert spec.top_k == 40  # from [defaults]
    assert spec.max_running == 4
    assert spec.top_p == 1.0  # built-in default


def test_spec_for_worker_file_model(full_config: Path) -> None:
    spec = load_config(full_config).spec_for("mlx-community/Qwen-0.5B", "/ignored")
    assert spec.max_tokens == 2048
    assert spec.temp == 0.5
    assert spec.env == {"MY_FLAG": "1"}
    assert spec.path == str((full_config.parent / "workers" / "qwen-weights").resolve())


def test_spec_for_uses_discovered_path_when_none_configured(full_config: Path) -> None:
    config = load_config(full_config)
    spec = config.spec_for("llama-small", "/models/llama-small")
    assert spec.path == "/models/llama-small"
    assert spec.top_p == 0.9
    # A model only discovery knows about gets [defaults] and built-in values.
    other = config.spec_for("found/on-disk", "/models/found--on-disk")
    assert other.path == "/models/found--on-disk"
    assert other.max_tokens == 100
    assert other.engine == "mlx-lm"


def test_spec_for_without_any_path_is_a_config_error(full_config: Path) -> None:
    config = load_config(full_config)
    with pytest.raises(ConfigError, match="llama-small"):
        config.spec_for("llama-small")
    with pytest.raises(ConfigError, match="nowhere/model"):
        config.spec_for("nowhere/model", None)


def test_shipped_example_config_loads(clean_env: Path) -> None:
    config = load_config(REPO / "supervisor.toml")
    # its run and log dirs follow MLXROUTER_HOME, as its comment says (it pinned them)
    assert (config.run_dir, config.log_dir) == (clean_env / "run", clean_env / "logs")
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8800
    assert "smollm2-135m-instruct" in config.models
    spec = config.spec_for("smollm2-135m-instruct", "/models/smol")
    assert (spec.max_tokens, spec.temp) == (256, 0.2)


# ---- errors in TOML files

@pytest.mark.parametrize("text, key", [
    ("[server]\nhots = \"x\"\n", "hots"),
    ("[supervisor]\nmodel_dir = \"x\"\n", "model_dir"),
    ("[defaults]\ntemperature = 0.3\n", "temperature"),
    ("[models.\"a/b\"]\npath = \"/x\"\ncolour = 1\n", "colour"),
    ("[modles]\n", "modles"),
    ("typo = 1\n", "typo"),
])
def test_unknown_key_in_main_file_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    main = write(tmp_path / "supervisor.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert key in str(info.value)
    assert str(main) in str(info.value)


def test_unknown_key_in_worker_file_names_key_and_file(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", "")
    worker = write(tmp_path / "workers" / "m.toml", 'path = "/x"\nmax_toknes = 5\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert "max_toknes" in str(info.value)
    assert str(worker) in str(info.value)


@pytest.mark.parametrize("text, key", [
    ("[server]\nport = \"eighty\"\n", "port"),
    ("[supervisor]\nuse_system_blas = \"yes\"\n", "use_system_blas"),
    ("[supervisor]\nsystem_blas = \"mkl\"\n", "system_blas"),
    ("[supervisor]\ngemv_forward = \"yes\"\n", "gemv_forward"),
    ("[defaults]\ncompute_nice = 20\n", "compute_nice"),
    ("[defaults]\ncompute_nice = -1\n", "compute_nice"),
    ("[defaults]\nmax_tokens = 1.5\n", "max_tokens"),
    ("server = 3\n", "server"),
    ("[server]\nport = 99999\n", "port"),
    ("[server]\nmax_body_bytes = 0\n", "max_body_bytes"),
    ("[server]\nmax_body_bytes = -5\n", "max_body_bytes"),
    ("[server]\napi_keys = [\"k1\", \"\"]\n", "server.api_keys[1] is empty"),
    ("[server]\napi_keys = [\" k1 \"]\n", "server.api_keys[0] must be visible ASCII"),
    ("[server]\napi_keys = [\"k\u00e9\"]\n", "server.api_keys[0] must be visible ASCII"),
    ("[server]\nadmin_key = \"\"\n", "server.admin_key is empty"),
    # PIL opens no image over 178,956,970 pixels: a larger limit could never take effect
    ("[server]\nmax_image_pixels = 300000000\n", "max_image_pixels"),
])
def test_bad_type_in_main_file_is_a_config_error(tmp_path: Path, text: str, key: str) -> None:
    main = write(tmp_path / "supervisor.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert key in str(info.value)
    assert str(main) in str(info.value)


def test_a_key_from_the_environment_that_no_client_could_send_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = write(tmp_path / "supervisor.toml", "")
    monkeypatch.setenv("MLXROUTER_API_KEY", "two words")
    with pytest.raises(ConfigError, match="MLXROUTER_API_KEY must be visible ASCII"):
        load_config(main)
    monkeypatch.setenv("MLXROUTER_API_KEY", "sk-local_1.2~3+/=")
    assert load_config(main).server.api_keys == ["sk-local_1.2~3+/="]
    # set but empty (an undefined ${KEY} in a unit file): it ran with no authentication
    for name in ("MLXROUTER_API_KEY", "MLXROUTER_ADMIN_KEY"):
        monkeypatch.setenv("MLXROUTER_API_KEY", "sk-1")
        monkeypatch.setenv(name, "")
        with pytest.raises(ConfigError, match=f"{name} is empty"):
            load_config(main)


def test_bad_type_in_worker_file_is_a_config_error(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", "")
    worker = write(tmp_path / "workers" / "m.toml", 'temp = "hot"\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert "temp" in str(info.value)
    assert str(worker) in str(info.value)


def test_bad_engine_value_is_a_config_error(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", "")
    write(tmp_path / "workers" / "m.toml", 'engine = "vllm"\n')
    with pytest.raises(ConfigError, match="engine"):
        load_config(main)


def test_invalid_toml_syntax_is_a_config_error(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", "[server\nport = 1\n")
    with pytest.raises(ConfigError, match=str(main)):
        load_config(main)
    main.write_text("")
    worker = write(tmp_path / "workers" / "bad.toml", "id = \n")
    with pytest.raises(ConfigError, match=str(worker)):
        load_config(main)


def test_same_model_in_two_worker_files_is_an_error(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", "")
    write(tmp_path / "workers" / "a.toml", 'id = "org/m"\n')
    write(tmp_path / "workers" / "b.toml", 'id = "org/m"\n')
    with pytest.raises(ConfigError, match="org/m"):
        load_config(main)


def test_worker_id_clashing_with_another_file_stem_is_an_error(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", "")
    write(tmp_path / "workers" / "a.toml", 'id = "b"\n')
    write(tmp_path / "workers" / "b.toml", "top_k = 3\n")
    with pytest.raises(ConfigError, match="'b'"):
        load_config(main)


def test_same_model_in_main_file_and_worker_file_is_an_error(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", '[models."org/m"]\npath = "/x"\n')
    write(tmp_path / "workers" / "m.toml", 'id = "org/m"\n')
    with pytest.raises(ConfigError, match="org/m"):
        load_config(main)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


# ---- the seed project's config.json

SEED = {
    "defaults": {
        "model_directory": "/seed/models",
        "max_tokens": 4096,
        "temp": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.05,
        "cache_size": 4,
        "swap_high_percent": 85,
        "streaming_format": "sse",
        "stream_chunk_size": 8,
        "timeout": 30,
    },
    "server": {"host": "0.0.0.0", "port": 8888, "log_level": "info"},
    "models": {
        "mlx-community/Qwen3-8B-4bit": {
            "max_tokens": 8192,
            "temp": 0.7,
            "required_memory_gb": 6,
            "chat_template": "chatml",
            "trust_remote_code": False,
            "supports_tools": True,
        },
    },
}
# Seed keys accepted with a warning because they do nothing here (yet).
SEED_ONLY = ("log_level", "trust_remote_code")


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_seed_config_json_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_json(tmp_path / "config.json", SEED)
    with caplog.at_level(logging.WARNING, logger="mlxrouter.config"):
        config = load_config(path)

    assert config.server.host == "0.0.0.0"
    assert config.server.port == 8888
    assert config.model_directory == Path("/seed/models")
    assert config.defaults.max_tokens == 4096
    assert config.defaults.min_p == 0.05
    spec = config.spec_for("mlx-community/Qwen3-8B-4bit", "/seed/models/qwen")
    assert spec.max_tokens == 8192
    assert spec.temp == 0.7
    assert spec.top_p == 0.95
    assert spec.top_k == 20
    assert spec.required_memory_gb == 6.0
    assert spec.chat_template == "chatml"
    assert spec.supports_tools is True
    assert config.source == str(path)


@pytest.mark.parametrize("server, keys", [
    ({"api_key": "a"}, ["a"]),
    ({"api_keys": ["b"], "api_key": "a"}, ["b", "a"]),  # "b" was dropped: its clients got 401s
    ({"api_keys": ["a"], "api_key": "a"}, ["a"]),
    ({"api_key": ""}, []),  # an empty seed key means no key
])
def test_seed_api_key_adds_to_api_keys(tmp_path: Path, server: dict, keys: list) -> None:
    path = write_json(tmp_path / "config.json", {"server": server})
    assert load_config(path).server.api_keys == keys


def test_seed_keys_with_a_new_home_are_carried_over(tmp_path: Path) -> None:
    config = load_config(write_json(tmp_path / "config.json", SEED))
    assert config.supervisor.max_loaded_models == 4  # the seed's cache_size
    assert config.supervisor.swap_high_percent == 85
    assert config.spec_for("mlx-community/Qwen3-8B-4bit", "/x").timeout_s == 30


def test_seed_only_keys_are_warned_about_by_name(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_json(tmp_path / "config.json", SEED)
    with caplog.at_level(logging.WARNING, logger="mlxrouter.config"):
        load_config(path)
    warnings = "\n".join(r.getMessage() for r in caplog.records
                         if r.levelno >= logging.WARNING)
    for key in SEED_ONLY:
        assert key in warnings
    # Keys that mean something here are not warned about.
    for key in ("max_tokens", "top_p", "required_memory_gb", "model_directory", "cache_size",
                "streaming_format", "stream_chunk_size", "chat_template", "supports_tools"):
        assert key not in warnings


def test_seed_config_without_seed_only_keys_does_not_warn(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_json(tmp_path / "config.json",
                      {"defaults": {"max_tokens": 10}, "server": {"port": 1}})
    with caplog.at_level(logging.WARNING, logger="mlxrouter.config"):
        load_config(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("section", ["defaults", "server", "models"])
def test_seed_config_truly_unknown_key_is_an_error(tmp_path: Path, section: str) -> None:
    data = json.loads(json.dumps(SEED))
    target = data[section] if section != "models" else data["models"]["mlx-community/Qwen3-8B-4bit"]
    target["frobnicate"] = True
    path = write_json(tmp_path / "config.json", data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "frobnicate" in str(info.value)
    assert str(path) in str(info.value)


def test_seed_config_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = write_json(tmp_path / "config.json", {**SEED, "plugins": {}})
    with pytest.raises(ConfigError, match="plugins"):
        load_config(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"just a string"'])
def test_seed_config_that_is_not_an_object_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


@pytest.mark.parametrize("section, value", [("models", []), ("defaults", None)])
def test_seed_config_section_of_wrong_type_is_a_config_error(
        tmp_path: Path, section: str, value: object) -> None:
    path = write_json(tmp_path / "config.json", {**SEED, section: value})
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_seed_config_ignores_workers_dir_beside_it(tmp_path: Path) -> None:
    path = write_json(tmp_path / "config.json", SEED)
    write(tmp_path / "workers" / "x.toml", "bogus = 1\n")
    config = load_config(path)
    assert set(config.models) == {"mlx-community/Qwen3-8B-4bit"}


# ---- precedence: flag > environment > file > default

def test_defaults_without_any_config(clean_env: Path) -> None:
    config = load_config()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8800
    assert config.model_directory == Path("~/models").expanduser()
    assert config.run_dir == clean_env / "run"
    assert config.log_dir == clean_env / "logs"
    assert config.models == {}
    assert config.source == ""


def test_model_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = write(tmp_path / "supervisor.toml", '[supervisor]\nmodel_directory = "/file"\n')
    assert load_config(main).model_directory == Path("/file")
    monkeypatch.setenv("MLX_MODEL_DIR", "/env")
    assert load_config(main).model_directory == Path("/env")
    assert load_config(main, model_dir="/flag").model_directory == Path("/flag")
    monkeypatch.delenv("MLX_MODEL_DIR")
    assert load_config(main, model_dir="/flag").model_directory == Path("/flag")
    # relative to the working directory, where the user typed it (workers run in run_dir)
    monkeypatch.chdir(tmp_path)
    assert load_config(main, model_dir="mine").model_directory == tmp_path / "mine"
    monkeypatch.setenv("MLX_MODEL_DIR", "theirs")
    assert load_config(main).model_directory == tmp_path / "theirs"
    assert load_config(main).supervisor.model_directory == str(tmp_path / "theirs")


def test_model_dir_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_MODEL_DIR", "/env")
    assert load_config().model_directory == Path("/env")
    assert load_config(model_dir="~/flag").model_directory == Path("~/flag").expanduser()


def test_host_and_port_precedence(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", '[server]\nhost = "10.0.0.1"\nport = 9000\n')
    config = load_config(main)
    assert (config.server.host, config.server.port) == ("10.0.0.1", 9000)
    config = load_config(main, port=9100)
    assert (config.server.host, config.server.port) == ("10.0.0.1", 9100)
    config = load_config(main, host="0.0.0.0")
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9000)
    config = load_config(main, host="::1", port=0)
    assert (config.server.host, config.server.port) == ("::1", 0)
    config = load_config(host="192.168.1.2")
    assert (config.server.host, config.server.port) == ("192.168.1.2", 8800)


def test_mlxrouter_config_env_selects_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = write(tmp_path / "elsewhere" / "my.toml", "[server]\nport = 7777\n")
    write(tmp_path / "elsewhere" / "workers" / "w.toml", "top_k = 1\n")
    monkeypatch.setenv("MLXROUTER_CONFIG", str(main))
    config = load_config()
    assert config.server.port == 7777
    assert "w" in config.models
    assert config.source == str(main)
    # An explicit path (the --config flag) wins over the environment.
    other = write(tmp_path / "other.toml", "[server]\nport = 6666\n")
    assert load_config(other).server.port == 6666


def test_mlxrouter_config_pointing_nowhere_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXROUTER_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="missing.toml"):
        load_config()


def test_mlxrouter_home_supervisor_toml_is_used(clean_env: Path) -> None:
    write(clean_env / "supervisor.toml", "[server]\nport = 8123\n")
    config = load_config()
    assert config.server.port == 8123
    assert config.source == str(clean_env / "supervisor.toml")


def test_mlxrouter_home_sets_run_and_log_dirs_unless_the_file_does(
        tmp_path: Path, clean_env: Path) -> None:
    main = write(tmp_path / "supervisor.toml", '[supervisor]\nlog_dir = "/var/log/mlxr"\n')
    config = load_config(main)
    assert config.run_dir == clean_env / "run"
    assert config.log_dir == Path("/var/log/mlxr")


# ---- the worker's environment

OPENBLAS = ("openblas", "/usr/lib/libopenblas.so.0")

def spec(**kwargs: object) -> ModelSpec:
    return ModelSpec(id="m", path="/models/m", **kwargs)  # type: ignore[arg-type]


def make_config(use_system_blas: bool = True, system_blas: str = "auto",
                gemv_forward: bool = True, mlx_cpu_kernels: bool = True) -> Config:
    return Config(server=ServerConfig(),
                  supervisor=SupervisorConfig(use_system_blas=use_system_blas,
                                              system_blas=system_blas,  # type: ignore[arg-type]
                                              gemv_forward=gemv_forward,
                                              mlx_cpu_kernels=mlx_cpu_kernels,
                                              run_dir="/srv/mlxr/run"),
                  defaults=ModelOptions(), models={})


FORWARDER = Path("/srv/mlxr/run/lib/libmlxrouter-gemv-0123456789ab.so")
KERNELS = Path("/home/u/.cache/mlxrouter/lib/libmlxrouter-mlx-ops-0123456789ab.so")


@pytest.fixture
def linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux on x86-64, no preloads of the user's, and neither the gemv forwarder nor the MLX
    kernels to be had."""
    monkeypatch.setattr(cfg.sys, "platform", "linux")
    monkeypatch.setattr(cfg.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(gemv, "library", lambda *dirs: None)
    monkeypatch.setattr(mlx_ops, "library", lambda *dirs: None)


@pytest.fixture
def kernels(linux: None, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The MLX kernels build; returns the directories they were asked for."""
    asked: list[Path] = []
    monkeypatch.setattr(mlx_ops, "library", lambda *dirs: asked.extend(dirs) or KERNELS)
    return asked


@pytest.fixture
def forwarder(linux: None, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The gemv forwarder builds; returns the directories it was asked for."""
    asked: list[Path] = []
    monkeypatch.setattr(gemv, "library", lambda *dirs: asked.extend(dirs) or FORWARDER)
    return asked


def test_worker_environment_drops_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLXROUTER_API_KEY", "MLXROUTER_ADMIN_KEY", "OPENAI_API_KEY", "HF_TOKEN"):
        monkeypatch.setenv(name, "secret-" + name)
    monkeypatch.setenv("SOME_HARMLESS_VAR", "kept")
    env = worker_environment(make_config(), spec())
    for name in ("MLXROUTER_API_KEY", "MLXROUTER_ADMIN_KEY", "OPENAI_API_KEY", "HF_TOKEN"):
        assert name not in env
    assert not any(v.startswith("secret-") for v in env.values())
    assert env["SOME_HARMLESS_VAR"] == "kept"


def test_worker_environment_drops_legacy_hf_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret")
    env = worker_environment(make_config(), spec())
    assert "HUGGING_FACE_HUB_TOKEN" not in env


def test_worker_environment_is_offline_and_unbuffered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env = worker_environment(make_config(), spec())
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["TOKENIZERS_PARALLELISM"] == "false"


def test_worker_environment_does_not_touch_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    before = dict(os.environ)
    worker_environment(make_config(), spec(env={"X_ADDED": "1"}))
    assert dict(os.environ) == before


def test_worker_environment_preloads_system_blas_on_linux(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: OPENBLAS)
    env = worker_environment(make_config(use_system_blas=True), spec())
    assert env["LD_PRELOAD"] == "/usr/lib/libopenblas.so.0"


def test_worker_environment_gives_blis_every_core(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: ("blis", "/usr/lib/libblis.so.4"))
    monkeypatch.delenv("BLIS_NUM_THREADS", raising=False)
    monkeypatch.setattr(cfg.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    env = worker_environment(make_config(), spec())
    assert env["LD_PRELOAD"] == "/usr/lib/libblis.so.4"
    assert env["BLIS_NUM_THREADS"] == "4"
    monkeypatch.setattr(cfg.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert worker_environment(make_config(), spec())["BLIS_NUM_THREADS"] == "1"


def test_worker_environment_blis_threads_from_the_user_or_the_model_win(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: ("blis", "/usr/lib/libblis.so.4"))
    monkeypatch.setenv("BLIS_NUM_THREADS", "6")
    assert worker_environment(make_config(), spec())["BLIS_NUM_THREADS"] == "6"
    env = worker_environment(make_config(), spec(env={"BLIS_NUM_THREADS": "2"}))
    assert env["BLIS_NUM_THREADS"] == "2"


def test_worker_environment_openblas_gets_no_blis_threads(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: OPENBLAS)
    monkeypatch.delenv("BLIS_NUM_THREADS", raising=False)
    assert "BLIS_NUM_THREADS" not in worker_environment(make_config(), spec())


def test_worker_environment_asks_for_the_configured_blas(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: asked.append(which))
    worker_environment(make_config(system_blas="blis"), spec())
    assert asked == ["blis"]
    asked.clear()
    worker_environment(make_config(), spec())  # OpenBLAS for the forwarder, then any
    assert asked == ["openblas", "auto"]


def installed(*kinds: str):
    """find_system_blas as if only these kinds were installed."""
    paths = {"blis": ("blis", "/usr/lib/libblis.so.4"), "openblas": OPENBLAS}
    return lambda which: next((paths[k] for k in (kinds if which == "auto" else (which,))
                               if k in kinds), None)


def test_worker_environment_puts_the_gemv_forwarder_ahead_of_openblas(
        forwarder: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", installed("blis", "openblas"))
    monkeypatch.delenv("BLIS_NUM_THREADS", raising=False)
    env = worker_environment(make_config(), spec())
    assert env["LD_PRELOAD"].split(":") == [str(FORWARDER), "/usr/lib/libopenblas.so.0"]
    assert "BLIS_NUM_THREADS" not in env
    # built in the user's cache, else in the daemon's run directory
    assert forwarder == [cfg.cache_home() / "lib", Path("/srv/mlxr/run/lib")]
    monkeypatch.setenv("LD_PRELOAD", "/opt/libother.so")
    assert worker_environment(make_config(system_blas="openblas"), spec())["LD_PRELOAD"] == (
        f"{FORWARDER}:/usr/lib/libopenblas.so.0:/opt/libother.so")


def test_worker_environment_without_the_forwarder_prefers_blis(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", installed("blis", "openblas"))
    # no compiler (the linux fixture): BLIS; OpenBLAS when asked for or alone
    assert worker_environment(make_config(), spec())["LD_PRELOAD"] == "/usr/lib/libblis.so.4"
    assert worker_environment(make_config(system_blas="openblas"), spec())["LD_PRELOAD"] == (
        "/usr/lib/libopenblas.so.0")
    monkeypatch.setattr(cfg, "find_system_blas", installed("openblas"))
    assert worker_environment(make_config(), spec())["LD_PRELOAD"] == "/usr/lib/libopenblas.so.0"


def test_worker_environment_forwarder_turned_off_or_blis_chosen(
        forwarder: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", installed("blis", "openblas"))
    env = worker_environment(make_config(gemv_forward=False), spec())
    assert env["LD_PRELOAD"] == "/usr/lib/libblis.so.4"
    env = worker_environment(make_config(system_blas="blis"), spec())
    assert env["LD_PRELOAD"] == "/usr/lib/libblis.so.4"
    env = worker_environment(make_config(system_blas="openblas", gemv_forward=False), spec())
    assert env["LD_PRELOAD"] == "/usr/lib/libopenblas.so.0"
    assert forwarder == []  # never built when it would not be used


@pytest.fixture
def blas_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    files = {"blis": tmp_path / "libblis.so.4", "openblas": tmp_path / "libopenblas.so.0"}
    monkeypatch.setattr(cfg, "_BLAS_CANDIDATES", {k: (str(tmp_path / "missing"), str(v))
                                                  for k, v in files.items()})
    return files


def test_find_system_blas_prefers_blis_then_openblas(blas_files: dict[str, Path]) -> None:
    assert cfg.find_system_blas() is None
    blas_files["openblas"].touch()
    assert cfg.find_system_blas() == ("openblas", str(blas_files["openblas"]))
    assert cfg.find_system_blas("blis") is None
    blas_files["blis"].touch()
    assert cfg.find_system_blas() == ("blis", str(blas_files["blis"]))
    assert cfg.find_system_blas("auto") == ("blis", str(blas_files["blis"]))
    assert cfg.find_system_blas("openblas") == ("openblas", str(blas_files["openblas"]))


def test_system_blas_setting_loads(tmp_path: Path) -> None:
    # bad values: test_bad_type_in_main_file_is_a_config_error
    path = tmp_path / "supervisor.toml"
    path.write_text('[supervisor]\nsystem_blas = "openblas"\n')
    assert load_config(path).supervisor.system_blas == "openblas"


def test_worker_environment_keeps_existing_ld_preload(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: OPENBLAS)
    monkeypatch.setenv("LD_PRELOAD", "/opt/libother.so")
    env = worker_environment(make_config(use_system_blas=True), spec())
    assert env["LD_PRELOAD"].split(":") == ["/usr/lib/libopenblas.so.0", "/opt/libother.so"]


def test_worker_environment_no_blas_preload_when_disabled(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: OPENBLAS)
    env = worker_environment(make_config(use_system_blas=False), spec())
    assert "LD_PRELOAD" not in env


def test_worker_environment_no_blas_preload_when_not_installed(
        linux: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: None)
    env = worker_environment(make_config(use_system_blas=True), spec())
    assert "LD_PRELOAD" not in env


def test_worker_environment_no_blas_preload_on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg.sys, "platform", "darwin")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: OPENBLAS)
    env = worker_environment(make_config(use_system_blas=True), spec())
    assert "LD_PRELOAD" not in env


def test_worker_environment_applies_spec_env(linux: None, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: None)
    monkeypatch.setenv("SHARED", "from-daemon")
    env = worker_environment(make_config(), spec(env={"SHARED": "from-model",
                                                       "MLX_DISABLE_COMPILE": "0",
                                                       "NEW_ONE": "x"}))
    assert env["SHARED"] == "from-model"
    assert env["MLX_DISABLE_COMPILE"] == "0"
    assert env["NEW_ONE"] == "x"


def test_worker_environment_from_loaded_worker_file(
        full_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(full_config)
    model_spec = config.spec_for("mlx-community/Qwen-0.5B")
    env = worker_environment(config, model_spec)
    assert env["MY_FLAG"] == "1"


def test_config_structs_round_trip_through_msgspec(full_config: Path) -> None:
    # Config travels to the CLI / admin API as plain data; it must convert cleanly.
    config = load_config(full_config)
    again = msgspec.convert(msgspec.to_builtins(config), Config)
    assert again == config


def test_running_on_this_platform_does_not_crash() -> None:
    env = worker_environment(make_config(), spec())
    assert env["HF_HUB_OFFLINE"] == "1"
    if sys.platform == "linux":
        assert env.get("MLX_DISABLE_COMPILE") is not None


def test_memory_pressure_caps_merge_into_spec(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml",
                 "[defaults]\nmemory_pressure_max_tokens = { high = 256, critical = 64 }\n")
    spec_ = load_config(main).spec_for("m", "/models/m")
    assert spec_.memory_pressure_max_tokens == {"high": 256, "critical": 64}


def test_memory_pressure_unknown_level_is_a_config_error(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml", "")
    worker = write(tmp_path / "workers" / "m.toml",
                   "memory_pressure_max_tokens = { extreme = 5 }\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert "extreme" in str(info.value) or "memory_pressure_max_tokens" in str(info.value)
    assert str(worker) in str(info.value)


def test_seed_streaming_options_apply_per_model(tmp_path: Path) -> None:
    path = write_json(tmp_path / "config.json", {
        "server": {"streaming_format": "json_lines"}, "defaults": {"stream_chunk_size": 4},
        "models": {"m": {"path": "/m", "streaming_format": "json_array"}, "n": {"path": "/n"}}})
    config = load_config(path)
    assert config.spec_for("m").streaming_format == "json_array"
    assert config.spec_for("n").streaming_format == "json_lines"
    assert config.spec_for("n").stream_chunk_size == 4


def test_worker_environment_preloads_the_mlx_kernels_first(
        kernels: list[Path], forwarder: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", installed("blis", "openblas"))
    env = worker_environment(make_config(), spec())
    assert env["LD_PRELOAD"].split(":") == [str(KERNELS), str(FORWARDER),
                                           "/usr/lib/libopenblas.so.0"]
    assert kernels == [cfg.cache_home() / "lib", Path("/srv/mlxr/run/lib")]
    # without a system BLAS, or with it turned off, the kernels still come
    assert worker_environment(make_config(use_system_blas=False), spec())["LD_PRELOAD"] == (
        str(KERNELS))


def test_worker_environment_mlx_kernels_can_be_turned_off(
        kernels: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", installed("blis"))
    env = worker_environment(make_config(mlx_cpu_kernels=False), spec())
    assert env["LD_PRELOAD"] == "/usr/lib/libblis.so.4" and kernels == []


def test_worker_environment_no_mlx_kernels_off_x86(
        kernels: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "find_system_blas", lambda which: None)
    monkeypatch.setattr(cfg.platform, "machine", lambda: "aarch64")
    assert "LD_PRELOAD" not in worker_environment(make_config(), spec())
    assert kernels == []


def test_a_file_that_is_not_utf8_is_a_config_error_and_ctl_still_finds_the_daemon(
        tmp_path: Path) -> None:
    main = write(tmp_path / "conf" / "supervisor.toml", """
        [supervisor]
        run_dir = "/srv/run"
        [server]
        admin_key = "adm"
    """)
    latin1 = tmp_path / "conf" / "workers" / "latin1.toml"
    latin1.parent.mkdir()
    latin1.write_bytes(b"# mod\xe8le\nmax_tokens = 4\n")
    with pytest.raises(ConfigError, match="latin1.toml: not UTF-8"):
        load_config(main)
    assert cfg.control_settings(main) == (Path("/srv/run"), "adm")
    latin1.unlink()
    main.write_bytes(main.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="supervisor.toml: not UTF-8"):
        load_config(main)
    seed = tmp_path / "seed.json"
    seed.write_bytes(b'{"defaults": {}, "x": "\xe9"}')
    with pytest.raises(ConfigError, match="seed.json: not UTF-8"):
        load_config(seed)


def test_ctl_with_a_config_that_does_not_exist_is_a_usage_error(tmp_path: Path,
                                                                 clean_env: Path) -> None:
    """Not a fallback to the default run dir: a typo in --config must not reach (and shut
    down) the default daemon."""

    missing = tmp_path / "typo.toml"
    with pytest.raises(ConfigError, match="no such config file"):
        cfg.control_settings(missing)
    for args, env in ((["--config", str(missing)], {}), ([], {"MLXROUTER_CONFIG": str(missing)})):
        done = subprocess.run([sys.executable, "-m", "mlxrouter", "ctl", *args, "shutdown"],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})
        assert done.returncode == 2, done
        assert f"{missing}: no such config file" in done.stderr


@pytest.mark.parametrize("text, key", [
    ("[server]\nkeepalive_interval_s = 0\n", "keepalive_interval_s"),
    ("[server]\nstream_commit_after_s = -1\n", "stream_commit_after_s"),
    ("[supervisor]\nsilence_timeout_s = 0\n", "silence_timeout_s"),
    ("[supervisor]\nmemory_budget_gb = -5\n", "memory_budget_gb"),
    ("[supervisor]\nstart_retries = -3\n", "start_retries"),
    ("[supervisor]\nmax_loaded_models = -1\n", "max_loaded_models"),
    ("[supervisor]\nswap_high_percent = 150\n", "swap_high_percent"),
    ("[supervisor]\nload_timeout_s = 0\n", "load_timeout_s"),
    ('[server]\nhost = ""\n', "host"),  # "" listened on every interface
])
def test_nonsense_numbers_are_config_errors(tmp_path: Path, text: str, key: str) -> None:
    """keepalive 0 sent tens of thousands of keep-alives a second; a 0 silence timeout killed
    every worker as it loaded; a negative budget refused every request."""
    main = write(tmp_path / "supervisor.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert key in str(info.value)


def test_serve_refuses_an_empty_host_flag() -> None:
    done = subprocess.run([sys.executable, "-m", "mlxrouter", "serve", "--host", ""],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "an empty host would listen on every interface" in done.stderr


def test_an_error_in_a_models_table_names_the_model(tmp_path: Path) -> None:
    main = write(tmp_path / "supervisor.toml",
                 '[models."org/ok"]\nmax_tokens = 5\n[models."org/bad"]\nload_dtype = "int3"\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert '$.models["org/bad"].load_dtype' in str(info.value)


def test_ctl_with_a_main_file_that_does_not_parse_says_so(tmp_path: Path) -> None:
    """Its admin key and run dir were taken as unset: the daemon answered a 401 "a valid
    admin key is required", and `ctl reload` could not show the syntax error."""
    main = write(tmp_path / "supervisor.toml", """
        [server]
        admin_key = "adm"
    """)
    assert cfg.control_settings(main)[1] == "adm"
    main.write_text(main.read_text() + "this is [not toml\n")
    with pytest.raises(ConfigError, match=r"supervisor.toml cannot be read \(.*\); ctl finds "
                                          r"the daemon and its admin key there"):
        cfg.control_settings(main)
    seed = write(tmp_path / "config.json", '{"server": {"admin_key": "k", ')
    with pytest.raises(ConfigError, match=r"config.json cannot be read"):
        cfg.control_settings(seed)


def test_a_home_relative_template_path_is_kept_as_the_file_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"~" was expanded again in the worker, whose env may set another HOME: the file checked
    at load was not the one read (TemplateNotFound, then BACKOFF)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    main = write(tmp_path / "supervisor.toml", """
        [models.m]
        path = "/m"
        chat_template = "~/t.jinja"
        env = { HOME = "/elsewhere" }
    """)
    assert load_config(main).spec_for("m").chat_template == str(tmp_path / "t.jinja")
