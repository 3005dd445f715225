"""`mlxrouter ctl`: supervisorctl for the daemon, over its admin API.

Runs in the user's shell; imports no mlx. Finds the daemon through `--url`, else the port its
lock file records in the run dir of the config. Exit codes follow supervisorctl / LSB:
0 ok, 1 an action failed, 2 usage, 3 a named worker is not RUNNING (status), 4 no such model,
7 the daemon is not running / unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from urllib.parse import quote

import httpx

from .config import ConfigError, control_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_UNKNOWN, EXIT_UNREACHABLE = (
    0, 1, 2, 3, 4, 7)


class CtlError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, url: str, admin_key: str | None, timeout: float = 600) -> None:
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.url = url

    def call(self, method: str, path: str, **kwargs) -> dict:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CtlError(f"cannot reach the daemon at {self.url}: {exc}",
                           EXIT_UNREACHABLE) from None
        body = resp.json() if resp.headers.get("content-type", "").startswith(
            "application/json") else {}
        if resp.status_code >= 400:
            err = body.get("error", {})
            code = EXIT_UNKNOWN if err.get("code") == "model_not_found" else EXIT_FAILED
            raise CtlError(f"ERROR ({err.get('code', resp.status_code)}): "
                           f"{err.get('message', resp.text)}", code)
        return body



def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (0 or more)")
    return value


def model_path(name: str, action: str) -> str:
    """/admin/models/<id>/<action> with the id percent-encoded: an id may hold "%", "#", "?"
    or ".." (sent as is, "m%41" stopped model "mA", and "a#b" reached nothing)."""
    return f"/admin/models/{quote(name, safe='/').replace('.', '%2E')}/{action}"


def daemon_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    from .daemon import local_url, read_lock_info

    run_dir, _ = control_settings(args.config)
    info = read_lock_info(run_dir)
    if info.get("pid") and not info.get("port"):
        if args.ctl_command == "shutdown":  # what the daemon does with SIGTERM then: stop
            try:
                os.kill(int(info["pid"]), signal.SIGTERM)
            except ProcessLookupError:  # it ended meanwhile
                raise CtlError("the daemon is not running", EXIT_UNREACHABLE) from None
            except PermissionError:
                raise CtlError(f"the daemon (pid {info['pid']}) is still starting and is not "
                               f"yours to signal", EXIT_FAILED) from None
            raise CtlError(f"the daemon (pid {info['pid']}) was still starting; sent it "
                           f"SIGTERM, and it stops before it listens", EXIT_OK)
        raise CtlError(f"the daemon (pid {info['pid']}) is still starting (importing the "
                       f"embedded model or building its CPU libraries); try again shortly",
                       EXIT_UNREACHABLE)
    if not info.get("port"):
        raise CtlError(f"the daemon is not running (no lock info in {run_dir})",
                       EXIT_UNREACHABLE)
    return local_url(info)


def admin_key(args: argparse.Namespace) -> str | None:
    if args.admin_key or os.environ.get("MLXROUTER_ADMIN_KEY"):
        return args.admin_key or os.environ["MLXROUTER_ADMIN_KEY"]
    try:
        return control_settings(args.config)[1]
    except ConfigError:
        if args.url:  # told where the daemon is: one without an admin key needs none
            return None
        raise


def _hms(seconds: float | None) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def status_line(w: dict) -> str:
    """supervisorctl's layout: name, state, then what describes it."""
    if w["state"] in ("RUNNING", "DRAINING", "STARTING", "STOPPING"):
        mem = f"{w['memory_bytes'] / 2**20:.0f} MiB" if w.get("memory_bytes") else "-"
        detail = (f"pid {w['pid']}, uptime {_hms(w['uptime_s'])}, memory {mem}, "
                  f"in-flight {w['in_flight']}, restarts {w['restarts']}")
    else:
        detail = w.get("reason") or ""
        if w.get("restarts"):
            detail = f"{detail} (restarts {w['restarts']})".strip()
    return f"{w['model']:<40} {w['state']:<9} {detail}".rstrip()


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    workers = client.call("GET", "/admin/status")["workers"]
    by_name = {w["model"]: w for w in workers}
    unknown = [n for n in args.names if n not in by_name]
    shown = [by_name[n] for n in args.names if n in by_name] if args.names else workers
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        for w in shown:
            print(status_line(w))
        for name in unknown:
            print(f"{name:<40} ERROR (no such model)")
    if unknown:
        return EXIT_UNKNOWN
    if args.names and any(w["state"] != "RUNNING" for w in shown):
        return EXIT_NOT_RUNNING
    return EXIT_OK


def _targets(client: Client, names: list[str], running_only: bool) -> list[str]:
    if names != ["all"]:
        return names
    workers = client.call("GET", "/admin/status")["workers"]
    return [w["model"] for w in workers if not running_only or w["state"] != "STOPPED"]


