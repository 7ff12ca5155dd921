"""The rollback guard: a new champion that does worse on live clicks than the one before it
is rolled back, without a person.

After the champion changes (``trainer retrain`` publishes, ``trainer models promote``), the
guard compares the new champion's live Recall@k (every worker's counts, read from the live
metrics topic: :mod:`streamrec.loop.live_report`) with the previous champion's over the
``window_s`` seconds before the change. Once the new one has ``min_predictions`` predictions,
it is rolled back when the interval of the difference (new minus previous, at
``confidence``) lies wholly below ``-tolerance``: worse beyond the tolerance, at that
confidence. After ``max_predictions`` without that, the new champion is kept and no longer
watched. A rollback is a registry alias change (``registry.rollback``, ``by="guard"``, with
the figures as its reason in ``registry-log.jsonl``); the workers follow the champion's
pointer and swap back.

Where it runs: a small service of its own (``streamrec guard``), not the retrainer's loop.
The trainer never imports the live path (it has no Kafka client: the import contracts), a
champion also changes by ``promote`` when no retrainer runs, and the guard must add up the
counts of every worker, which only the metrics topic has. It keeps nothing of its own: what
it has judged is in the registry's log, so a restarted guard carries on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from streamrec.loop import registry
from streamrec.loop.live_report import CHAMPION, difference
from streamrec.serving.live import KS, LiveCounts, LiveRecord

log = logging.getLogger(__name__)

#: the registry log's ``by`` of the guard's own changes (a rollback is never judged again)
GUARD = "guard"
#: the registry log's event of a champion the guard has kept (no longer watched)
KEPT = "guard-kept"


@dataclass(frozen=True)
class GuardConfig:
    #: Recall@k compared
    k: int = 20
    #: how much worse (absolute Recall@k) the new champion may be before it is rolled back
    tolerance: float = 0.0
    #: the confidence of the interval of the difference
    confidence: float = 0.95
    #: predictions of the new champion before the guard judges it
    min_predictions: int = 500
    #: predictions after which a new champion not found worse is kept (no longer watched)
    max_predictions: int = 20_000
    #: seconds before the change over which the previous champion's figure is taken
    window_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.k not in KS:
            raise ValueError(f"k must be one of {KS}, got {self.k}")
        if not 0 < self.min_predictions <= self.max_predictions:
            raise ValueError("need 0 < min_predictions <= max_predictions")


Action = Literal["wait", "keep", "rollback"]


@dataclass(frozen=True)
class Verdict:
    action: Action
    new: str
    previous: str
    reason: str
    figures: Mapping[str, Any]


@dataclass(frozen=True)
class Change:
    """The champion's last change: to ``new`` from ``previous`` at ``time`` (epoch s)."""

    new: str
    previous: str
    time: float


def champion_counts(
    records: Iterable[LiveRecord], version: str, since: float = -math.inf
) -> LiveCounts:
    """The champion arm's counts of ``version``, from records published at ``since`` or
    later (each record once)."""
    total = LiveCounts()
    seen: set[tuple[str, int, int, int]] = set()
    for r in records:
        if r.time < since or r.ident in seen:
            continue
        seen.add(r.ident)
        c = r.counts.get((CHAMPION, version))
        if c is not None:
            total.add(c)
    return total


def judge(records: Iterable[LiveRecord], change: Change, cfg: GuardConfig) -> Verdict:
    """What to do about ``change.new`` given the live metrics ``records`` so far."""
    records = list(records)
    new = champion_counts(records, change.new)
    before = champion_counts(records, change.previous, change.time - cfg.window_s)
    figures: dict[str, Any] = {
        "k": cfg.k,
        "new_predictions": new.n,
        "previous_predictions": before.n,
        f"new_recall@{cfg.k}": new.recall(cfg.k) if new.n else None,
        f"previous_recall@{cfg.k}": before.recall(cfg.k) if before.n else None,
    }

    def verdict(action: Action, reason: str) -> Verdict:
        return Verdict(action, change.new, change.previous, reason, figures)

    if before.n == 0:
        return verdict("wait", f"no live figures of {change.previous} to compare with")
    if new.n < cfg.min_predictions:
        return verdict("wait", f"{new.n} of {cfg.min_predictions} predictions")
    d = difference(new, before, "recall", cfg.k, cfg.confidence)
    figures.update(difference=d.value, low=d.low, high=d.high, confidence=cfg.confidence)
    said = (
        f"live Recall@{cfg.k} {change.new} minus {change.previous}: {d} at "
        f"{cfg.confidence:.0%} over {new.n} and {before.n} predictions"
    )
    if d.high < -cfg.tolerance:
        return verdict("rollback", f"{said}: worse beyond the tolerance {cfg.tolerance}")
    if new.n >= cfg.max_predictions:
        return verdict("keep", f"{said}: not worse beyond the tolerance {cfg.tolerance}")
    return verdict("wait", said)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def pending_change(models: str | Path) -> Change | None:
    """The champion's last change if the guard has still to judge it: made by publishing or
    promoting (not by a rollback), from a previous champion, and not yet kept."""
    log_records = registry.read_alias_log(models)
    changes = [r for r in log_records if r.get("event") == CHAMPION]
    if not changes:
        return None
    last = changes[-1]
    if last.get("previous") is None or last.get("by") in (GUARD, "rollback"):
        return None
    if registry.alias_version(models) != last.get("version"):
        return None  # the pointer moved without a record: nothing safe to judge
    kept = {r.get("version") for r in log_records if r.get("event") == KEPT}
    if last["version"] in kept:
        return None
    return Change(str(last["version"]), str(last["previous"]), _epoch(str(last["time"])))


def act(models: str | Path, verdict: Verdict) -> None:
    """Carry out a verdict in the registry (and its log)."""
    if verdict.action == "rollback":
        log.warning("rolling back %s to %s: %s", verdict.new, verdict.previous, verdict.reason)
        registry.rollback(models, verdict.previous, by=GUARD, reason=verdict.reason)
    elif verdict.action == "keep":
        log.info("keeping %s: %s", verdict.new, verdict.reason)
        registry.append_alias_log(
            models,
            {
                "time": datetime.now(UTC).isoformat(),
                "event": KEPT,
                "version": verdict.new,
                "by": GUARD,
                "reason": verdict.reason,
            },
        )


def check(models: str | Path, records: Iterable[LiveRecord], cfg: GuardConfig) -> Verdict | None:
    """One turn of the guard: judge the pending change, if any, and act on the verdict."""
    change = pending_change(models)
    if change is None:
        return None
    v = judge(records, change, cfg)
    act(models, v)
    return v
