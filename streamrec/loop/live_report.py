"""What the live metrics topic says: every worker's counts, added up per arm and version,
and the arms compared (``streamrec live-report``; the rollback guard, :mod:`streamrec.loop.guard`).

The workers publish :class:`~streamrec.serving.live.LiveRecord` s (``streamrec.engines.live``);
this module reads them back (a fresh read from offset 0, the reliable way on the embedded
broker) and adds them up, each record once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from streamrec.kafka.clients import read_topic
from streamrec.serving.live import LiveCounts, LiveRecord, aggregate
from streamrec.serving.state import ARMS

CHAMPION, CHALLENGER = ARMS

log = logging.getLogger(__name__)


def read_live_records(
    conf: dict[str, Any], topic: str, *, app_id: str | None = None, idle_timeout: float = 1.0
) -> list[LiveRecord]:
    """Every live metrics record on ``topic`` (of ``app_id`` when given), in publication
    order per partition; records that do not parse are logged and left out."""
    out = []
    for msg in read_topic(conf, topic, idle_timeout=idle_timeout):
        try:
            rec = LiveRecord.from_json(msg.value())
        except ValueError as exc:
            log.warning("%s:%d:%d: %s", topic, msg.partition(), msg.offset(), exc)
            continue
        if app_id is None or rec.app_id == app_id:
            out.append(rec)
    return out


def live_totals(records: Iterable[LiveRecord]) -> dict[tuple[str, str], LiveCounts]:
    """The counts by (arm, model version), each record once."""
    return aggregate(records)


def counted_through(records: Iterable[LiveRecord]) -> dict[int, int]:
    """Per input partition, the last offset whose clicks are counted."""
    out: dict[int, int] = {}
    for r in records:
        out[r.partition] = max(out.get(r.partition, -1), r.through)
    return out


def wait_counted(
    conf: dict[str, Any],
    topic: str,
    last_offsets: Mapping[int, int],
    *,
    app_id: str | None = None,
    timeout: float = 60.0,
) -> list[LiveRecord]:
    """The records once every input partition is counted up to its offset in
    ``last_offsets`` (the last click sent there); TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_live_records(conf, topic, app_id=app_id)
        through = counted_through(records)
        behind = {p: o for p, o in last_offsets.items() if through.get(p, -1) < o}
        if not behind:
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{topic}: partitions {sorted(behind)} not counted up to {behind} within "
                f"{timeout:.0f} s (counted up to {through})"
            )
        time.sleep(0.5)


# ---- comparison: intervals and the difference between the arms ----------------------------


