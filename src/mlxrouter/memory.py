"""Memory: the load planner (a pure function), cost estimates, and the platform's figures.

Runs in the daemon; imports no mlx (MLX figures arrive from workers in Stats). The planner
decides, from costs alone, whether a model can be loaded now, which idle workers to evict first,
or that it must wait; the supervisor carries the decision out.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import msgspec
import psutil

log = logging.getLogger(__name__)

GB = 1024**3
# Before any worker has been measured: interpreter + mlx + tokenizer, measured here at ~80 MB
# Pss for a tiny model, so this errs on the safe side.
DEFAULT_OVERHEAD_BYTES = 256 * 2**20

LEVELS = ("normal", "moderate", "high", "critical")


class Resident(msgspec.Struct, frozen=True):
    """A live worker as the planner sees it."""

    model: str
    cost_bytes: int
    evictable: bool  # RUNNING, idle (nothing in flight or queued) and not pinned
    last_used: float


class Plan(msgspec.Struct, frozen=True):
    action: str  # "load" | "evict" | "wait" | "impossible"
    victims: tuple[str, ...] = ()
    reason: str = ""


def _distinct_gb(a: int, b: int) -> tuple[str, str]:
    """Two byte counts in GB with as many decimals (2 to 6) as it takes to tell them apart:
    "needs 0.50 GB but the budget is 0.50 GB" said nothing."""
    for digits in range(2, 7):
        left, right = f"{a / GB:.{digits}f}", f"{b / GB:.{digits}f}"
        if left != right:
            break
    return left, right


def plan_load(need_bytes: int, budget_bytes: int, max_loaded: int,
              residents: list[Resident], available_bytes: int | None = None) -> Plan:
    """Whether a model costing `need_bytes` can start now, and whom to evict first.

    Only evictable residents are ever chosen, least recently used first. `available_bytes`
    (given under high memory pressure) additionally requires the load to fit in free memory.
    `max_loaded` 0 means no limit on the number of workers.
    """
    if need_bytes > budget_bytes:
        need, budget = _distinct_gb(need_bytes, budget_bytes)
        return Plan("impossible", reason=f"needs {need} GB but the memory budget is {budget} GB")

    def fits(freed: int, gone: int) -> bool:
        committed = sum(r.cost_bytes for r in residents) - freed
        count_ok = max_loaded <= 0 or len(residents) - gone + 1 <= max_loaded
        free_ok = available_bytes is None or need_bytes <= available_bytes + freed
        return committed + need_bytes <= budget_bytes and count_ok and free_ok

    if fits(0, 0):
        return Plan("load")
    # Why evictions would be needed (the metrics' label): only the count of workers, or memory.
    memory_ok = (sum(r.cost_bytes for r in residents) + need_bytes <= budget_bytes
                 and (available_bytes is None or need_bytes <= available_bytes))
    why = "max_loaded_models" if memory_ok else "memory"
    victims: list[str] = []
    freed = 0
    for r in sorted((r for r in residents if r.evictable), key=lambda r: r.last_used):
        victims.append(r.model)
        freed += r.cost_bytes
        if fits(freed, len(victims)):
            return Plan("evict", tuple(victims), reason=why)
    committed = sum(r.cost_bytes for r in residents)
    if memory_ok:  # only the number of workers stands in the way
        return Plan("wait", reason=(
            f"max_loaded_models ({max_loaded}) workers are loaded, all busy or pinned"))
    freeable = sum(r.cost_bytes for r in residents if r.evictable)
    if (available_bytes is not None and need_bytes > available_bytes + freeable
            and committed - freeable + need_bytes <= budget_bytes):
        # the budget has room: free memory (high or critical pressure) is what is short
        return Plan("wait", reason=(
            f"needs {need_bytes / GB:.2f} GB; only {available_bytes / GB:.2f} GB of memory "
            f"is available on this machine (high memory pressure)"
            + (f", {freeable / GB:.2f} GB more after stopping idle workers" if freeable
               else "")))
    held = committed - freeable  # idle workers could be stopped: they are not in the way
    return Plan("wait", reason=(
        f"needs {need_bytes / GB:.2f} GB; {held / GB:.2f} GB of the "
        f"{budget_bytes / GB:.2f} GB budget is held by busy or pinned workers"
        + (f" ({freeable / GB:.2f} GB more by idle ones, which stopping would not free "
           f"enough)" if freeable else "")))


# ---- cost estimates


def _model_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def weights_bytes(path: Path) -> int:
    """The safetensors files' bytes; a broken link or a file gone meanwhile counts 0 (its load
    fails on its own, with its reason)."""
    total = 0
    for f in path.glob("*.safetensors"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:
            continue
    return total


def kv_bytes_per_token(config: dict) -> int:
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers") or 0)  # null as absent (discovery refuses
    heads = int(text.get("num_attention_heads") or 1)  # other non-numbers)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or (int(text.get("hidden_size") or 0) // max(heads, 1)))
    dtype_bytes = 4 if str(text.get("torch_dtype", "")).endswith("32") else 2
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def model_max_context(config: dict) -> int:
    text = config.get("text_config", config)
    return int(text.get("max_position_embeddings") or 4096)


def effective_context(configured: int, model_max: int) -> int:
    """The context a worker enforces: the configured one (0 = the model's own), never more
    than the model's. The budget assumes exactly this, for every batch slot."""
    return min(configured, model_max) if configured else model_max


def loaded_weights_bytes(path: Path, config: dict, load_dtype: str,
                         half_weights: bool = False) -> int:
    """Weights as they will sit in memory. "auto" means float32 on the CPU backend, which the
    daemon (no mlx here) assumes everywhere but macOS; quantized weights grow by 32/bits.
    With `half_weights` (a Linux worker's half copies, gemv.shadow_weights) float32 weights
    made from 16-bit or quantized ones count half again."""
    stored = weights_bytes(path)
    to_f32 = load_dtype == "float32" or (load_dtype == "auto" and sys.platform != "darwin")
    to_16 = load_dtype in ("float16", "bfloat16")
    if not (to_f32 or to_16):
        return stored
    bits = stored_bits(config)
    copies = 1.5 if to_f32 and half_weights and bits <= 16 else 1.0
    return int(stored * (32 if to_f32 else 16) / bits * copies)


def stored_bits(config: dict) -> int:
    """Bits per weight on disk, as the model's config tells: the quantization's, 32 for a
    float32 checkpoint, else 16."""
    bits = (config.get("quantization") or {}).get("bits")
    return bits if bits else (32 if str(config.get("torch_dtype")).endswith("32") else 16)


def budgeted_bytes(spec: Any, overhead_bytes: int) -> int:
    """What the supervisor charges a model (a config.ModelSpec): its required_memory_gb with
    the safety margin, else the estimate from its files plus its prompt cache."""
    if spec.required_memory_gb is not None:
        return int(spec.required_memory_gb * spec.safety_margin * GB)
    from .vision import is_vision_model

    # the vision engine (mlx-vlm) runs one request at a time and keeps no prompt cache: it
    # was charged max_running KV caches and the cache, gigabytes it never uses
    vision = is_vision_model(spec)
    return estimate_cost(spec.path, max_context=spec.max_context,
                         max_batch=1 if vision else spec.max_running,
                         overhead_bytes=overhead_bytes, load_dtype=spec.load_dtype,
                         half_weights=spec.half_weights and sys.platform.startswith("linux")
                         ) + (0 if vision else spec.prompt_cache_bytes)


def estimate_cost(path: str, *, max_context: int, max_batch: int, overhead_bytes: int,
                  load_dtype: str = "native", half_weights: bool = False) -> int:
    """Weights as loaded + a full KV cache for every batch slot + the process itself."""
    p = Path(path)
    config = _model_config(p)
    context = effective_context(max_context, model_max_context(config))
    return (loaded_weights_bytes(p, config, load_dtype, half_weights)
            + kv_bytes_per_token(config) * context * max_batch + overhead_bytes)


# ---- platform figures


def cgroup_limit_bytes() -> int | None:
    """cgroup v2 memory.max of this process (containers, systemd MemoryMax), if any."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        raw = (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max").read_text().strip()
    except (OSError, IndexError):
        return None
    return None if raw == "max" else int(raw)


def default_budget_bytes() -> int:
    total = psutil.virtual_memory().total
    limit = cgroup_limit_bytes()
    if limit is not None:
        total = min(total, limit)
    return int(0.8 * total)


def process_memory_bytes(pid: int) -> int | None:
    """What a worker costs: Pss on Linux (shared pages split fairly), else RSS. Pss comes
    from /proc/PID/smaps_rollup: ~2 ms for a loaded SmolLM2 worker, where psutil's
    memory_full_info (all of smaps) took 2.5-10 ms."""
    if sys.platform == "linux":
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        return int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            pass  # no smaps_rollup before Linux 4.14: psutil reads smaps
    try:
        proc = psutil.Process(pid)
        if sys.platform == "linux":
            return int(proc.memory_full_info().pss)
        return int(proc.memory_info().rss)
    except (psutil.Error, OSError):
        return None


def resident_bytes(pid: int) -> int | None:
    """RSS, from /proc/PID/statm on Linux: microseconds, unlike Pss."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None


def _psi_some_avg10() -> float | None:
    try:
        first = Path("/proc/pressure/memory").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(kv.split("=") for kv in first.split()[1:])
    return float(fields.get("avg10", 0))


class PressureInputs(msgspec.Struct, frozen=True):
    available_bytes: int
    total_bytes: int
    swap_percent: float
    psi_some_avg10: float | None


def read_pressure_inputs() -> PressureInputs:
    vm = psutil.virtual_memory()
    return PressureInputs(vm.available, vm.total, psutil.swap_memory().percent,
                          _psi_some_avg10())


def pressure_level(inputs: PressureInputs, *, threshold_bytes: int, swap_high_percent: float,
                   swap_critical_percent: float) -> str:
    """normal / moderate / high / critical from free memory, swap use and Linux PSI."""
    avail = inputs.available_bytes
    psi = inputs.psi_some_avg10 or 0.0
    if avail < threshold_bytes / 2 or inputs.swap_percent >= swap_critical_percent:
        return "critical"
    if avail < threshold_bytes or inputs.swap_percent >= swap_high_percent or psi >= 25:
        return "high"
    if avail < 2 * threshold_bytes or psi >= 5:
        return "moderate"
    return "normal"
