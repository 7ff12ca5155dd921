"""Prometheus metrics of a worker (:class:`Metrics`) and of the archiver
(:class:`ArchiverMetrics`), served with their health on one port (:mod:`streamrec.health`:
``/metrics``, ``/healthz``, ``/readyz``).

Each owns its registry, so several apps (tests) can live in one process. Labelled series
whose labels are known in advance (dead-letter reasons) start at 0, so ``rate()`` sees the
first one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from streamrec import health as health_endpoint
from streamrec.health import Health
from streamrec.serving.events import REASONS
from streamrec.serving.records import SweepResult

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _Lag:
    """Consumer lag per partition: ``streamrec_consumer_lag`` (the log end offset minus the
    group's committed offset) and ``streamrec_consumer_end_offset``, labelled by group, topic
    and partition (worker and archiver alike)."""

    def __init__(self, r: CollectorRegistry) -> None:
        labels = ["group", "topic", "partition"]
        self.lag = Gauge(
            "streamrec_consumer_lag",
            "Records of the partition not yet committed by the group (log end - committed)",
            labels,
            registry=r,
        )
        self.end = Gauge(
            "streamrec_consumer_end_offset",
            "Log end offset of the partition as the consumer last saw it",
            labels,
            registry=r,
        )
        self._shown: set[tuple[str, str, str]] = set()

    def observe(self, group: str, topic: str, by_partition: Mapping[int, tuple[int, int]]) -> None:
        """(end, lag) per assigned partition; partitions no longer listed are removed."""
        now = {(group, topic, str(p)) for p in by_partition}
        for labels in self._shown - now:
            self.lag.remove(*labels)
            self.end.remove(*labels)
        for p, (end, lag) in by_partition.items():
            self.end.labels(group, topic, str(p)).set(end)
            self.lag.labels(group, topic, str(p)).set(lag)
        self._shown = now


class Metrics:
    """The worker's metrics; ``observe_batch`` is called once per micro-batch."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.health = Health(r)
        self._lag = _Lag(r)
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
        for reason in REASONS:
            self.dead_letters.labels(reason)
        self.unknown_items = Counter(
            "streamrec_unknown_items", "Clicks on items the model does not know", registry=r
        )
        self.changelog_skipped = Counter(
            "streamrec_changelog_records_skipped",
            "Changelog records recovery skipped: no state key of this layout",
            ["kind"],
            registry=r,
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
        self.model_created = Gauge(
            "streamrec_model_created_timestamp_seconds",
            "When the served checkpoint was written (its age: time() - this)",
            registry=r,
        )
        self.model_loaded = Gauge(
            "streamrec_model_loaded_timestamp_seconds",
            "When the served model was loaded or swapped in",
            registry=r,
        )
        self.model_refusals = Counter(
            "streamrec_model_refusals",
            "Published checkpoints not loaded (bad_pointer, version_reused, invalid), each "
            "problem counted once",
            ["reason"],
            registry=r,
        )

    def observe_lag(
        self, group: str, topic: str, by_partition: Mapping[int, tuple[int, int]]
    ) -> None:
        """(end offset, lag) per assigned partition
        (:func:`streamrec.kafka.clients.lag_by_partition`)."""
        self._lag.observe(group, topic, by_partition)

    def set_states(self, sessions: int, users: int) -> None:
        """The session and user states held (the assigned partitions')."""
        self.sessions.set(sessions)
        self.users.set(users)

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

    def set_model(self, name: str, version: str, device: str, created_at: str = "") -> None:
        self.model.info({"name": name, "version": version, "device": device})
        self.model_loaded.set(time.time())
        created = _timestamp(created_at)
        if created is not None:
            self.model_created.set(created)

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve /metrics, /healthz and /readyz on ``port`` (0 disables); returns the server
        (``.shutdown()``)."""
        return health_endpoint.serve(self.registry, self.health, port, addr)


def _timestamp(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


class ArchiverMetrics:
    """The archiver's metrics (``streamrec archive``), with its health and lag."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.health = Health(r)
        self._lag = _Lag(r)
        self.records = Counter(
            "streamrec_archiver_records", "Records read from the clicks topic", registry=r
        )
        self.archived = Counter(
            "streamrec_archiver_archived", "Clicks written to the archive", registry=r
        )
        self.files = Counter("streamrec_archiver_files", "Archive files written", registry=r)
        self.bytes = Counter(
            "streamrec_archiver_bytes", "Bytes of archive files written", registry=r
        )
        self.archived_offset = Gauge(
            "streamrec_archiver_last_archived_offset",
            "The last offset of the partition whose range is archived and committed",
            ["topic", "partition"],
            registry=r,
        )

    def observe_file(self, rows: int, size: int) -> None:
        self.files.inc()
        self.archived.inc(rows)
        self.bytes.inc(size)

    def observe_lag(
        self, group: str, topic: str, by_partition: Mapping[int, tuple[int, int]]
    ) -> None:
        self._lag.observe(group, topic, by_partition)

    def forget_partition(self, topic: str, partition: int) -> None:
        with contextlib.suppress(KeyError):  # never archived anything of it
            self.archived_offset.remove(topic, str(partition))

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        return health_endpoint.serve(self.registry, self.health, port, addr)
