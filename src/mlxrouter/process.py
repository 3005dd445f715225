"""Worker processes as OS objects: spawning, signalling, pidfiles and stale-worker reaping.

Runs in the daemon; imports no mlx. Workers are fresh interpreters in their own process group,
stdin from /dev/null and stdout/stderr appended to a log file (never a pipe: an undrained pipe
blocks the worker mid-step). A pidfile records pid, process start time, boot id and command line,
so a daemon restarted after a crash signals a leftover worker only if all of them still match.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


class PrivateLogFile(logging.handlers.RotatingFileHandler):
    """A rotated log only its owner reads (0600, rotated files too): lines can carry request
    details, such as a remote image's host."""

    def _open(self):  # type: ignore[override]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a file made before (by an older version) is made private too
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the thread that started it ends (its process exiting
    included), however that happens. Elsewhere nothing; callers also check os.getppid()."""
    if sys.platform != "linux":
        return
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def signal_group(pid: int | None, sig: signal.Signals) -> None:
    """Signal a worker's whole process group (it leads one: process_group=0)."""
    if pid is None:
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def spawn(argv: list[str], *, env: dict[str, str], log_path: Path,
                cwd: Path) -> asyncio.subprocess.Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # one made by an older version was world-readable
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
            process_group=0, cwd=str(cwd))
    finally:
        os.close(fd)


def rotate(path: Path, max_bytes: int, backups: int) -> None:
    """Size-based rotation of a file a worker appends to (done before it is opened)."""
    try:
        if path.stat().st_size < max_bytes:
            return
    except OSError:
        return
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    if backups > 0:
        path.replace(path.with_name(f"{path.name}.1"))
    else:
        path.unlink()


def log_sizes(*paths: Path) -> dict[Path, int]:
    """The current sizes of log files (0 for a missing one): see last_log_line's `since`."""
    sizes = {}
    for p in paths:
        try:
            sizes[p] = p.stat().st_size
        except OSError:
            sizes[p] = 0
    return sizes


def last_log_line(*paths: Path, limit: int = 4096, since: dict[Path, int] | None = None) -> str:
    """The last non-empty line of the most recently written of a worker's logs: the reason a
    failed start reports (a logged exception, or a traceback on stderr). With `since` (sizes
    from log_sizes when the worker started), only what was written after: the files are the
    model's, and an earlier worker's last line is no reason for this one's exit. A file
    smaller than its size then was rotated, and is read from its start."""
    since = since or {}
    fresh = [p for p, size in log_sizes(*paths).items() if size != since.get(p, 0)]
    if not fresh:
        return ""
    try:
        path = max(fresh, key=lambda p: p.stat().st_mtime_ns)
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            start = since.get(path, 0)
            start = start if start <= end else 0  # rotated meanwhile
            f.seek(max(start, end - limit))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


class PidFile:
    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.pid"

    def write(self, pid: int, boot_id: str) -> None:
        try:
            proc = psutil.Process(pid)
            record = {"pid": pid, "create_time": proc.create_time(), "boot_id": boot_id,
                      "cmdline": proc.cmdline()}
        except psutil.Error:
            return  # already gone; the reaper will notice
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.write_text(json.dumps(record))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def reap_stale(directory: Path) -> list[int]:
    """Kill workers a crashed daemon left behind; returns the pids that were signalled."""
    killed = []
    for pidfile in sorted(directory.glob("*.pid")) if directory.is_dir() else []:
        try:
            record = json.loads(pidfile.read_text())
            proc = psutil.Process(int(record["pid"]))
            same = (abs(proc.create_time() - float(record["create_time"])) < 0.01
                    and proc.cmdline() == record["cmdline"])
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            same = False
        if same:
            log.warning("reaping stale worker pid=%d from %s (boot %s)", proc.pid,
                        pidfile.name, record.get("boot_id"))
            signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(5)
            except psutil.Error:
                pass
            killed.append(proc.pid)
        pidfile.unlink(missing_ok=True)
    return killed
