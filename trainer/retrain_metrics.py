"""Prometheus metrics of ``trainer retrain --every`` (served with ``/healthz`` and
``/readyz`` by :mod:`streamrec.health`, as the workers' are).

They live here, beside the cycle they describe, and not in ``streamrec.metrics``: that module
is the worker's (it reads the serving pipeline's results), and the trainer never imports the
live path. Only the endpoint is shared, from a module below every room.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from streamrec import health as health_endpoint
from streamrec.health import Health
from streamrec.loop import registry

#: what a cycle can end with: a candidate published; the current model kept (the gate, or no
#: holdout to judge on); no cycle (no data in the window); an unexpected error
OUTCOMES = ("published", "kept", "skipped", "failed")
PHASES = ("read", "train", "evaluate", "publish")


class RetrainMetrics:
    """The retrain loop's metrics and health (one registry per loop)."""

    def __init__(self, models: str, registry_: CollectorRegistry | None = None) -> None:
        self.models = models
        self.registry = registry_ or CollectorRegistry()
        r = self.registry
        # a cycle lasts as long as training does; the loop marks itself busy meanwhile
        self.health = Health(r)
        self.cycles = Counter("streamrec_retrain_cycles", "Retrain cycles run", registry=r)
        self.decisions = Counter(
            "streamrec_retrain_decisions", "Retrain cycles by outcome", ["outcome"], registry=r
        )
        for outcome in OUTCOMES:
            self.decisions.labels(outcome)
        self.last_cycle = Gauge(
            "streamrec_retrain_last_cycle_timestamp_seconds",
            "When the last cycle ended",
            ["outcome"],
            registry=r,
        )
        self.phase_seconds = Gauge(
            "streamrec_retrain_phase_seconds",
            "Seconds of each phase of the last cycle that reached it",
            ["phase"],
            registry=r,
        )
        self.metric = Gauge(
            "streamrec_retrain_holdout_metric",
            "The gate's figure on the holdout in the last cycle (candidate, current model)",
            ["model", "metric"],
            registry=r,
        )
        self.published = Info(
            "streamrec_retrain_published", "The version the registry publishes", registry=r
        )
        self.published_created = Gauge(
            "streamrec_retrain_published_created_timestamp_seconds",
            "When the published version was written (its age: time() - this)",
            registry=r,
        )
        self.observe_registry()

    def observe_cycle(self, rec: Mapping[str, Any], metric: str) -> None:
        """A finished cycle's record (``trainer.retrain.run_cycle``'s)."""
        decision = rec.get("decision", {})
        self._count("published" if decision.get("published") else "kept")
        for phase, seconds in rec.get("seconds", {}).items():
            self.phase_seconds.labels(phase).set(seconds)
        figures = rec.get("metrics", {})
        for model in ("candidate", "current"):
            value = figures.get(model, {}).get(metric)
            if isinstance(value, int | float):
                self.metric.labels(model, metric).set(value)
        self.observe_registry()

    def observe_skipped(self) -> None:
        self._count("skipped")

    def observe_failed(self) -> None:
        self._count("failed")

    def _count(self, outcome: str) -> None:
        self.cycles.inc()
        self.decisions.labels(outcome).inc()
        self.last_cycle.labels(outcome).set(time.time())

    def observe_registry(self) -> None:
        """The published version and when it was written, from the registry."""
        if not registry.is_registry(self.models):
            return
        current = registry.current_version(self.models)
        for v in registry.list_versions(self.models):
            if v.version == current:
                self.published.info({"version": v.version, "model": v.model_name})
                with contextlib.suppress(ValueError):  # no creation time recorded
                    created = datetime.fromisoformat(v.created_at).timestamp()
                    self.published_created.set(created)

    def serve(self, port: int, host: str) -> Any:
        return health_endpoint.serve(self.registry, self.health, port, host)
