"""The daemon's run lock: what `ctl` reads from it, and only while a daemon holds it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlxrouter.daemon import AlreadyRunning, RunLock, read_lock_info


def test_lock_info_is_read_while_the_lock_is_held(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    lock.write(boot_id="b1", host="127.0.0.1", port=8811)
    try:
        assert read_lock_info(tmp_path)["port"] == 8811
        with pytest.raises(AlreadyRunning, match="already running"):
            RunLock(tmp_path)
    finally:
        lock.release()
    assert read_lock_info(tmp_path) == {}


def test_a_killed_daemons_leftover_info_is_not_trusted(tmp_path: Path) -> None:
    """SIGKILL leaves the file's content but no lock: its port may be another daemon's now."""
    (tmp_path / "daemon.lock").write_text(json.dumps({"pid": 1, "port": 8822}))
    assert read_lock_info(tmp_path) == {}
    # a daemon in another process that holds the lock is trusted
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from mlxrouter.daemon import RunLock; lock = RunLock(Path(sys.argv[1])); "
         "lock.write(port=8833); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert read_lock_info(tmp_path)["port"] == 8833
    finally:
        holder.kill()
        holder.wait()
    assert read_lock_info(tmp_path) == {}


def test_ctl_says_not_running_over_a_stale_lock(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "daemon.lock").write_text(json.dumps({"pid": 1, "port": 9}))
    config = tmp_path / "supervisor.toml"
    config.write_text(f'[supervisor]\nrun_dir = "{tmp_path / "run"}"\n')
    done = subprocess.run([sys.executable, "-m", "mlxrouter", "ctl", "--config", str(config),
                           "pid"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, done
    assert "not running" in done.stderr


def test_a_starting_daemon_is_named_and_ctl_says_it_is_starting(tmp_path: Path) -> None:
    """Before it listened (an import and a CPU-library build: up to a minute) its lock held
    no pid: a second serve said "pid ?" and ctl said the daemon was not running."""
    import os

    (tmp_path / "supervisor.toml").write_text(f'[supervisor]\nrun_dir = "{tmp_path / "run"}"\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from mlxrouter.daemon import RunLock; lock = RunLock(Path(sys.argv[1])); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning, match=f"already running \\(pid {holder.pid}\\)"):
            RunLock(tmp_path / "run")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLXROUTER_")}
        ctl = [sys.executable, "-m", "mlxrouter", "ctl", "--config",
               str(tmp_path / "supervisor.toml")]
        status = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=60,
                                env=env)
        assert status.returncode == 7
        assert f"the daemon (pid {holder.pid}) is still starting" in status.stderr
        stop = subprocess.run([*ctl, "shutdown"], capture_output=True, text=True, timeout=60,
                              env=env)
        assert stop.returncode == 0 and "sent it SIGTERM" in stop.stderr
        assert holder.wait(10) != 0  # (a real daemon stops cleanly on it)
    finally:
        holder.kill()
        holder.wait()
