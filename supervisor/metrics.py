"""Prometheus metrics (optional: `--metrics HOST:PORT`, with prometheus-client installed).

The event loop records events here; prometheus-client's own HTTP thread serves them. Gauges of
the loop's state (queues, workers) are set by the loop once a second, so the HTTP thread never
reads the scheduler's dicts while the loop changes them.
"""

from __future__ import annotations

from typing import Any, Mapping


class MetricsUnavailable(RuntimeError):
    """Metrics were asked for but cannot be served; the message says why and what to do."""


class Metrics:
    """Records nothing unless started with an address."""

    def __init__(self, address: str = "") -> None:
        self.enabled = bool(address)
        self.address = address
        if not self.enabled:
            return
        try:
            import prometheus_client as prom
        except ImportError:
            raise MetricsUnavailable("--metrics needs the prometheus-client package: "
                                     "pip install 'stoker[metrics]' (or prometheus-client)") from None
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("stoker_requests", "Generate requests ended, by model and outcome",
                                     ["model", "outcome"], registry=r)
        self.tokens = prom.Counter("stoker_tokens_generated", "Tokens streamed to clients", ["model"], registry=r)
        self.loads = prom.Counter("stoker_model_loads", "Workers that finished loading their model", ["model"],
                                  registry=r)
        self.evictions = prom.Counter("stoker_evictions", "Idle workers stopped to make room for another model",
                                      ["model"], registry=r)
        self.crashes = prom.Counter("stoker_worker_crashes", "Workers that died without being asked to",
                                    ["model"], registry=r)
        self.starts = prom.Counter("stoker_worker_starts", "Worker processes started (first loads and restarts)",
                                   ["model"], registry=r)
        self.queue_depth = prom.Gauge("stoker_queue_depth", "Requests waiting, by model", ["model"], registry=r)
        self.workers = prom.Gauge("stoker_workers", "Workers by state", ["state"], registry=r)
        self.memory = prom.Gauge("stoker_memory_bytes", "Memory counted against the budgets",
                                 ["kind", "what"], registry=r)
        self.load_seconds = prom.Histogram("stoker_load_seconds", "Model load time", ["model"], registry=r,
                                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft_seconds = prom.Histogram("stoker_time_to_first_token_seconds", "From accepted to first token",
                                           ["model"], registry=r,
                                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens_per_second = prom.Histogram("stoker_tokens_per_second", "Streaming rate of a request",
                                                ["model"], registry=r,
                                                buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640, 1280))
        host, _, port = address.rpartition(":")
        try:
            self.server, self.thread = prom.start_http_server(int(port), addr=host.strip("[]"), registry=r)
        except OSError as exc:
            raise MetricsUnavailable(f"cannot serve metrics at {address}: {exc.strerror or exc}") from None

    def request_ended(self, model: str, outcome: str, tokens: int, ttft_s: float | None, stream_s: float) -> None:
        if not self.enabled:
            return
        self.requests.labels(model, outcome).inc()
        if tokens:
            self.tokens.labels(model).inc(tokens)
        if ttft_s is not None:
            self.ttft_seconds.labels(model).observe(ttft_s)
        if tokens > 1 and stream_s > 0:
            self.tokens_per_second.labels(model).observe(tokens / stream_s)

    def worker_started(self, model: str) -> None:
        if self.enabled:
            self.starts.labels(model).inc()

    def worker_loaded(self, model: str, seconds: float) -> None:
        if self.enabled:
            self.loads.labels(model).inc()
            self.load_seconds.labels(model).observe(seconds)

    def worker_crashed(self, model: str) -> None:
        if self.enabled:
            self.crashes.labels(model).inc()

    def evicted(self, model: str) -> None:
        if self.enabled:
            self.evictions.labels(model).inc()

    def snapshot(self, queues: Mapping[str, int], models: Any, worker_states: Mapping[str, int],
                 memory: Mapping[tuple[str, str], int]) -> None:
        """The loop's state, once a second."""
        if not self.enabled:
            return
        for model in models:
            self.queue_depth.labels(model).set(queues.get(model, 0))
        for state, n in worker_states.items():
            self.workers.labels(state).set(n)
        for (kind, what), n in memory.items():
            self.memory.labels(kind, what).set(n)

    def close(self) -> None:
        if self.enabled:
            self.server.shutdown()
            self.server.server_close()
