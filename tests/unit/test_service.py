"""`mlxrouter service`: the LaunchAgent plist and systemd unit it renders, where it copies the
config, and the launchctl / systemctl commands it runs (through a fake runner: nothing real is
started, and HOME is a temporary directory)."""

from __future__ import annotations

import argparse
import configparser
import os
import plistlib
import shlex
import textwrap
from pathlib import Path

import pytest

from mlxrouter import service

REPO = Path(__file__).resolve().parents[2]
UID = os.getuid()
TARGET = f"gui/{UID}/{service.LABEL}"


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HOME is a temporary dir; no test sees the developer's ~/.mlxrouter or environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("MLXROUTER_HOME", "MLXROUTER_CONFIG", "MLX_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    return home


class FakeRunner:
    """Stands in for run_command: records argv lists, answers from a script of return codes."""

    def __init__(self, loaded: bool = False, codes: dict[str, list[int]] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.loaded = loaded
        self.codes = codes or {}

    def __call__(self, argv: list[str], *, quiet: bool = False) -> int:
        self.calls.append(list(argv))
        if argv[:2] == ["launchctl", "print"]:
            return 0 if self.loaded else 113
        if argv[:2] == ["launchctl", "bootout"]:
            self.loaded = False
        if argv[:2] == ["launchctl", "bootstrap"]:
            self.loaded = True
        script = self.codes.get(argv[1] if argv[0] == "launchctl" else argv[2], [])
        return script.pop(0) if script else 0


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> FakeRunner:
    fake = FakeRunner()
    monkeypatch.setattr(service, "run_command", fake)
    monkeypatch.setattr(service, "_sleep", lambda s: None)
    return fake


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A user's config outside HOME: supervisor.toml + workers/, with non-default timeouts."""
    root = tmp_path / "project"
    (root / "workers").mkdir(parents=True)
    (root / "supervisor.toml").write_text(textwrap.dedent("""
        [server]
        port = 9100
        [supervisor]
        model_directory = "/srv/models"
        drain_timeout_s = 45.5
        stop_timeout_s = 12.0
        """))
    (root / "workers" / "tiny.toml").write_text('max_tokens = 64\n')
    return root / "supervisor.toml"


@pytest.fixture
def exe(tmp_path: Path) -> Path:
    path = tmp_path / "venv" / "bin" / "mlxrouter"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    return path


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mlxrouter")
    service.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["service", *argv])
    return args.func(args)


def install(source: Path, exe: Path, platform: str, *extra: str) -> int:
    return cli("install", "--config", str(source), "--executable", str(exe),
               "--platform", platform, *extra)


