"""Prometheus metrics of a worker, served over HTTP (``/metrics``).

Each :class:`Metrics` owns its registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from streamrec.serving.records import SweepResult

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    """The worker's metrics; ``observe_batch`` is called once per micro-batch."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("streamrec_events", "Events consumed (valid or not)", registry=r)
        self.clicks = Counter("streamrec_clicks", "Valid clicks processed", registry=r)
        self.recommendations = Counter(
            "streamrec_recommendations", "Recommendations published", registry=r
        )
        self.duplicates = Counter(
            "streamrec_duplicates", "Redelivered events recognised by offset", registry=r
        )
        self.dead_letters = Counter(
            "streamrec_dead_letters",
            "Messages sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.unknown_items = Counter(
            "streamrec_unknown_items", "Clicks on items the model does not know", registry=r
        )
        self.sessions_ended = Counter(
            "streamrec_sessions_ended",
            "Sessions closed (by id, gap, end event or sweep)",
            registry=r,
        )
        self.batch_size = Histogram(
            "streamrec_batch_size", "Events per micro-batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "streamrec_click_to_recommendation_seconds",
            "From the click's Kafka timestamp to its recommendation being handed to the producer",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "streamrec_checkpoint_seconds",
            "Checkpoint time (outputs and changelog flushed, offsets committed, state written)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sweep_seconds = Histogram(
            "streamrec_sweep_step_seconds",
            "One bounded step of the idle sweep (the poll loop waits for it)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "streamrec_model_step_seconds",
            "Model time per micro-batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge("streamrec_session_states", "Session states held", registry=r)
        self.users = Gauge("streamrec_user_states", "User states held", registry=r)
        self.model = Info("streamrec_model", "The model being served", registry=r)
        self.model_swaps = Counter("streamrec_model_swaps", "Models hot-swapped in", registry=r)

    def observe_sweep(self, res: SweepResult) -> None:
        """An idle sweep's result: counters, gauges, one log line."""
        self.sessions_ended.inc(res.sessions_ended)
        if res.sessions_ended or res.users_expired:
            log.info(
                "idle sweep: closed %d sessions, expired %d users",
                res.sessions_ended,
                res.users_expired,
            )
        if res.counted:  # the bounded sweep steps do not count states
            self.sessions.set(res.sessions_left)
            self.users.set(res.users_left)

    def observe_batch(
        self,
        n_events: int,
        stats: dict[str, int],
        latencies: Iterable[float],
        model_seconds: float,
    ) -> None:
        self.events.inc(n_events)
        self.batch_size.observe(n_events)
        self.clicks.inc(stats.get("clicks", 0))
        self.recommendations.inc(stats.get("recommendations", 0))
        self.duplicates.inc(stats.get("duplicates", 0))
        self.unknown_items.inc(stats.get("unknown_items", 0))
        self.sessions_ended.inc(stats.get("sessions_ended", 0))
        self.model_seconds.observe(model_seconds)
        for key, n in stats.items():
            if key.startswith("dead_letter:"):
                self.dead_letters.labels(key.split(":", 1)[1]).inc(n)
        for lat in latencies:
            self.latency.observe(lat)

    def set_model(self, name: str, version: str, device: str) -> None:
        self.model.info({"name": name, "version": version, "device": device})

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on ``port`` (0 disables); returns the server (``.shutdown()``)."""
        if not port:
            return None
        started = start_http_server(port, addr=addr, registry=self.registry)
        return started[0] if isinstance(started, tuple) else started
