"""`mlxrouter service`: run the daemon under launchd (macOS) or systemd --user (Linux).

Owns the service files (a LaunchAgent plist, a systemd user unit) and the service manager
commands that load, restart, query and remove them. Runs in the user's shell, never in the
daemon; imports no mlx. Home comes from `Path.home()` and the state dir from the config module,
so tests point both at a temporary HOME. Every launchctl / systemctl call goes through
`run_command`, the one place a test replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import math
import os
import plistlib
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from .config import (
    Config,
    ConfigError,
    SupervisorConfig,
    state_home,
    default_config_path,
    load_config,
)

LABEL = "com.mlxrouter.daemon"
UNIT_NAME = "mlxrouter.service"
PLATFORMS = ("darwin", "linux")
# launchd starts a crashed daemon again at most this often.
THROTTLE_INTERVAL_S = 10
RESTART_SEC = 5
# A shutdown takes drain_timeout_s + hypercorn's 5 s grace + the supervisor's stop_timeout_s + 5
# before SIGKILL + up to 5 s to reap: launchd and systemd must wait longer than that.
SHUTDOWN_MARGIN_S = 20
# launchd's default of 256 open files is too few for a server with many clients.
OPEN_FILES = 4096
# `launchctl bootstrap` fails with EIO (5) or EINPROGRESS (37) for a few seconds after a bootout
# while launchd releases the label.
BOOTSTRAP_RETRY_CODES = (5, 37)
BOOTSTRAP_ATTEMPTS = 15
NOT_INSTALLED = 4  # systemctl's "no such unit"

STUB_CONFIG = """\
# mlxrouter configuration, written by `mlxrouter service install` because no config was given.
# Every key is optional; unset keys take their defaults (the repository's supervisor.toml lists
# them all). Per-model files go in workers/*.toml beside this file. After editing, apply the
# change with `mlxrouter ctl reload`.

[server]

[supervisor]

[defaults]
"""

_sleep = time.sleep
_monotonic = time.monotonic


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a service file says, as strings: rendered the same on every platform."""

    program: list[str]
    config: str
    state_dir: str
    log_dir: str
    path_env: str
    stop_timeout_s: int

    @property
    def arguments(self) -> list[str]:
        return [*self.program, "serve", "--config", self.config]

    @property
    def environment(self) -> dict[str, str]:
        return {"PATH": self.path_env, "MLXROUTER_HOME": self.state_dir}


def stop_timeout_s(sup: SupervisorConfig) -> int:
    """launchd ExitTimeOut / systemd TimeoutStopSec for this config."""
    return math.ceil(sup.drain_timeout_s + sup.stop_timeout_s) + SHUTDOWN_MARGIN_S


def service_path_env(bin_dir: str, platform: str) -> str:
    """PATH for the daemon: launchd and systemd give services a bare one."""
    dirs = [bin_dir, "/usr/local/bin", "/usr/bin", "/bin"]
    if platform == "darwin":
        dirs[1:1] = ["/opt/homebrew/bin"]
        dirs += ["/usr/sbin", "/sbin"]
    return ":".join(dict.fromkeys(dirs))


def default_program() -> list[str]:
    """The `mlxrouter` script of this environment, else this interpreter with -m."""
    script = Path(sys.executable).absolute().parent / "mlxrouter"
    if script.is_file():
        return [str(script)]
    return [str(Path(sys.executable).absolute()), "-m", "mlxrouter"]


def build_spec(config: Config, config_path: Path, program: list[str], state_dir: Path,
               platform: str) -> ServiceSpec:
    return ServiceSpec(program=program, config=str(config_path), state_dir=str(state_dir),
                       log_dir=str(config.log_dir),
                       path_env=service_path_env(str(Path(program[0]).parent), platform),
                       stop_timeout_s=stop_timeout_s(config.supervisor))