def plist_path(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / "com.mlxrouter.daemon.plist"


def unit_path(home: Path) -> Path:
    return home / ".config" / "systemd" / "user" / "mlxrouter.service"


def read_unit(path: Path) -> tuple[configparser.ConfigParser, list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    text = path.read_text()
    parser.read_string(text)
    return parser, text.splitlines()


def systemd_words(line: str) -> list[str]:
    """ExecStart's words; shlex agrees with systemd on double quotes and backslashes."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line)]


# ---- rendering --------------------------------------------------------------------------------

def test_plist_has_the_launchd_keys(home: Path, source: Path, exe: Path, runner) -> None:
    assert install(source, exe, "darwin") == 0
    plist = plistlib.loads(plist_path(home).read_bytes())
    copied = home / ".mlxrouter" / "supervisor.toml"
    assert plist["Label"] == "com.mlxrouter.daemon"
    assert plist["ProgramArguments"] == [str(exe), "serve", "--config", str(copied)]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] > 0
    assert isinstance(plist["ExitTimeOut"], int)
    # drain 45.5 + stop 12 + hypercorn's 5 s grace + 5 s before SIGKILL + 5 s to reap
    assert plist["ExitTimeOut"] > 45.5 + 12 + 15
    assert plist["ProcessType"] == "Interactive"
    env = plist["EnvironmentVariables"]
    assert env["PATH"].split(":")[0] == str(exe.parent)
    assert "/usr/bin" in env["PATH"].split(":")
    assert env["MLXROUTER_HOME"] == str(home / ".mlxrouter")
    assert plist["WorkingDirectory"] == str(home / ".mlxrouter")
    logs = home / ".mlxrouter" / "logs"
    assert plist["StandardOutPath"] == str(logs / "launchd.out.log")
    assert plist["StandardErrorPath"] == str(logs / "launchd.err.log")
    assert logs.is_dir(), "launchd does not create the log dir itself"


def test_plist_values_are_xml_escaped(home: Path, tmp_path: Path, exe: Path, runner) -> None:
    odd = tmp_path / "a & <b>" / "supervisor.toml"
    odd.parent.mkdir()
    odd.write_text('[supervisor]\nlog_dir = "/var/log/x & <y>"\n')
    assert install(odd, exe, "darwin") == 0
    plist = plistlib.loads(plist_path(home).read_bytes())
    assert plist["StandardOutPath"] == "/var/log/x & <y>/launchd.out.log"


def test_systemd_unit_has_the_service_keys(home: Path, source: Path, exe: Path,
                                           runner) -> None:
    assert install(source, exe, "linux") == 0
    unit, lines = read_unit(unit_path(home))
    svc = unit["Service"]
    copied = home / ".mlxrouter" / "supervisor.toml"
    assert systemd_words(svc["ExecStart"]) == [str(exe), "serve", "--config", str(copied)]
    assert svc["Restart"] == "on-failure"
    assert int(svc["RestartSec"]) > 0
    assert svc["KillMode"] == "mixed"
    assert int(svc["TimeoutStopSec"]) > 45.5 + 12 + 15
    assert svc["WorkingDirectory"] == str(home / ".mlxrouter")
    env = [shlex.split(line.split("=", 1)[1])[0] for line in lines
           if line.startswith("Environment=")]
    assert f"MLXROUTER_HOME={home / '.mlxrouter'}" in env
    path = next(e for e in env if e.startswith("PATH="))[5:].split(":")
    assert path[0] == str(exe.parent) and "/usr/bin" in path
    assert unit["Install"]["WantedBy"] == "default.target"


def test_systemd_quotes_spaces_percent_and_dollar() -> None:
    spec = service.ServiceSpec(program=["/opt/my apps/mlx$router"], config="/c/100%.toml",
                               state_dir="/s", log_dir="/l", path_env="/bin",
                               stop_timeout_s=60)
    line = next(x for x in service.render_unit(spec).splitlines() if x.startswith("ExecStart="))
    assert "%%" in line and "$$" in line
    assert systemd_words(line.split("=", 1)[1]) == [
        "/opt/my apps/mlx$router", "serve", "--config", "/c/100%.toml"]


def test_stop_timeout_outlasts_a_graceful_shutdown() -> None:
    sup = service.SupervisorConfig(drain_timeout_s=30.0, stop_timeout_s=10.0)
    assert service.stop_timeout_s(sup) > 30 + 10 + 5
    assert service.stop_timeout_s(service.SupervisorConfig(drain_timeout_s=0.2,
                                                           stop_timeout_s=0.1)) >= 6


def test_launchd_template_file_matches_what_is_rendered() -> None:
    """launchd/ holds the plist as documentation; plistlib in service.py is the one source."""
    shipped = plistlib.loads((REPO / "launchd" / "com.mlxrouter.daemon.plist.template")
                             .read_bytes())
    rendered = plistlib.loads(service.render_plist(service.template_spec()))
    assert shipped == rendered


# ---- install ------------------------------------------------------------------------------------

def test_dry_run_prints_file_and_commands_and_writes_nothing(
        home: Path, source: Path, exe: Path, runner, capsys) -> None:
    for platform in ("darwin", "linux"):
        assert install(source, exe, platform, "--dry-run") == 0
        out = capsys.readouterr().out
        assert "serve" in out and str(home / ".mlxrouter" / "supervisor.toml") in out
        assert f"copy {source}" in out
        if platform == "darwin":
            assert "<key>ExitTimeOut</key>" in out
            assert f"launchctl bootstrap gui/{UID} {plist_path(home)}" in out
            assert f"launchctl bootout {TARGET}" in out
        else:
            assert "KillMode=mixed" in out
            for cmd in ("daemon-reload", "enable mlxrouter.service",
                        "restart mlxrouter.service"):
                assert f"systemctl --user {cmd}" in out
    assert runner.calls == []
    assert list(home.iterdir()) == []


def test_install_linux_copies_config_writes_unit_and_runs_systemctl(
        home: Path, source: Path, exe: Path, runner, capsys) -> None:
    assert install(source, exe, "linux") == 0
    state = home / ".mlxrouter"
    assert (state / "supervisor.toml").read_text() == source.read_text()
    assert (state / "workers" / "tiny.toml").read_text() == "max_tokens = 64\n"
    assert unit_path(home).is_file()
    assert runner.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "mlxrouter.service"],
        ["systemctl", "--user", "restart", "mlxrouter.service"],
    ]
    out = capsys.readouterr().out
    assert f"copied from {source}" in out
    assert "mlxrouter ctl reload" in out and "kill -HUP" in out


def test_install_darwin_bootstraps(home: Path, source: Path, exe: Path, runner) -> None:
    assert install(source, exe, "darwin") == 0
    assert runner.calls == [
        ["launchctl", "print", TARGET],
        ["launchctl", "bootstrap", f"gui/{UID}", str(plist_path(home))],
    ]


def test_reinstall_darwin_boots_out_waits_and_retries_bootstrap(
        home: Path, source: Path, exe: Path, runner) -> None:
    runner.loaded = True
    runner.codes = {"bootstrap": [5, 5, 0]}  # EIO while launchd releases the label
    assert install(source, exe, "darwin") == 0
    bootstrap = ["launchctl", "bootstrap", f"gui/{UID}", str(plist_path(home))]
    assert runner.calls == [
        ["launchctl", "print", TARGET],
        ["launchctl", "bootout", TARGET],
        ["launchctl", "print", TARGET],
        bootstrap, bootstrap, bootstrap,
    ]


def test_install_reports_a_failed_command(home: Path, source: Path, exe: Path, runner,
                                          capsys) -> None:
    runner.codes = {"enable": [1]}
    assert install(source, exe, "linux") == 1
    assert ["systemctl", "--user", "restart", "mlxrouter.service"] not in runner.calls
    out = capsys.readouterr()
    assert "failed" in out.err and "service uninstall" in out.err
    assert "ctl reload" not in out.out  # no success summary for a service that is not running


def test_install_moves_a_different_existing_config_aside(
        home: Path, source: Path, exe: Path, runner) -> None:
    state = home / ".mlxrouter"
    (state / "workers").mkdir(parents=True)
    (state / "supervisor.toml").write_text("[server]\nport = 1234\n")
    (state / "workers" / "old.toml").write_text("max_tokens = 1\n")
    assert install(source, exe, "linux") == 0
    assert (state / "supervisor.toml").read_text() == source.read_text()
    assert sorted(p.name for p in (state / "workers").iterdir()) == ["tiny.toml"]
    [old_main] = state.glob("supervisor.toml.bak-*")
    assert old_main.read_text() == "[server]\nport = 1234\n"
    [old_workers] = state.glob("workers.bak-*")
    assert (old_workers / "old.toml").is_file()
    # the same config again: nothing more is moved aside
    assert install(source, exe, "linux") == 0
    assert len(list(state.glob("*.bak-*"))) == 2


def test_a_seed_config_json_stays_the_service_config_on_reinstall(
        home: Path, source: Path, exe: Path, tmp_path: Path, runner) -> None:
    """Installing a config.json left the old supervisor.toml beside it, and `service install`
    again (as service.md says after changing drain_timeout_s) went back to that one, or to a
    new default config, without a word."""
    state = home / ".mlxrouter"
    assert install(source, exe, "linux") == 0  # a TOML config first
    seed = tmp_path / "seed" / "config.json"
    seed.parent.mkdir()
    seed.write_text('{"server": {"port": 9200}}')

    assert install(seed, exe, "linux") == 0
    assert cli("install", "--executable", str(exe), "--platform", "linux") == 0

    unit, _ = read_unit(unit_path(home))
    assert systemd_words(unit["Service"]["ExecStart"])[-2:] == [
        "--config", str(state / "config.json")]
    assert not (state / "supervisor.toml").exists() and not (state / "workers").exists()
    assert len(list(state.glob("supervisor.toml.bak-*"))) == 1
    assert len(list(state.glob("workers.bak-*"))) == 1
    assert service.load_config(None).server.port == 9200  # what `ctl` and `models` read too


def test_install_in_place_when_config_is_already_the_user_one(
        home: Path, exe: Path, runner) -> None:
    user = home / ".mlxrouter" / "supervisor.toml"
    user.parent.mkdir()
    user.write_text("[supervisor]\ndrain_timeout_s = 100.0\n")
    assert cli("install", "--executable", str(exe), "--platform", "linux") == 0
    assert user.read_text() == "[supervisor]\ndrain_timeout_s = 100.0\n"
    unit, _ = read_unit(unit_path(home))
    assert int(unit["Service"]["TimeoutStopSec"]) > 100 + 10 + 5
    assert list(user.parent.glob("*.bak-*")) == []


def test_a_config_json_installed_in_place_sends_the_other_main_file_aside(
        home: Path, exe: Path, runner, capsys) -> None:
    """In place, nothing went aside: the supervisor.toml beside it stayed, and the next bare
    `service install` switched the service to it."""
    state = home / ".mlxrouter"
    state.mkdir()
    (state / "config.json").write_text('{"server": {"port": 18899}}')
    (state / "supervisor.toml").write_text("[server]\nport = 18877\n")
    assert install(state / "config.json", exe, "linux") == 0
    assert cli("install", "--executable", str(exe), "--platform", "linux") == 0
    unit, _ = read_unit(unit_path(home))
    assert systemd_words(unit["Service"]["ExecStart"])[-2:] == [
        "--config", str(state / "config.json")]
    assert not (state / "supervisor.toml").exists()
    assert len(list(state.glob("supervisor.toml.bak-*"))) == 1
    out = capsys.readouterr().out
    assert "workers/" not in out and "its models section" in out  # JSON reads no workers/


def test_a_link_to_the_config_in_the_state_dir_is_replaced_by_a_copy(
        home: Path, source: Path, exe: Path, runner) -> None:
    """A ~/.mlxrouter/supervisor.toml linked to the config counted as "in place": the service
    read ~/.mlxrouter/workers/ (none), not the config's own workers/*.toml."""
    state = home / ".mlxrouter"
    state.mkdir()
    (state / "supervisor.toml").symlink_to(source)
    assert install(source, exe, "linux") == 0
    installed = state / "supervisor.toml"
    assert not installed.is_symlink() and installed.read_text() == source.read_text()
    assert source.exists() and (state / "workers" / "tiny.toml").is_file()
    assert "tiny" in service.load_config(installed).models


def test_a_link_elsewhere_to_the_installed_config_installs_it_in_place(
        home: Path, tmp_path: Path, exe: Path, runner) -> None:
    """Not in place by name, it was copied onto itself (SameFileError, exit 1) after the
    live workers/ had been moved aside."""
    state = home / ".mlxrouter"
    (state / "workers").mkdir(parents=True)
    (state / "supervisor.toml").write_text("[server]\nport = 9300\n")
    (state / "workers" / "m.toml").write_text('path = "/m"\n')
    link = tmp_path / "proj" / "supervisor.toml"
    link.parent.mkdir()
    link.symlink_to(state / "supervisor.toml")
    assert install(link, exe, "linux") == 0
    assert (state / "workers" / "m.toml").is_file() and not list(state.glob("*.bak-*"))


def test_install_reads_the_config_without_the_shells_settings(
        home: Path, tmp_path: Path, exe: Path, runner, capsys, monkeypatch) -> None:
    """MLX_MODEL_DIR in the installing shell hid a model_directory relative to the config
    (both loads took the variable), and the installed service, which never sees it, read
    ~/.mlxrouter/models."""
    cfg = tmp_path / "rel" / "supervisor.toml"
    cfg.parent.mkdir()
    cfg.write_text('[supervisor]\nmodel_directory = "models"\n')
    monkeypatch.setenv("MLX_MODEL_DIR", str(tmp_path / "anything"))
    monkeypatch.setenv("MLXROUTER_API_KEY", "sk-shell")
    assert install(cfg, exe, "linux") == 2
    err = capsys.readouterr().err
    assert "model_directory" in err and "MLX_MODEL_DIR is set in this shell" in err
    assert "MLXROUTER_API_KEY is set in this shell" in err
    assert os.environ["MLX_MODEL_DIR"] == str(tmp_path / "anything")  # put back
    # said only of what the config does not hold as well
    held = tmp_path / "held" / "supervisor.toml"
    held.parent.mkdir()
    held.write_text(f'[server]\napi_keys = ["sk-shell"]\n[supervisor]\n'
                    f'model_directory = "{tmp_path / "anything"}"\n')
    assert install(held, exe, "linux") == 0
    assert "is set in this shell" not in capsys.readouterr().err


def test_install_without_config_writes_a_default_one(home: Path, exe: Path, runner) -> None:
    assert cli("install", "--executable", str(exe), "--platform", "linux") == 0
    user = home / ".mlxrouter" / "supervisor.toml"
    assert user.read_text() == service.STUB_CONFIG
    service.load_config(user)  # valid
    unit, _ = read_unit(unit_path(home))
    assert systemd_words(unit["Service"]["ExecStart"])[-2:] == ["--config", str(user)]


def test_install_uses_mlxrouter_config_from_the_environment(
        home: Path, source: Path, exe: Path, runner, monkeypatch) -> None:
    monkeypatch.setenv("MLXROUTER_CONFIG", str(source))
    assert cli("install", "--executable", str(exe), "--platform", "linux") == 0
    assert (home / ".mlxrouter" / "supervisor.toml").read_text() == source.read_text()


@pytest.mark.parametrize("key", ["model_directory", "hf_cache_dir", "lmstudio_dir"])
def test_install_refuses_paths_relative_to_the_config(
        home: Path, tmp_path: Path, exe: Path, runner, capsys, key: str) -> None:
    cfg = tmp_path / "rel" / "supervisor.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[supervisor]\n{key} = "somewhere"\n')
    assert install(cfg, exe, "linux") == 2
    assert key in capsys.readouterr().err
    assert runner.calls == [] and list(home.iterdir()) == []


def test_install_rejects_a_bad_config_or_executable(
        home: Path, tmp_path: Path, source: Path, exe: Path, runner, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nnope = 1\n")
    assert install(bad, exe, "linux") == 2
    assert "nope" in capsys.readouterr().err
    assert install(source, tmp_path / "missing", "linux") == 2
    assert runner.calls == [] and list(home.iterdir()) == []


def test_default_program_is_this_environment() -> None:
    program = service.default_program()
    assert Path(program[0]).is_absolute()
    assert program[1:] in ([], ["-m", "mlxrouter"])


# ---- uninstall, status, restart ---------------------------------------------------------------

def test_uninstall_linux_disables_and_removes(home: Path, source: Path, exe: Path,
                                              runner) -> None:
    install(source, exe, "linux")
    runner.calls.clear()
    assert cli("uninstall", "--platform", "linux") == 0
    assert not unit_path(home).exists()
    assert (home / ".mlxrouter" / "supervisor.toml").exists(), "the config stays"
    assert runner.calls == [["systemctl", "--user", "disable", "--now", "mlxrouter.service"],
                            ["systemctl", "--user", "daemon-reload"]]


def test_uninstall_darwin_boots_out_and_removes(home: Path, source: Path, exe: Path,
                                                runner) -> None:
    install(source, exe, "darwin")
    runner.calls.clear()
    assert cli("uninstall", "--platform", "darwin") == 0
    assert not plist_path(home).exists()
    assert runner.calls == [["launchctl", "print", TARGET], ["launchctl", "bootout", TARGET]]


def test_uninstall_keeps_the_file_when_stopping_fails(home: Path, source: Path, exe: Path,
                                                      runner) -> None:
    install(source, exe, "linux")
    runner.codes = {"disable": [1]}
    assert cli("uninstall", "--platform", "linux") == 1
    assert unit_path(home).exists()


def test_uninstall_dry_run_and_not_installed(home: Path, source: Path, exe: Path, runner,
                                             capsys) -> None:
    assert cli("uninstall", "--platform", "linux") == 0
    assert "not installed" in capsys.readouterr().out
    install(source, exe, "linux")
    runner.calls.clear()
    assert cli("uninstall", "--platform", "linux", "--dry-run") == 0
    assert "systemctl --user disable --now mlxrouter.service" in capsys.readouterr().out
    assert unit_path(home).exists() and runner.calls == []


@pytest.mark.parametrize("platform, expected", [
    ("linux", ["systemctl", "--user", "--no-pager", "status", "mlxrouter.service"]),
    ("darwin", ["launchctl", "print", TARGET]),
])
def test_status_runs_the_service_manager(home: Path, source: Path, exe: Path, runner,
                                         platform: str, expected: list[str]) -> None:
    assert cli("status", "--platform", platform) == service.NOT_INSTALLED
    install(source, exe, platform)
    runner.calls.clear()
    assert cli("status", "--platform", platform) == 0
    assert runner.calls == [expected]


def test_status_passes_on_the_exit_code(home: Path, source: Path, exe: Path, runner) -> None:
    install(source, exe, "linux")
    runner.codes = {"--no-pager": [3]}  # systemctl: inactive
    assert cli("status", "--platform", "linux") == 3


def test_restart_linux(home: Path, source: Path, exe: Path, runner) -> None:
    assert cli("restart", "--platform", "linux") == 1  # not installed
    install(source, exe, "linux")
    runner.calls.clear()
    assert cli("restart", "--platform", "linux") == 0
    assert runner.calls == [["systemctl", "--user", "restart", "mlxrouter.service"]]


def test_restart_darwin_kickstarts_or_bootstraps(home: Path, source: Path, exe: Path,
                                                 runner) -> None:
    install(source, exe, "darwin")
    runner.calls.clear()
    assert cli("restart", "--platform", "darwin") == 0
    assert runner.calls == [["launchctl", "print", TARGET],
                            ["launchctl", "kickstart", "-k", TARGET]]
    runner.calls.clear()
    runner.loaded = False  # booted out by hand: load it again
    assert cli("restart", "--platform", "darwin") == 0
    assert runner.calls == [["launchctl", "print", TARGET],
                            ["launchctl", "bootstrap", f"gui/{UID}", str(plist_path(home))]]


def test_restart_and_status_dry_run_run_nothing(home: Path, runner, capsys) -> None:
    assert cli("restart", "--platform", "darwin", "--dry-run") == 0
    assert cli("status", "--platform", "linux", "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"launchctl kickstart -k {TARGET}" in out
    assert "systemctl --user --no-pager status mlxrouter.service" in out
    assert runner.calls == []


def test_run_command_reports_a_missing_program(capsys) -> None:
    assert service.run_command(["mlxrouter-no-such-program"]) == 127
    assert "not found" in capsys.readouterr().err


def test_install_reports_a_file_it_cannot_write(home: Path, source: Path, exe: Path, runner,
                                               capsys) -> None:
    (home / ".config").write_text("not a directory")
    assert install(source, exe, "linux") == 1
    assert ".config" in capsys.readouterr().err
    assert runner.calls == []