def _each(client: Client, args: argparse.Namespace, action: str, done: str) -> int:
    code = EXIT_OK
    started = []
    for name in _targets(client, args.names, running_only=action != "start"):
        try:
            result = client.call("POST", model_path(name, action))
            print(f"{name}: {result.get('message') or done} ({result['state']})")
            started.append(name)
        except CtlError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            if exc.code == EXIT_UNREACHABLE:
                raise
            code = max(code, exc.code)
    if action != "stop" and len(started) > 1:
        # each start may have stopped an idle one started before it to make room
        states = {w["model"]: w for w in client.call("GET", "/admin/status")["workers"]}
        gone = [n for n in started if states.get(n, {}).get("state") != "RUNNING"]
        if gone:
            print(f"{', '.join(gone)}: stopped again to make room for the models started after "
                  f"(max_loaded_models or the memory budget); "
                  f"{len(started) - len(gone)} of {len(started)} are running",
                  file=sys.stderr)
            code = max(code, EXIT_NOT_RUNNING)
    return code


def cmd_start(client: Client, args: argparse.Namespace) -> int:
    return _each(client, args, "start", "started")


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    return _each(client, args, "stop", "stopped")


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    return _each(client, args, "restart", "restarted")


def cmd_pid(client: Client, args: argparse.Namespace) -> int:
    body = client.call("GET", "/admin/status")
    if not args.names:
        print(body["daemon"]["pid"])
        return EXIT_OK
    by_name = {w["model"]: w for w in body["workers"]}
    code = EXIT_OK
    for name in args.names:
        w = by_name.get(name)
        if w is None:
            print(f"{name}: ERROR (no such model)", file=sys.stderr)
            code = EXIT_UNKNOWN
        elif w["pid"] is None:  # no "0": `kill $(ctl pid NAME)` would signal its own group
            print(f"{name}: not running ({w['state']})", file=sys.stderr)
            code = max(code, EXIT_NOT_RUNNING)
        else:
            print(w["pid"])
    return code


def cmd_tail(client: Client, args: argparse.Namespace) -> int:
    stream = "stderr" if args.stderr else "stdout"
    path = model_path(args.name, "log")
    chunk = client.call("GET", path, params={"stream": stream, "tail": args.bytes})
    while True:  # a chunk is at most 64 KiB: the rest of what was asked for, or has come
        if chunk["text"]:
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
        if not chunk.get("more"):
            if not args.follow:
                return EXIT_OK
            time.sleep(0.25)
        chunk = client.call("GET", path, params={"stream": stream, "offset": chunk["offset"],
                                                 "inode": chunk.get("inode", 0)})


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    print(client.call("POST", "/admin/reload")["message"])
    return EXIT_OK


def cmd_shutdown(client: Client, args: argparse.Namespace) -> int:
    body = client.call("POST", "/admin/shutdown")
    print(f"shutting down (pid {body['pid']})")
    return EXIT_OK


def add_parser(subparsers) -> None:
    ctl = subparsers.add_parser("ctl", help="control a running daemon (like supervisorctl)")
    ctl.add_argument("--url", help="the daemon's base URL (default: from its lock file)")
    ctl.add_argument("--admin-key", help="admin key (default: the config's, or "
                     "MLXROUTER_ADMIN_KEY)")
    ctl.add_argument("--config", help="config whose run dir holds the daemon's lock file")
    sub = ctl.add_subparsers(dest="ctl_command", required=True)
    p = sub.add_parser("status", help="one line per model")
    p.add_argument("names", nargs="*")
    p.add_argument("--json", action="store_true")
    p.set_defaults(ctl_func=cmd_status)
    for name, func, text in (("start", cmd_start, "load"), ("stop", cmd_stop,
                             "unload (draining in-flight requests first)"),
                             ("restart", cmd_restart, "stop, then start")):
        p = sub.add_parser(name, help=f"{text}: NAME... or all")
        p.add_argument("names", nargs="+")
        p.set_defaults(ctl_func=func)
    p = sub.add_parser("tail", help="a worker's log")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--stderr", action="store_true", help="raw stderr instead of the log")
    p.add_argument("--bytes", type=_size, default=1600,
                   help="how much of the end to show first (0: none, with -f only what comes)")
    p.set_defaults(ctl_func=cmd_tail)
    p = sub.add_parser("pid", help="the daemon's pid, or a model worker's")
    p.add_argument("names", nargs="*")
    p.set_defaults(ctl_func=cmd_pid)
    sub.add_parser("reload", help="re-read the configuration").set_defaults(
        ctl_func=cmd_reload)
    sub.add_parser("shutdown", help="stop the daemon (drains first)").set_defaults(
        ctl_func=cmd_shutdown)
    ctl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        client = Client(daemon_url(args), admin_key(args))
        return args.ctl_func(client, args)
    except CtlError as exc:
        print(f"mlxrouter ctl: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"mlxrouter ctl: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
