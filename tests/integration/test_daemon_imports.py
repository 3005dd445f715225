"""The daemon never imports mlx, mlx_lm, mlx_vlm or transformers, even after serving."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import write_config

SCRIPT = r"""
import asyncio, json, sys
import httpx
from mlxrouter.config import load_config
from mlxrouter.daemon import Daemon, read_lock_info

async def main():
    config = load_config(sys.argv[1])
    daemon = Daemon(config)
    task = asyncio.create_task(daemon.run())
    while not read_lock_info(config.run_dir).get("port"):
        await asyncio.sleep(0.02)
    port = read_lock_info(config.run_dir)["port"]
    async with httpx.AsyncClient(timeout=60) as client:
        resp = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]})
    heavy = sorted(m for m in sys.modules
                   if m.split(".")[0] in {"mlx", "mlx_lm", "mlx_vlm", "transformers", "torch"})
    daemon.stop_requested.set()
    code = await task
    print(json.dumps({"status": resp.status_code, "tokens": resp.json()["usage"],
                      "heavy": heavy, "exit": code}))

asyncio.run(main())
"""


def test_daemon_modules_hold_no_mlx_after_serving_a_request(tmp_path, tiny_model):
    (tmp_path / "models").mkdir()
    config = write_config(tmp_path, models={"tiny": {"path": str(tiny_model)}})
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == 200
    assert result["tokens"]["completion_tokens"] == 3
    assert result["heavy"] == []
    assert result["exit"] == 0
