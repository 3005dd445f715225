"""Where `models tune` writes: only a worker file the config loader will read, never a second
definition of a model. Checked before anything is measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxrouter.config import load_config
from mlxrouter.tune import TuneError, tune_target, update_worker_file

VALUES = {"required_memory_gb": 1.5, "max_tokens": 256,
          "memory_pressure_max_tokens": {"moderate": 128, "high": 64, "critical": 32}}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLXROUTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLXROUTER_CONFIG", raising=False)
    monkeypatch.delenv("MLX_MODEL_DIR", raising=False)
    return tmp_path / "home"


def test_a_model_defined_in_the_main_file_is_refused_before_measuring(tmp_path: Path) -> None:
    main = tmp_path / "supervisor.toml"
    main.write_text('[models."org/good"]\nmax_tokens = 100\n')
    config = load_config(main)
    with pytest.raises(TuneError, match=r"defined in .*supervisor.toml .*move that table"):
        tune_target(config, "org/good")
    assert not (tmp_path / "workers").exists()


def test_a_seed_json_config_is_refused(tmp_path: Path) -> None:
    seed = tmp_path / "config.json"
    seed.write_text(json.dumps({"models": {}}))
    with pytest.raises(TuneError, match="reads no worker files"):
        tune_target(load_config(seed), "m")


def test_a_model_of_a_worker_file_is_tuned_in_that_file(tmp_path: Path) -> None:
    (tmp_path / "supervisor.toml").write_text("")
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "mine.toml").write_text('id = "org/m"\nmax_tokens = 100\n')
    config = load_config(tmp_path / "supervisor.toml")
    assert tune_target(config, "org/m") == tmp_path / "workers" / "mine.toml"
    assert tune_target(config, "org/new") == tmp_path / "workers" / "org--new.toml"


def test_without_a_config_file_the_written_file_is_one_the_loader_reads(home: Path) -> None:
    config = load_config()
    assert config.source == ""

    file = tune_target(config, "org/m")
    update_worker_file(file, "org/m", VALUES, "test")

    assert file == home / "workers" / "org--m.toml"
    assert (home / "supervisor.toml").is_file()
    reloaded = load_config()
    assert reloaded.source == str(home / "supervisor.toml")
    spec = reloaded.spec_for("org/m", str(home / "models" / "m"))
    assert spec.max_tokens == 256 and spec.required_memory_gb == 1.5


def test_ids_that_share_a_file_name_get_their_own_worker_files(tmp_path: Path) -> None:
    """Tuning "x--y" picked x--y.toml, which held "x/y", and overwrote x/y's values."""
    from mlxrouter.tune import worker_file_for

    workers = tmp_path / "workers"
    workers.mkdir()
    (workers / "x--y.toml").write_text('id = "x/y"\nmax_tokens = 999\n')
    assert worker_file_for(workers, "x/y") == workers / "x--y.toml"
    other = worker_file_for(workers, "x--y")
    assert other != workers / "x--y.toml" and other.parent == workers
