"""The worker-log reads behind `ctl tail`: a log rotated under a follower loses no line, and
a tail longer than one chunk is read to its end."""

from __future__ import annotations

import logging
from pathlib import Path

from mlxrouter.admin import LOG_CHUNK_BYTES, _read_log
from mlxrouter.process import PrivateLogFile


def follow(path: Path, state: dict) -> str:
    """What `ctl tail -f` prints on one poll (it reads again at once while `more`)."""
    out = b""
    while True:
        data, state["offset"], state["inode"], more = _read_log(
            path, state["offset"], 0, state["inode"])
        out += data
        if not more:
            return out.decode()


def test_a_follower_loses_no_line_when_the_log_rotates(tmp_path: Path) -> None:
    """Rotation was noticed only when the offset passed the new file's size: the rest of the
    old file was never read, and the start of the new one was skipped (28 of 50 lines)."""
    path = tmp_path / "worker-x.log"
    handler = PrivateLogFile(path, maxBytes=1500, backupCount=20)
    logger = logging.Logger("t")
    logger.addHandler(handler)
    state = {"offset": -1, "inode": 0}
    seen = follow(path, state)
    for i in range(60):
        logger.warning("request started request_id=rot-%03d and some padding text", i)
        if i % 7 == 3:  # polls now and then, as -f every 0.25 s, rotations in between
            seen += follow(path, state)
    seen += follow(path, state)
    handler.close()
    assert [f"rot-{i:03d}" in seen for i in range(60)] == [True] * 60
    assert seen.count("rot-") == 60  # nothing twice either


def test_a_tail_longer_than_one_chunk_reads_to_the_end(tmp_path: Path) -> None:
    path = tmp_path / "worker-x.log"
    path.write_text("".join(f"line {i:06d}\n" for i in range(20_000)))  # 240 KB
    data, offset, inode, more = _read_log(path, -1, 100_000, 0)
    assert len(data) == LOG_CHUNK_BYTES and more
    rest = data
    while more:
        data, offset, inode, more = _read_log(path, offset, 0, inode)
        rest += data
    assert len(rest) == 100_000 and rest.endswith(b"line 019999\n")
