"""The load planner and the pressure levels: pure functions, table-driven."""

from __future__ import annotations

import json

import pytest

from mlxrouter.memory import (GB, Plan, PressureInputs, Resident, estimate_cost,
                              kv_bytes_per_token, plan_load, pressure_level)


def r(model: str, gb: float, evictable: bool = True, last_used: float = 0.0) -> Resident:
    return Resident(model, int(gb * GB), evictable, last_used)


PLANS = [
    # need, budget, max_loaded, residents, available -> action, victims
    ("empty machine", 1, 10, 0, [], None, "load", ()),
    ("fits beside another", 2, 10, 0, [r("a", 5)], None, "load", ()),
    ("exactly fills the budget", 5, 10, 0, [r("a", 5)], None, "load", ()),
    ("bigger than the budget alone", 11, 10, 0, [], None, "impossible", ()),
    ("evicts the least recently used idle worker",
     4, 10, 0, [r("a", 4, last_used=5), r("b", 4, last_used=1)], None, "evict", ("b",)),
    ("evicts as many as needed, oldest first",
     6, 10, 0, [r("a", 4, last_used=3), r("b", 3, last_used=1), r("c", 2, last_used=2)], None,
     "evict", ("b", "c")),
    ("never evicts a busy worker",
     4, 10, 0, [r("busy", 8, evictable=False), r("idle", 1)], None, "wait", ()),
    ("evicts idle ones around a busy one",
     4, 10, 0, [r("busy", 4, evictable=False, last_used=0), r("idle", 4, last_used=9)], None,
     "evict", ("idle",)),
    ("pinned or busy everywhere: wait", 3, 10, 0,
     [r("p", 5, evictable=False), r("q", 4, evictable=False)], None, "wait", ()),
    ("max_loaded reached evicts by count", 1, 100, 2, [r("a", 1, last_used=2),
                                                      r("b", 1, last_used=1)], None,
     "evict", ("b",)),
    ("max_loaded 0 means unlimited", 1, 100, 0, [r(str(i), 1) for i in range(20)], None,
     "load", ()),
    ("under pressure a load must fit in free memory", 4, 100, 0, [r("a", 10, last_used=1)],
     2 * GB, "evict", ("a",)),
    ("under pressure with nothing to free: wait", 4, 100, 0, [r("a", 10, evictable=False)],
     2 * GB, "wait", ()),
    ("under pressure it fits in free memory", 1, 100, 0, [], 2 * GB, "load", ()),
]


@pytest.mark.parametrize("name, need, budget, max_loaded, residents, available, action, victims",
                         PLANS, ids=[p[0] for p in PLANS])
def test_plan_load(name, need, budget, max_loaded, residents, available, action, victims):
    plan = plan_load(int(need * GB), int(budget * GB), max_loaded, residents, available)
    assert (plan.action, plan.victims) == (action, victims)


def test_an_evict_plan_says_whether_memory_or_the_worker_count_needs_it():
    by_memory = plan_load(int(4 * GB), int(10 * GB), 0, [r("a", 8)])
    by_count = plan_load(int(1 * GB), int(20 * GB), 1, [r("a", 4)])
    assert (by_memory.action, by_memory.reason) == ("evict", "memory")
    assert (by_count.action, by_count.reason) == ("evict", "max_loaded_models")


