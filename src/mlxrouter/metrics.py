"""Prometheus metrics: request counters and latency histograms, plus a collector that reads the
supervisor's worker and memory figures at scrape time.

Runs in the daemon, on its event loop; imports no mlx. Owns one `CollectorRegistry` (never the
global default, so several daemons in one test process do not collide). Labels are bounded: model,
endpoint, status code, reason, state, level; never request ids or prompt text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from .states import State, WorkerStatus

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                     60.0, 120.0)
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5,
                         1.0, 2.5, 5.0)
LOAD_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

PRESSURE_LEVELS = ("normal", "moderate", "high", "critical")

# WorkerStatus field -> (metric name, help); None values are skipped, not reported as 0.
WORKER_GAUGES = (
    ("in_flight", "mlxrouter_running_requests", "Requests holding a lease on the worker."),
    ("waiting", "mlxrouter_waiting_requests", "Requests waiting for a lease."),
    ("memory_bytes", "mlxrouter_worker_memory_bytes", "Worker process memory (PSS or RSS)."),
    ("cost_bytes", "mlxrouter_worker_cost_bytes", "Bytes the budget charges the worker."),
    ("mlx_active_bytes", "mlxrouter_mlx_active_memory_bytes", "MLX active memory."),
    ("mlx_cache_bytes", "mlxrouter_mlx_cache_memory_bytes", "MLX buffer cache memory."),
    ("mlx_peak_bytes", "mlxrouter_mlx_peak_memory_bytes", "MLX peak memory."),
)

# memory_figures() key -> (metric name, help).
MEMORY_GAUGES = (
    ("budget_bytes", "mlxrouter_memory_budget_bytes", "Memory budget for loaded models."),
    ("committed_bytes", "mlxrouter_memory_committed_bytes", "Bytes charged to live workers."),
    ("available_bytes", "mlxrouter_memory_available_bytes", "Memory available on the host."),
    ("swap_percent", "mlxrouter_swap_used_percent", "Swap in use, percent."),
)

RESTART_KINDS = ("crash", "start_failure")


class StatusSource(Protocol):
    def status(self) -> list[WorkerStatus]: ...

    def memory_figures(self) -> dict[str, object]: ...


class SupervisorCollector:
    """Gauges read from the supervisor at scrape time, so they are never stale."""

    def __init__(self, supervisor: StatusSource) -> None:
        self.supervisor = supervisor

    def describe(self) -> list[Metric]:
        # Registering must not call the supervisor; names are not checked for duplicates.
        return []

    def collect(self) -> Iterator[Metric]:
        statuses = self.supervisor.status()
        yield from worker_gauges(statuses)
        yield state_gauge(statuses)
        yield from memory_gauges(self.supervisor.memory_figures())


def worker_gauges(statuses: list[WorkerStatus]) -> Iterator[Metric]:
    for field, name, doc in WORKER_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=["model"])
        for status in statuses:
            value = getattr(status, field)
            if value is not None:
                family.add_metric([status.model], value)
        yield family


def state_gauge(statuses: list[WorkerStatus]) -> Metric:
    family = GaugeMetricFamily("mlxrouter_worker_state",
                               "1 for the worker's current supervisor state, 0 for the others.",
                               labels=["model", "state"])
    for status in statuses:
        for state in State:
            family.add_metric([status.model, state.value], 1 if status.state == state else 0)
    return family


def memory_gauges(figures: dict[str, object]) -> Iterator[Metric]:
    for key, name, doc in MEMORY_GAUGES:
        value = figures.get(key)
        if isinstance(value, int | float):
            yield GaugeMetricFamily(name, doc, value=value)
    yield from pressure_gauges(str(figures.get("pressure", "")))


def pressure_gauges(pressure: str) -> Iterator[Metric]:
    if pressure not in PRESSURE_LEVELS:
        return
    yield GaugeMetricFamily("mlxrouter_memory_pressure_level",
                            "Memory pressure: 0 normal, 1 moderate, 2 high, 3 critical.",
                            value=PRESSURE_LEVELS.index(pressure))
    family = GaugeMetricFamily("mlxrouter_memory_pressure",
                               "1 for the current memory pressure level, 0 for the others.",
                               labels=["level"])
    for level in PRESSURE_LEVELS:
        family.add_metric([level], 1 if level == pressure else 0)
    yield family


class Metrics:
    """The daemon's metrics: the gateway and supervisor report events, `/metrics` renders."""

    def __init__(self, supervisor: StatusSource) -> None:
        self.registry = CollectorRegistry()
        self._define_counters()
        self._define_histograms()
        self.registry.register(SupervisorCollector(supervisor))

    def _define_counters(self) -> None:
        reg = self.registry
        self.requests = Counter("mlxrouter_requests_total",
                                "Requests answered, by status code (a stream that fails after "
                                "its 200 counts under its error's status).",
                                ["model", "endpoint", "status"], registry=reg)
        self.rejections = Counter("mlxrouter_rejections_total",
                                  "Requests refused before generation, by error code.",
                                  ["model", "reason"], registry=reg)
        self.prompt_tokens = Counter("mlxrouter_prompt_tokens_total", "Prompt tokens processed.",
                                     ["model"], registry=reg)
        self.generated_tokens = Counter("mlxrouter_generated_tokens_total",
                                        "Completion tokens generated.", ["model"], registry=reg)
        self.cached_tokens = Counter("mlxrouter_cached_tokens_total",
                                     "Prompt tokens served from the prompt cache.", ["model"],
                                     registry=reg)
        self.restarts = Counter("mlxrouter_worker_restarts_total",
                                "Worker crashes and failed starts, by exit reason.",
                                ["model", "reason"], registry=reg)
        self.evictions = Counter("mlxrouter_evictions_total", "Workers stopped to free memory "
                                 "or after idling, by reason.", ["model", "reason"], registry=reg)

    def _define_histograms(self) -> None:
        reg = self.registry
        self.ttft = Histogram("mlxrouter_time_to_first_token_seconds",
                              "Time from admission to the first generated token.", ["model"],
                              buckets=LATENCY_BUCKETS_S, registry=reg)
        self.inter_token_latency = Histogram("mlxrouter_inter_token_latency_seconds",
                                             "Time between streamed tokens.", ["model"],
                                             buckets=INTER_TOKEN_BUCKETS_S, registry=reg)
        self.duration = Histogram("mlxrouter_request_duration_seconds",
                                  "Time from admission to the last byte.", ["model", "endpoint"],
                                  buckets=LATENCY_BUCKETS_S, registry=reg)
        self.queue_time = Histogram("mlxrouter_queue_time_seconds",
                                    "Time waiting for a lease on a worker.", ["model"],
                                    buckets=LATENCY_BUCKETS_S, registry=reg)
        self.load_duration = Histogram("mlxrouter_model_load_duration_seconds",
                                       "Time from spawn to Ready.", ["model"],
                                       buckets=LOAD_BUCKETS_S, registry=reg)

    def request_done(self, model: str, endpoint: str, status: int, *, duration_s: float,
                     queue_s: float | None = None, ttft_s: float | None = None,
                     prompt_tokens: int = 0, completion_tokens: int = 0,
                     cached_tokens: int = 0) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()
        self.duration.labels(model, endpoint).observe(duration_s)
        if queue_s is not None:
            self.queue_time.labels(model).observe(queue_s)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        self._count_tokens(model, prompt_tokens, completion_tokens, cached_tokens)

    def _count_tokens(self, model: str, prompt: int, completion: int, cached: int) -> None:
        self.prompt_tokens.labels(model).inc(max(prompt, 0))
        self.generated_tokens.labels(model).inc(max(completion, 0))
        self.cached_tokens.labels(model).inc(max(cached, 0))

    def rejected(self, model: str, reason: str) -> None:
        self.rejections.labels(model, reason).inc()

    def inter_token(self, model: str, seconds: float) -> None:
        self.inter_token_latency.labels(model).observe(seconds)

    def supervisor_event(self, kind: str, model: str, reason: str) -> None:
        """ready: nothing to count (the state gauge shows it); crash / start_failure: a restart;
        eviction: reason memory / max_loaded_models / idle / pressure."""
        if kind in RESTART_KINDS:
            self.restarts.labels(model, reason or kind).inc()
        elif kind == "eviction":
            self.evictions.labels(model, reason).inc()
        elif kind != "ready":
            logger.debug("unknown supervisor event kind=%s model=%s", kind, model)

    def load_finished(self, model: str, seconds: float) -> None:
        self.load_duration.labels(model).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
