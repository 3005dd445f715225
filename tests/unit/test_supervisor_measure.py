"""The supervisor reads a worker's Pss on a thread. The kernel walks the worker's page tables
for it (17-40 ms for a SmolLM2 worker decoding 8 streams on 2 cores), and on the daemon's event
loop, which forwards every stream's tokens, that held them all back meanwhile."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from mlxrouter import memory
from mlxrouter.config import ModelSpec, load_config
from mlxrouter.states import Slot, State, Worker
from mlxrouter.supervisor import Supervisor

PSS = 123 * 2**20


class _Catalog:
    def use_sources(self, sources: object) -> None:
        pass


@pytest.fixture
def child() -> object:
    """A real process for the worker's pid (its RSS is read for real)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_slow_pss_reading_does_not_hold_the_event_loop(tmp_path: Path, child, monkeypatch
                                                         ) -> None:
    calls: list[int] = []
    release = threading.Event()

    def slow_pss(pid: int) -> int:
        calls.append(pid)
        release.wait(5)  # the reading takes as long as the test wants
        return PSS

    monkeypatch.setattr(memory, "process_memory_bytes", slow_pss)
    cfg = tmp_path / "supervisor.toml"
    cfg.write_text(f'[supervisor]\nrun_dir = "{tmp_path / "run"}"\n')

    async def scenario() -> None:
        sup = Supervisor(load_config(cfg), broker=None, catalog=_Catalog())  # type: ignore[arg-type]
        slot = Slot(ModelSpec(id="m", path=str(tmp_path)))
        worker = Worker(slot.spec, "m/test/1", cost_bytes=2**30)
        worker.proc = types.SimpleNamespace(pid=child.pid)  # type: ignore[assignment]
        worker.state = State.RUNNING
        slot.worker = worker
        sup._slots["m"] = slot

        started = time.perf_counter()
        sup._measure(time.monotonic())
        assert time.perf_counter() - started < 0.5  # the tick did not wait for the reading
        assert calls == [child.pid] and worker.pss_pending and worker.peak_bytes == 0

        # The loop runs other work meanwhile, and a tick during the reading starts no other.
        await asyncio.sleep(0.1)
        sup._measured_at, worker.measured_at = float("-inf"), float("-inf")
        sup._measure(time.monotonic())
        assert calls == [child.pid]

        release.set()
        for _ in range(100):
            if not worker.pss_pending:
                break
            await asyncio.sleep(0.02)
        assert not worker.pss_pending
        assert worker.peak_bytes == PSS and worker.cost_bytes == 2**30

        # A later reading that finds more raises the peak, and one that finds less does not.
        for reading, peak in ((3 * 2**30, 3 * 2**30), (PSS, 3 * 2**30)):
            monkeypatch.setattr(memory, "process_memory_bytes", lambda pid, r=reading: r)
            sup._measured_at, worker.measured_at = float("-inf"), float("-inf")
            sup._measure(time.monotonic())
            for _ in range(100):
                if not worker.pss_pending:
                    break
                await asyncio.sleep(0.01)
            assert worker.peak_bytes == peak and worker.cost_bytes == peak

    asyncio.run(scenario())