def test_impossible_and_wait_plans_name_the_figures():
    plan = plan_load(int(12 * GB), int(10 * GB), 0, [])
    assert plan == Plan("impossible", reason="needs 12.00 GB but the memory budget is 10.00 GB")
    # a hair over the budget still reads as over it
    close = plan_load(GB // 2 + 1_000_000, GB // 2, 0, [])
    assert close.reason == "needs 0.501 GB but the memory budget is 0.500 GB"
    wait = plan_load(int(4 * GB), int(10 * GB), 0, [r("busy", 8, evictable=False)])
    assert "4.00 GB" in wait.reason and "8.00 GB" in wait.reason and "10.00 GB" in wait.reason
    # memory is plentiful and the count of workers is what blocks: say so, not "memory"
    # under pressure, free memory short while the budget has room: not "held by busy workers"
    short = plan_load(int(21.6 * GB), int(40 * GB), 0, [r("idle", 0.95)], int(20 * GB))
    assert short == Plan("wait", reason="needs 21.60 GB; only 20.00 GB of memory is available "
                                        "on this machine (high memory pressure), 0.95 GB more "
                                        "after stopping idle workers")
    # idle workers are not what holds the room (they counted as "busy or pinned")
    mixed = plan_load(int(0.48 * GB), int(1 * GB), 0,
                      [r("pinned", 0.5, evictable=False), r("busy", 0.33, evictable=False),
                       r("idle", 0.12)])
    assert mixed.reason == ("needs 0.48 GB; 0.83 GB of the 1.00 GB budget is held by busy or "
                            "pinned workers (0.12 GB more by idle ones, which stopping would "
                            "not free enough)")
    by_count = plan_load(int(1 * GB), int(10 * GB), 1, [r("busy", 1, evictable=False)])
    assert by_count == Plan("wait", reason="max_loaded_models (1) workers are loaded, all "
                                           "busy or pinned")


def inputs(avail_gb: float, swap: float = 0.0, psi: float | None = None) -> PressureInputs:
    return PressureInputs(int(avail_gb * GB), 24 * GB, swap, psi)


LEVELS = [
    ("plenty free", inputs(20), "normal"),
    ("below twice the threshold", inputs(3.5), "moderate"),
    ("below the threshold", inputs(1.5), "high"),
    ("below half the threshold", inputs(0.9), "critical"),
    ("swap above high", inputs(20, swap=85), "high"),
    ("swap above critical", inputs(20, swap=96), "critical"),
    ("PSI some stalls", inputs(20, psi=6.0), "moderate"),
    ("PSI heavy stalls", inputs(20, psi=30.0), "high"),
    ("no PSI on this platform", inputs(20, psi=None), "normal"),
]


@pytest.mark.parametrize("name, given, level", LEVELS, ids=[x[0] for x in LEVELS])
def test_pressure_level(name, given, level):
    assert pressure_level(given, threshold_bytes=2 * GB, swap_high_percent=80,
                          swap_critical_percent=95) == level


def test_estimate_is_weights_plus_kv_for_every_batch_slot_plus_overhead(tmp_path):
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 64, "max_position_embeddings": 2048, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    per_token = kv_bytes_per_token(config)
    assert per_token == 2 * 2 * 2 * 16 * 4  # k and v, layers, kv heads, head dim, f32
    cost = estimate_cost(str(tmp_path), max_context=0, max_batch=8, overhead_bytes=500)
    assert cost == 1000 + per_token * 2048 * 8 + 500
    assert estimate_cost(str(tmp_path), max_context=100, max_batch=1, overhead_bytes=0) == (
        1000 + per_token * 100)


@pytest.mark.parametrize("load_dtype, platform, config, expected", [
    ("native", "linux", {"quantization": {"bits": 4}}, 1000),
    ("float32", "darwin", {"quantization": {"bits": 4}}, 8000),
    ("auto", "linux", {"quantization": {"bits": 4}}, 8000),
    ("auto", "darwin", {"quantization": {"bits": 4}}, 1000),
    ("auto", "linux", {"torch_dtype": "bfloat16"}, 2000),
    ("auto", "linux", {"torch_dtype": "float32"}, 1000),
    ("float16", "linux", {"torch_dtype": "float32"}, 500),
])
def test_weights_are_budgeted_as_loaded(tmp_path, monkeypatch, load_dtype, platform, config,
                                        expected):
    import mlxrouter.memory as memory

    monkeypatch.setattr(memory.sys, "platform", platform)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert memory.loaded_weights_bytes(tmp_path, config, load_dtype) == expected


@pytest.mark.parametrize("config, half_weights, expected", [
    ({"quantization": {"bits": 4}}, True, 12000),  # float32 from 4-bit, and a half copy
    ({"torch_dtype": "bfloat16"}, True, 3000),
    ({"torch_dtype": "bfloat16"}, False, 2000),
    ({"torch_dtype": "float32"}, True, 1000),  # float32 weights: no half copy expected
])
def test_half_copies_are_budgeted(tmp_path, monkeypatch, config, half_weights, expected):
    import mlxrouter.memory as memory

    monkeypatch.setattr(memory.sys, "platform", "linux")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert memory.loaded_weights_bytes(tmp_path, config, "auto", half_weights) == expected


def test_a_vision_model_is_charged_one_kv_cache_and_no_prompt_cache(tiny_model) -> None:
    """The vision engine runs one request at a time and keeps no prompt cache; it was charged
    max_running full KV caches and the prompt cache (3.3 GB too much for a 7B VLM)."""
    from mlxrouter.config import ModelSpec
    from mlxrouter.memory import budgeted_bytes

    text = ModelSpec(id="m", path=str(tiny_model), max_running=8, max_context=2048,
                     prompt_cache_bytes=256 * 2**20, supports_vision=False)
    vision = ModelSpec(id="m", path=str(tiny_model), max_running=8, max_context=2048,
                       prompt_cache_bytes=256 * 2**20, supports_vision=True)
    config = json.loads((tiny_model / "config.json").read_text())
    one_slot = kv_bytes_per_token(config) * 2048
    assert budgeted_bytes(text, 0) - budgeted_bytes(vision, 0) == 7 * one_slot + 256 * 2**20
