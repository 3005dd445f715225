"""Metrics: counters and histograms move on events, the collector reflects a fake supervisor at
scrape time, and the exposition parses with only mlxrouter_ names and bounded labels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlxrouter import metrics as metrics_module
from mlxrouter.metrics import Metrics
from mlxrouter.states import State, WorkerStatus


def worker(model: str = "m", state: str = "RUNNING", **fields: object) -> WorkerStatus:
    base: dict[str, object] = dict(
        model=model, state=state, pid=123, uptime_s=5.0, in_flight=2, waiting=3,
        memory_bytes=1000, cost_bytes=2000, load_s=1.5, restarts=0, reason="",
        mlx_active_bytes=400, mlx_cache_bytes=50, mlx_peak_bytes=600)
    base.update(fields)
    return WorkerStatus(**base)  # type: ignore[arg-type]


class FakeSupervisor:
    def __init__(self) -> None:
        self.workers = [worker()]
        self.figures: dict[str, object] = {
            "budget_bytes": 8_000, "committed_bytes": 2_000, "pressure": "high",
            "available_bytes": 5_000, "total_bytes": 16_000, "swap_percent": 12.5,
            "psi_some_avg10": None, "threshold_bytes": 1_000, "max_loaded_models": 2,
        }

    def status(self) -> list[WorkerStatus]:
        return self.workers

    def memory_figures(self) -> dict[str, object]:
        return self.figures


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def supervisor() -> FakeSupervisor:
    return FakeSupervisor()


@pytest.fixture
def metrics(supervisor: FakeSupervisor) -> Metrics:
    return Metrics(supervisor)


def test_requests_counted_by_model_endpoint_status(metrics: Metrics) -> None:
    metrics.request_done("m", "chat", 200, duration_s=0.5)
    metrics.request_done("m", "chat", 200, duration_s=1.5)
    metrics.request_done("m", "chat", 502, duration_s=0.1)
    s = scrape(metrics)
    assert value(s, "mlxrouter_requests_total", model="m", endpoint="chat", status="200") == 2
    assert value(s, "mlxrouter_requests_total", model="m", endpoint="chat", status="502") == 1
    assert value(s, "mlxrouter_request_duration_seconds_count", model="m", endpoint="chat") == 3
    assert value(s, "mlxrouter_request_duration_seconds_sum",
                 model="m", endpoint="chat") == pytest.approx(2.1)


def test_ttft_and_queue_histograms(metrics: Metrics) -> None:
    metrics.request_done("m", "chat", 200, duration_s=1.0, queue_s=0.25, ttft_s=0.125)
    metrics.request_done("m", "completions", 200, duration_s=1.0)
    s = scrape(metrics)
    assert value(s, "mlxrouter_time_to_first_token_seconds_count", model="m") == 1
    assert value(s, "mlxrouter_time_to_first_token_seconds_sum", model="m") == 0.125
    assert value(s, "mlxrouter_time_to_first_token_seconds_bucket", model="m", le="0.1") == 0
    assert value(s, "mlxrouter_time_to_first_token_seconds_bucket", model="m", le="0.25") == 1
    assert value(s, "mlxrouter_queue_time_seconds_count", model="m") == 1
    assert value(s, "mlxrouter_queue_time_seconds_sum", model="m") == 0.25


def test_tokens_accumulate(metrics: Metrics) -> None:
    metrics.request_done("m", "chat", 200, duration_s=1, prompt_tokens=10, completion_tokens=5,
                         cached_tokens=4)
    metrics.request_done("m", "chat", 200, duration_s=1, prompt_tokens=7, completion_tokens=3)
    s = scrape(metrics)
    assert value(s, "mlxrouter_prompt_tokens_total", model="m") == 17
    assert value(s, "mlxrouter_generated_tokens_total", model="m") == 8
    assert value(s, "mlxrouter_cached_tokens_total", model="m") == 4


def test_rejections_by_reason(metrics: Metrics) -> None:
    metrics.rejected("m", "queue_full")
    metrics.rejected("m", "queue_full")
    metrics.rejected("m", "no_memory")
    s = scrape(metrics)
    assert value(s, "mlxrouter_rejections_total", model="m", reason="queue_full") == 2
    assert value(s, "mlxrouter_rejections_total", model="m", reason="no_memory") == 1


def test_inter_token_latency_has_fine_buckets(metrics: Metrics) -> None:
    metrics.inter_token("m", 0.002)
    metrics.inter_token("m", 0.03)
    s = scrape(metrics)
    assert value(s, "mlxrouter_inter_token_latency_seconds_count", model="m") == 2
    assert value(s, "mlxrouter_inter_token_latency_seconds_sum", model="m") == pytest.approx(0.032)
    assert value(s, "mlxrouter_inter_token_latency_seconds_bucket", model="m", le="0.001") == 0
    assert value(s, "mlxrouter_inter_token_latency_seconds_bucket", model="m", le="0.0025") == 1


def test_supervisor_events(metrics: Metrics) -> None:
    metrics.supervisor_event("ready", "m", "")
    metrics.supervisor_event("crash", "m", "signal 9")
    metrics.supervisor_event("crash", "m", "signal 9")
    metrics.supervisor_event("start_failure", "m", "code 70")
    metrics.supervisor_event("eviction", "m", "idle")
    metrics.supervisor_event("eviction", "m", "memory")
    metrics.supervisor_event("something_new", "m", "x")
    s = scrape(metrics)
    assert value(s, "mlxrouter_worker_restarts_total", model="m", reason="signal 9") == 2
    assert value(s, "mlxrouter_worker_restarts_total", model="m", reason="code 70") == 1
    assert value(s, "mlxrouter_evictions_total", model="m", reason="idle") == 1
    assert value(s, "mlxrouter_evictions_total", model="m", reason="memory") == 1
    assert not any(name.startswith("mlxrouter_worker_restarts") and dict(labels).get("reason")
                   in ("", "x") for name, labels in s)


def test_load_duration(metrics: Metrics) -> None:
    metrics.load_finished("m", 3.5)
    s = scrape(metrics)
    assert value(s, "mlxrouter_model_load_duration_seconds_count", model="m") == 1
    assert value(s, "mlxrouter_model_load_duration_seconds_sum", model="m") == 3.5


def test_worker_gauges_reflect_status(metrics: Metrics) -> None:
    s = scrape(metrics)
    assert value(s, "mlxrouter_running_requests", model="m") == 2
    assert value(s, "mlxrouter_waiting_requests", model="m") == 3
    assert value(s, "mlxrouter_worker_memory_bytes", model="m") == 1000
    assert value(s, "mlxrouter_worker_cost_bytes", model="m") == 2000
    assert value(s, "mlxrouter_mlx_active_memory_bytes", model="m") == 400
    assert value(s, "mlxrouter_mlx_cache_memory_bytes", model="m") == 50
    assert value(s, "mlxrouter_mlx_peak_memory_bytes", model="m") == 600


def test_worker_state_is_one_hot(metrics: Metrics) -> None:
    s = scrape(metrics)
    assert value(s, "mlxrouter_worker_state", model="m", state="RUNNING") == 1
    others = [st for st in State if st is not State.RUNNING]
    assert len(others) == 7
    for st in others:
        assert value(s, "mlxrouter_worker_state", model="m", state=st.value) == 0


def test_gauges_read_at_scrape_time(supervisor: FakeSupervisor, metrics: Metrics) -> None:
    scrape(metrics)
    supervisor.workers = [worker(state="BACKOFF", in_flight=0), worker("n", state="STOPPED")]
    supervisor.figures["pressure"] = "normal"
    s = scrape(metrics)
    assert value(s, "mlxrouter_worker_state", model="m", state="BACKOFF") == 1
    assert value(s, "mlxrouter_worker_state", model="m", state="RUNNING") == 0
    assert value(s, "mlxrouter_worker_state", model="n", state="STOPPED") == 1
    assert value(s, "mlxrouter_running_requests", model="m") == 0
    assert value(s, "mlxrouter_memory_pressure_level") == 0


def test_none_mlx_figures_are_skipped(supervisor: FakeSupervisor, metrics: Metrics) -> None:
    supervisor.workers = [worker(pid=None, memory_bytes=None, cost_bytes=None,
                                 mlx_active_bytes=None, mlx_cache_bytes=None,
                                 mlx_peak_bytes=None, state="STOPPED")]
    s = scrape(metrics)
    for name in ("mlxrouter_mlx_active_memory_bytes", "mlxrouter_mlx_cache_memory_bytes",
                 "mlxrouter_mlx_peak_memory_bytes", "mlxrouter_worker_memory_bytes",
                 "mlxrouter_worker_cost_bytes"):
        assert value(s, name, model="m") is None
    assert value(s, "mlxrouter_running_requests", model="m") == 2


def test_memory_figures(metrics: Metrics) -> None:
    s = scrape(metrics)
    assert value(s, "mlxrouter_memory_budget_bytes") == 8_000
    assert value(s, "mlxrouter_memory_committed_bytes") == 2_000
    assert value(s, "mlxrouter_memory_available_bytes") == 5_000
    assert value(s, "mlxrouter_swap_used_percent") == 12.5
    assert value(s, "mlxrouter_memory_pressure_level") == 2
    assert value(s, "mlxrouter_memory_pressure", level="high") == 1
    for level in ("normal", "moderate", "critical"):
        assert value(s, "mlxrouter_memory_pressure", level=level) == 0


def test_every_name_is_prefixed_and_labels_bounded(metrics: Metrics) -> None:
    metrics.request_done("m", "chat", 200, duration_s=1, queue_s=0.1, ttft_s=0.2,
                         prompt_tokens=1, completion_tokens=1, cached_tokens=1)
    metrics.rejected("m", "timeout")
    metrics.inter_token("m", 0.01)
    metrics.supervisor_event("crash", "m", "signal 9")
    metrics.supervisor_event("eviction", "m", "pressure")
    metrics.load_finished("m", 2.0)
    s = scrape(metrics)
    allowed = {"model", "endpoint", "status", "reason", "state", "level", "le"}
    assert s
    for name, labels in s:
        assert name.startswith("mlxrouter_"), name
        assert {k for k, _ in labels} <= allowed, (name, labels)


def test_registries_are_independent(supervisor: FakeSupervisor) -> None:
    first, second = Metrics(supervisor), Metrics(supervisor)
    first.rejected("m", "queue_full")
    assert value(scrape(first), "mlxrouter_rejections_total", model="m", reason="queue_full") == 1
    assert value(scrape(second), "mlxrouter_rejections_total", model="m",
                 reason="queue_full") is None


def test_module_imports_no_mlx() -> None:
    tree = ast.parse(Path(metrics_module.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("mlx", "mlx_lm", "mlx_vlm")]