def template_spec() -> ServiceSpec:
    """What launchd/com.mlxrouter.daemon.plist.template shows: placeholders, default timeouts."""
    return ServiceSpec(program=["${executable}"], config="${config}", state_dir="${state_dir}",
                       log_dir="${log_dir}", path_env=service_path_env("${bin_dir}", "darwin"),
                       stop_timeout_s=stop_timeout_s(SupervisorConfig()))


def render_plist(spec: ServiceSpec) -> bytes:
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": spec.arguments,
        "WorkingDirectory": spec.state_dir,
        "EnvironmentVariables": spec.environment,
        "RunAtLoad": True,
        # Restart after a crash (non-zero exit or a signal), not after `ctl shutdown` (exit 0).
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_INTERVAL_S,
        "ExitTimeOut": spec.stop_timeout_s,
        # Unset means "light resource limits": throttled CPU, I/O and GPU work for the daemon and
        # every worker it spawns.
        "ProcessType": "Interactive",
        "SoftResourceLimits": {"NumberOfFiles": OPEN_FILES},
        "StandardOutPath": f"{spec.log_dir}/launchd.out.log",
        "StandardErrorPath": f"{spec.log_dir}/launchd.err.log",
    })


def _systemd_arg(value: str) -> str:
    """One ExecStart word: % and $ are specifiers / variables to systemd."""
    value = value.replace("%", "%%").replace("$", "$$")
    if value and all(c.isalnum() or c in "_./:=+,@-%$" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_env(name: str, value: str) -> str:
    text = f"{name}={value}".replace("%", "%%")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(spec: ServiceSpec) -> str:
    lines = [
        "# Written by `mlxrouter service install`: run it again instead of editing this file.",
        "[Unit]",
        "Description=mlxrouter: OpenAI-compatible inference server for MLX models",
        "",
        "[Service]",
        "ExecStart=" + " ".join(_systemd_arg(a) for a in spec.arguments),
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WorkingDirectory=" + spec.state_dir.replace("%", "%%"),
        *(f"Environment={_systemd_env(k, v)}" for k, v in spec.environment.items()),
        "# Restart after a crash (non-zero exit or a signal), not after `ctl shutdown` (exit 0).",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "# SIGTERM goes to the daemon only: it drains requests, then stops and reaps its workers.",
        "KillMode=mixed",
        "# Longer than drain_timeout_s + stop_timeout_s + 5, so a draining daemon is not killed.",
        f"TimeoutStopSec={spec.stop_timeout_s}",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def service_file(platform: str, home: Path) -> Path:
    if platform == "darwin":
        return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    return home / ".config" / "systemd" / "user" / UNIT_NAME


def current_platform() -> str | None:
    if sys.platform == "darwin":
        return "darwin"
    return "linux" if sys.platform.startswith("linux") else None


def run_command(argv: list[str], *, quiet: bool = False) -> int:
    """Run one launchctl / systemctl command; its output goes to the terminal unless quiet."""
    sink = subprocess.DEVNULL if quiet else None
    try:
        return subprocess.run(argv, check=False, stdout=sink, stderr=sink).returncode
    except FileNotFoundError:
        if not quiet:
            print(f"mlxrouter: {argv[0]}: command not found", file=sys.stderr)
        return 127


# ---- config copy -------------------------------------------------------------------------

def _config_name(src: Path) -> str:
    return "config.json" if src.suffix == ".json" else "supervisor.toml"


def _config_files(src: Path) -> list[tuple[Path, str]]:
    """(file, name under the state dir): the main file plus workers/*.toml for TOML configs."""
    files = [(src, _config_name(src))]
    if src.suffix != ".json":
        files += [(f, f"workers/{f.name}") for f in sorted((src.parent / "workers").glob("*.toml"))]
    return files


def _copy_config(src: Path, dest_dir: Path) -> None:
    for file, name in _config_files(src):
        (dest_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, dest_dir / name)


def _relocation_problems(src: Path, loaded: Config) -> list[str]:
    """Settings whose meaning changes when the config moves: paths relative to its file."""
    with tempfile.TemporaryDirectory() as tmp:
        _copy_config(src, Path(tmp))
        moved = load_config(Path(tmp) / _config_name(src))
    problems = [k for k in ("model_directory", "run_dir", "log_dir", "hf_cache_dir",
                            "lmstudio_dir")
                if getattr(moved.supervisor, k) != getattr(loaded.supervisor, k)]
    problems += [f"path of model {m!r}" for m, opts in loaded.models.items()
                 if moved.models.get(m) != opts]
    return problems


def _stale(src: Path, dest_dir: Path) -> list[Path]:
    """What the copy would replace with different content; it is moved aside, not lost."""
    main = dest_dir / _config_name(src)
    # a link there is replaced by the copy, not written through
    stale = [main] if main.is_symlink() or (
        main.exists() and not filecmp.cmp(src, main, shallow=False)) else []
    # the other kind of main file goes aside too: with both there, the next install or any
    # command without --config would take supervisor.toml over the config.json installed
    other = dest_dir / ("supervisor.toml" if src.suffix == ".json" else "config.json")
    stale += [other] if other.exists() else []
    workers = dest_dir / "workers"
    if src.suffix == ".json" and workers.is_dir() and any(workers.glob("*.toml")):
        stale.append(workers)  # a config.json never reads workers/
    elif src.suffix != ".json" and workers.is_dir():
        ours = {p.name: p for p, _ in _config_files(src)[1:]}
        theirs = {p.name: p for p in workers.glob("*.toml")}
        if ours.keys() != theirs.keys() or any(
                not filecmp.cmp(ours[n], theirs[n], shallow=False) for n in ours):
            stale.append(workers)
    return stale


def _install_config(src: Path | None, dest: Path, dry_run: bool, copy: bool = True) -> None:
    """Put the config at `dest` (the user-level one), moving aside what it replaces; with
    `copy` false it is there already (in place), and only the other kind of main file and,
    for a config.json, workers/ go aside."""
    verb = "would " if dry_run else ""
    if src is None:
        print(f"{'would write' if dry_run else 'wrote'} a default config to {dest}")
        if not dry_run:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(STUB_CONFIG)
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for old in _stale(src, dest.parent):
        backup = old.with_name(f"{old.name}.bak-{stamp}")
        while backup.exists():
            backup = backup.with_name(backup.name + "-1")
        print(f"{verb}move {old} aside to {backup}")
        if not dry_run:
            old.rename(backup)
    if not copy:
        return
    for file, name in _config_files(src):
        print(f"{verb}copy {file} -> {dest.parent / name}")
    if not dry_run:
        _copy_config(src, dest.parent)


# ---- service manager steps ----------------------------------------------------------------

def _step(argv: list[str], dry_run: bool, note: str = "") -> int:
    print(shlex.join(argv) + (f"   # {note}" if note else ""))
    return 0 if dry_run else run_command(argv)


def _launchd_domain() -> str:
    return f"gui/{os.getuid()}"


def _launchd_target() -> str:
    return f"{_launchd_domain()}/{LABEL}"


def _launchd_loaded() -> bool:
    return run_command(["launchctl", "print", _launchd_target()], quiet=True) == 0


def _launchd_wait_unloaded(timeout_s: float) -> bool:
    deadline = _monotonic() + timeout_s
    while _launchd_loaded():
        if _monotonic() > deadline:
            return False
        _sleep(0.5)
    return True


def _launchd_bootstrap(plist: Path, dry_run: bool) -> int:
    argv = ["launchctl", "bootstrap", _launchd_domain(), str(plist)]
    if dry_run:
        return _step(argv, dry_run)
    print(shlex.join(argv))
    for attempt in range(BOOTSTRAP_ATTEMPTS):
        last = attempt == BOOTSTRAP_ATTEMPTS - 1
        rc = run_command(argv, quiet=not last)
        if rc not in BOOTSTRAP_RETRY_CODES or last:
            return rc
        _sleep(1.0)
    return rc


def _launchd_load(plist: Path, timeout_s: int, dry_run: bool) -> int:
    """(Re)load the job, so launchd reads the plist again: bootout if loaded, then bootstrap."""
    bootout = ["launchctl", "bootout", _launchd_target()]
    if dry_run:
        _step(bootout, dry_run, "only if already loaded; then wait until it has exited")
    elif _launchd_loaded():
        _step(bootout, dry_run)
        if not _launchd_wait_unloaded(timeout_s + 10):
            print(f"mlxrouter: {LABEL} is still loaded after {timeout_s + 10} s",
                  file=sys.stderr)
            return 1
    return _launchd_bootstrap(plist, dry_run)


def _systemctl(*args: str) -> list[str]:
    return ["systemctl", "--user", *args]


# ---- commands --------------------------------------------------------------------------------

class _Source(NamedTuple):
    src: Path | None  # the config given, or None: a default one is written
    dest: Path  # the user-level config the service runs with
    config: Config

    @property
    def in_place(self) -> bool:
        # the file the service reads already: a link at dest to a config elsewhere is not
        # (its workers/ and relative paths are the other directory's: it is copied), a link
        # elsewhere to dest is (copying it onto itself failed after workers/ went aside)
        return (self.src is not None and self.dest.exists() and not self.dest.is_symlink()
                and self.src.resolve() == self.dest.resolve())

    @property
    def origin(self) -> str:
        if self.src is None:
            return "a default config"
        return "in place" if self.in_place else f"copied from {self.src}"


def _locate_config(config_path: Path | None, state_dir: Path) -> _Source:
    """Load the config to install and check it means the same once copied (ConfigError if not)."""
    src = config_path or default_config_path()
    src = src.expanduser().absolute() if src is not None else None
    dest = state_dir / (_config_name(src) if src is not None else "supervisor.toml")
    source = _Source(src, dest, load_config(src))
    if src is not None and not source.in_place:
        problems = _relocation_problems(src, source.config)
        if problems:
            raise ConfigError(f"{src} has paths relative to its own directory that would change "
                              f"when copied to {state_dir}: {', '.join(problems)}; make them "
                              "absolute (or ~/...)")
    return source


# Settings a shell may hold that the service never sees (service.md): the config to install
# is read without them, as the service will read it.
_SHELL_ONLY = {
    "MLX_MODEL_DIR": "set model_directory in the config",
    "MLXROUTER_API_KEY": "put the key in the config's [server] api_keys, or the service runs "
                         "without it",
    "MLXROUTER_ADMIN_KEY": "put the key in the config's [server] admin_key, or the service "
                           "runs without it",
}


@contextlib.contextmanager
def _as_the_service_sees_it() -> Iterator[dict[str, str]]:
    """The environment without `_SHELL_ONLY`'s variables (what it yields: their values)."""
    saved = {k: os.environ.pop(k) for k in _SHELL_ONLY if k in os.environ}
    try:
        yield saved
    finally:
        os.environ.update(saved)


def _unseen(shell: dict[str, str], config: Config) -> list[str]:
    """The shell's settings the service would miss: those the config does not hold too."""
    held = {"MLX_MODEL_DIR": lambda v: Path(v).expanduser().absolute() == config.model_directory,
            "MLXROUTER_API_KEY": lambda v: v in config.server.api_keys,
            "MLXROUTER_ADMIN_KEY": lambda v: v == config.server.admin_key}
    return [name for name, value in shell.items() if not held[name](value)]


def install(*, config_path: Path | None, program: list[str] | None, platform: str,
            dry_run: bool) -> int:
    """Copy the config to the state dir, write the service file, load and start it."""
    state_dir = state_home()
    with _as_the_service_sees_it() as shell:
        try:
            source = _locate_config(config_path, state_dir)
        except ConfigError as exc:
            source = None
            error = exc
        for name in _unseen(shell, source.config) if source is not None else shell:
            print(f"mlxrouter: {name} is set in this shell, but the service does not see it: "
                  f"{_SHELL_ONLY[name]}", file=sys.stderr)
        if source is None:
            print(f"mlxrouter: config error: {error}", file=sys.stderr)
            return 2
    program = program or default_program()
    if not Path(program[0]).is_file():
        print(f"mlxrouter: executable {program[0]} not found", file=sys.stderr)
        return 2
    spec = build_spec(source.config, source.dest, program, state_dir, platform)
    unit = service_file(platform, Path.home())
    data = render_plist(spec) if platform == "darwin" else render_unit(spec).encode()
    if dry_run:
        print("# dry run: nothing is written or run")
    try:
        # in place: what is stale is judged against the file the service reads
        _install_config(source.dest if source.in_place else source.src, source.dest, dry_run,
                        copy=not source.in_place)
        if dry_run:
            print(f"would write {unit}:\n{data.decode()}")
        else:
            Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
            _write_atomic(unit, data)
            print(f"wrote {unit}")
    except OSError as exc:
        print(f"mlxrouter: {exc}", file=sys.stderr)
        return 1
    if platform == "darwin":
        rc = _launchd_load(unit, spec.stop_timeout_s, dry_run)
    else:
        rc = _step(_systemctl("daemon-reload"), dry_run)
        rc = rc or _step(_systemctl("enable", UNIT_NAME), dry_run)
        # restart, not start: a reinstall must replace a running daemon with the new unit.
        rc = rc or _step(_systemctl("restart", UNIT_NAME), dry_run)
    if rc:  # (no "how to change the config" summary: nothing runs it)
        manager = "launchd" if platform == "darwin" else "systemd --user"
        print(f"mlxrouter: service manager command failed (exit {rc}): {unit} is written but "
              f"{manager} did not start it. Fix the cause above (on Linux a user systemd "
              "session is needed: log in, or `loginctl enable-linger $USER`) and run `mlxrouter "
              "service install` again, or take the file away with `mlxrouter service "
              "uninstall`.", file=sys.stderr)
        return 1
    _explain(spec, source.origin, platform)
    return 0


def _explain(spec: ServiceSpec, origin: str, platform: str) -> None:
    json_config = spec.config.endswith(".json")  # a config.json never reads workers/
    print(f"config:  {spec.config} ({origin})" + ("" if json_config else
                                                  f"; per-model files in {spec.state_dir}/workers/"))
    print(f"logs:    {spec.log_dir}/daemon.log and worker-<model>.log")
    if platform == "darwin":
        print(f"         launchd output: {spec.log_dir}/launchd.out.log, launchd.err.log")
    else:
        print(f"         service output: journalctl --user -u {UNIT_NAME}")
    beside = "its models section" if json_config else "workers/*.toml beside it"
    print(f"To change the config, edit {spec.config} (or {beside}),\n"
          "then apply it with `mlxrouter ctl reload` (or `kill -HUP $(mlxrouter ctl pid)`).\n"
          "Changes to host, port, run_dir or log_dir need `mlxrouter service restart`;\n"
          "changes to drain_timeout_s or stop_timeout_s need `mlxrouter service install` "
          "again.")
    if platform == "linux" and not (Path("/var/lib/systemd/linger")
                                    / pwd.getpwuid(os.getuid()).pw_name).exists():
        print("systemd stops user services at logout; to keep it running: "
              "loginctl enable-linger $USER")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def uninstall(*, platform: str, dry_run: bool) -> int:
    """Stop and unload the service and remove its file; the config and logs stay."""
    unit = service_file(platform, Path.home())
    loaded = platform == "darwin" and not dry_run and _launchd_loaded()
    if not unit.exists() and not loaded:
        print(f"not installed: {unit} does not exist")
        return 0
    if platform == "darwin":
        rc = _step(["launchctl", "bootout", _launchd_target()], dry_run,
                   "only if loaded") if loaded or dry_run else 0
    else:
        rc = _step(_systemctl("disable", "--now", UNIT_NAME), dry_run)
    if rc:
        print(f"mlxrouter: could not stop the service (exit {rc}); {unit} kept. If no "
              "service manager runs for this user (\"Failed to connect to bus\"), nothing runs "
              f"it either: delete {unit} yourself.", file=sys.stderr)
        return 1
    if not dry_run:
        unit.unlink(missing_ok=True)
    print(f"{'would remove' if dry_run else 'removed'} {unit}")
    if platform == "linux":
        rc = _step(_systemctl("daemon-reload"), dry_run)
    print(f"kept: the config and logs in {state_home()}")
    return 1 if rc else 0


def status(*, platform: str, dry_run: bool) -> int:
    """The service manager's view; its exit code (non-zero: not running or not installed)."""
    unit = service_file(platform, Path.home())
    if not unit.exists() and not dry_run:
        print(f"not installed: {unit} does not exist")
        return NOT_INSTALLED
    if platform == "darwin":
        return _step(["launchctl", "print", _launchd_target()], dry_run)
    return _step(_systemctl("--no-pager", "status", UNIT_NAME), dry_run)


def restart(*, platform: str, dry_run: bool) -> int:
    """Stop the daemon gracefully (drain, stop workers) and start it again."""
    unit = service_file(platform, Path.home())
    if not unit.exists() and not dry_run:
        print(f"mlxrouter: not installed ({unit} does not exist); run `mlxrouter service install`",
              file=sys.stderr)
        return 1
    if platform == "linux":
        rc = _step(_systemctl("restart", UNIT_NAME), dry_run)
    elif dry_run:
        rc = _step(["launchctl", "kickstart", "-k", _launchd_target()], dry_run,
                   f"or, if not loaded: launchctl bootstrap {_launchd_domain()} {unit}")
    elif _launchd_loaded():
        rc = _step(["launchctl", "kickstart", "-k", _launchd_target()], dry_run)
    else:
        rc = _launchd_bootstrap(unit, dry_run)
    return 1 if rc else 0


# ---- argparse ----------------------------------------------------------------------------------

def _platform(args: argparse.Namespace) -> str | None:
    platform = args.platform or current_platform()
    if platform is None:
        print(f"mlxrouter: service: unsupported platform {sys.platform}", file=sys.stderr)
    return platform


def cmd_install(args: argparse.Namespace) -> int:
    platform = _platform(args)
    if platform is None:
        return 2
    program = [str(Path(args.executable).expanduser().absolute())] if args.executable else None
    config = Path(args.config) if args.config else None
    return install(config_path=config, program=program, platform=platform,
                   dry_run=args.dry_run)


def _simple(fn: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        platform = _platform(args)
        return 2 if platform is None else fn(platform=platform, dry_run=args.dry_run)
    return handler


def add_parser(subparsers: Any) -> None:
    """Register `service install|uninstall|status|restart` on the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true",
                        help="print the service file and the commands; change nothing")
    common.add_argument("--platform", choices=PLATFORMS, help=argparse.SUPPRESS)
    service = subparsers.add_parser(
        "service", help="run the daemon under launchd (macOS) or systemd --user (Linux)")
    ssub = service.add_subparsers(dest="service_command", required=True)
    inst = ssub.add_parser("install", parents=[common],
                           help="copy the config to ~/.mlxrouter, write the service, start it")
    inst.add_argument("--config", help="config to install (default: $MLXROUTER_CONFIG or "
                                       "~/.mlxrouter/supervisor.toml if present)")
    inst.add_argument("--executable", help="the mlxrouter program the service runs "
                                           "(default: the one of this Python environment)")
    inst.set_defaults(func=cmd_install)
    for name, fn, text in (("uninstall", uninstall, "stop the service and remove its file"),
                           ("status", status, "the service manager's status of the daemon"),
                           ("restart", restart, "restart the daemon (drains requests first)")):
        ssub.add_parser(name, parents=[common], help=text).set_defaults(func=_simple(fn))