@dataclass(frozen=True)
class Interval:
    """An estimate and its two-sided interval at ``confidence``."""

    value: float
    low: float
    high: float

    def excludes(self, x: float) -> bool:
        return x < self.low or x > self.high

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def z_of(confidence: float) -> float:
    """The normal quantile of a two-sided interval at ``confidence`` (0.95: 1.96)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _mean_var(n: int, total: float, squares: float) -> tuple[float, float]:
    """The mean of a per-click figure and the variance of that mean, from its sum and the sum
    of its squares over ``n`` clicks (sample variance, n - 1)."""
    if n == 0:
        return math.nan, math.nan
    mean = total / n
    if n == 1:
        return mean, math.inf
    var = max(squares - n * mean * mean, 0.0) / (n - 1)
    return mean, var / n


def _metric(counts: LiveCounts, metric: str, k: int) -> tuple[float, float]:
    i = counts.ks.index(k)
    if metric == "recall":  # a hit is 0 or 1: its square is itself
        return _mean_var(counts.n, counts.hits[i], counts.hits[i])
    if metric == "mrr":
        return _mean_var(counts.n, counts.rr[i], counts.rr2[i])
    raise ValueError(f"unknown metric {metric!r} (recall or mrr)")


def interval(counts: LiveCounts, metric: str, k: int = 20, confidence: float = 0.95) -> Interval:
    """Live Recall@k or MRR@k with its normal-approximation interval (clicks taken as
    independent: clicks of one session are not quite, so read it as a little narrow)."""
    mean, var = _metric(counts, metric, k)
    half = z_of(confidence) * math.sqrt(var)
    return Interval(mean, mean - half, mean + half)


def difference(
    a: LiveCounts, b: LiveCounts, metric: str, k: int = 20, confidence: float = 0.95
) -> Interval:
    """``a``'s figure minus ``b``'s, with its interval (independent samples)."""
    ma, va = _metric(a, metric, k)
    mb, vb = _metric(b, metric, k)
    half = z_of(confidence) * math.sqrt(va + vb)
    d = ma - mb
    return Interval(d, d - half, d + half)


def latest_versions(records: Iterable[LiveRecord]) -> dict[str, str]:
    """Per arm, the model version of its most recently published counts."""
    newest: dict[str, tuple[float, str]] = {}
    for r in records:
        for arm, version in r.counts:
            if arm not in newest or r.time >= newest[arm][0]:
                newest[arm] = (r.time, version)
    return {arm: version for arm, (_, version) in newest.items()}


def compare(records: Sequence[LiveRecord], k: int = 20, confidence: float = 0.95) -> dict[str, Any]:
    """Per arm and version: predictions, Recall@k and MRR@k with intervals; for the arms'
    latest versions, the challenger minus the champion with its interval, and whether the
    data tell them apart (the interval of a difference excludes 0)."""
    totals = live_totals(records)
    rows = [
        {
            "arm": arm,
            "model_version": version,
            "predictions": c.n,
            f"recall@{k}": interval(c, "recall", k, confidence),
            f"mrr@{k}": interval(c, "mrr", k, confidence),
        }
        for (arm, version), c in sorted(totals.items())
    ]
    out: dict[str, Any] = {"k": k, "confidence": confidence, "arms": rows}
    latest = latest_versions(records)
    if CHAMPION in latest and CHALLENGER in latest:
        champion = totals[(CHAMPION, latest[CHAMPION])]
        challenger = totals[(CHALLENGER, latest[CHALLENGER])]
        diffs = {
            f"{m}@{k}": difference(challenger, champion, m, k, confidence)
            for m in ("recall", "mrr")
        }
        out["difference"] = {
            "challenger": latest[CHALLENGER],
            "champion": latest[CHAMPION],
            **diffs,
            "distinguishable": {name: d.excludes(0.0) for name, d in diffs.items()},
        }
    return out


def format_comparison(report: Mapping[str, Any]) -> str:
    """The comparison as a few lines of text."""
    k, conf = report["k"], report["confidence"]
    lines = [
        f"{'arm':<11} {'version':<24} {'predictions':>11}  "
        f"{f'Recall@{k} [{conf:.0%}]':<26} {f'MRR@{k} [{conf:.0%}]':<26}"
    ]
    for r in report["arms"]:
        lines.append(
            f"{r['arm']:<11} {r['model_version']:<24} {r['predictions']:>11,}  "
            f"{r[f'recall@{k}']!s:<26} {r[f'mrr@{k}']!s:<26}"
        )
    d = report.get("difference")
    if d is None:
        lines.append("one arm only: nothing to compare")
        return "\n".join(lines)
    lines.append(f"challenger {d['challenger']} - champion {d['champion']}:")
    for name in (f"recall@{k}", f"mrr@{k}"):
        verdict = "the arms differ" if d["distinguishable"][name] else "cannot tell them apart yet"
        lines.append(f"  {name:<10} {d[name]!s:<34} {verdict}")
    return "\n".join(lines)


def to_json(report: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison with its intervals as ``{"value", "low", "high"}``."""

    def plain(x: Any) -> Any:
        if isinstance(x, Interval):
            return {"value": x.value, "low": x.low, "high": x.high}
        if isinstance(x, Mapping):
            return {key: plain(v) for key, v in x.items()}
        if isinstance(x, list):
            return [plain(v) for v in x]
        return x

    out: dict[str, Any] = plain(report)
    return out
