"""Live metrics: each model version measured on the clicks it answered.

Every click that continues a session is scored against the answer to the session's previous
click: hit@k and reciprocal rank for k in :data:`KS`, with the offline evaluator's
*conservative* tie rule (``trainer.metrics.ranks``: the rank is the number of items scored at
least as high as the target, the target included). The answer to a click is kept in the
session state (:class:`streamrec.serving.state.Answer`: its top :data:`DEPTH` items and scores,
the model version and arm that made it), so the next click finds it after a restart or a
rebalance, and a redelivered click, which the pipeline answers without applying it, is never
scored twice.

Ranks from a top-K answer (:func:`live_rank`), K = :data:`DEPTH` = the largest cut-off + 1.
When the target is in the list with a score strictly above the K-th (last) score, every item
scored at least as high is in the list too (items outside it score at most the K-th score),
so that count taken over the list is the exact conservative rank. When the target is missing,
or ties with the K-th score, its rank is at least K, i.e. beyond every cut-off: a miss for all
k <= K - 1. So the live hits and reciprocal ranks equal the offline ones for every cut-off,
as long as the scores themselves are equal. The backtest (``streamrec.tools.backtest_metrics``)
computes its figures with these same functions from the answers it reads back.

Counts (:class:`LiveCounts`): predictions, hits@k, and the sums of the reciprocal ranks and of
their squares (the squares give MRR its confidence interval). Live Recall@k is hits over
predictions, live MRR@k the reciprocal-rank sum over predictions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

#: the cut-offs measured live (those of ``trainer evaluate``)
KS: tuple[int, ...] = (1, 5, 10, 20)
#: items of an answer kept for scoring the next click: one more than the largest cut-off,
#: which is what makes the conservative rank exact up to that cut-off (module docstring)
DEPTH = max(KS) + 1


def live_rank(
    items: Sequence[str] | None, scores: Sequence[float] | None, target: str, k_max: int
) -> float:
    """Conservative rank of ``target`` from a top-K answer (see the module docstring);
    ``math.inf`` when the rank is beyond ``k_max`` for certain."""
    if not items or scores is None:
        return math.inf
    try:
        pos = list(items).index(target)
    except ValueError:
        return math.inf
    return rank_at(pos, scores, len(items), k_max)


def rank_at(pos: int, scores: Sequence[float], n_items: int, k_max: int) -> float:
    """Conservative rank of the item at ``pos`` of a top-K answer of ``n_items`` items with
    ``scores`` (:func:`live_rank` once the target is found)."""
    s = scores[pos]
    if n_items > k_max and s <= scores[-1]:
        return math.inf  # tied with (or below) the K-th score: rank >= K > k_max
    if isinstance(s, float) and math.isnan(s):
        return math.inf
    return float(sum(1 for x in scores if x >= s))


class Evaluation(NamedTuple):
    """One click scored against the answer to its session's previous click: the click's
    input position, the arm and model version that made the answer, the rank of the click's
    item in it (``math.inf``: beyond every cut-off). (A named tuple: one is made per scored
    click, at a third of a frozen dataclass's cost.)"""

    partition: int
    offset: int
    arm: str
    version: str
    rank: float


@dataclass
class LiveCounts:
    """Predictions, hits@k and reciprocal-rank sums (and their squares) for cut-offs ``ks``."""

    ks: tuple[int, ...] = KS
    n: int = 0
    hits: list[int] = field(default_factory=list)
    rr: list[float] = field(default_factory=list)
    rr2: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ks = tuple(sorted(self.ks))
        width = len(self.ks)
        self.hits = self.hits or [0] * width
        self.rr = self.rr or [0.0] * width
        self.rr2 = self.rr2 or [0.0] * width

    def add_rank(self, rank: float) -> None:
        """One prediction whose target has ``rank`` (1-based; inf: a miss at every k)."""
        self.n += 1
        if rank > self.ks[-1]:
            return
        inv = 1.0 / rank
        for i, k in enumerate(self.ks):
            if rank <= k:
                self.hits[i] += 1
                self.rr[i] += inv
                self.rr2[i] += inv * inv

    def add_ranks(self, ranks: Iterable[float]) -> None:
        """:meth:`add_rank` of each of ``ranks``, in order (the same sums, fewer calls)."""
        ks, hits, rr, rr2 = self.ks, self.hits, self.rr, self.rr2
        top, n = ks[-1], 0
        for rank in ranks:
            n += 1
            if rank > top:
                continue
            inv = 1.0 / rank
            for i, k in enumerate(ks):
                if rank <= k:
                    hits[i] += 1
                    rr[i] += inv
                    rr2[i] += inv * inv
        self.n += n

    def add(self, other: LiveCounts) -> None:
        if other.ks != self.ks:
            raise ValueError(f"cut-offs differ: {other.ks} and {self.ks}")
        self.n += other.n
        for i in range(len(self.ks)):
            self.hits[i] += other.hits[i]
            self.rr[i] += other.rr[i]
            self.rr2[i] += other.rr2[i]

    def recall(self, k: int) -> float:
        return self.hits[self.ks.index(k)] / self.n if self.n else math.nan

    def mrr(self, k: int) -> float:
        return self.rr[self.ks.index(k)] / self.n if self.n else math.nan

    def result(self) -> dict[str, Any]:
        """``{"recall@k": ..., "mrr@k": ..., "n_scored": n}`` (None for no predictions)."""
        out: dict[str, Any] = {}
        for i, k in enumerate(self.ks):
            out[f"recall@{k}"] = self.hits[i] / self.n if self.n else None
            out[f"mrr@{k}"] = self.rr[i] / self.n if self.n else None
        out["n_scored"] = self.n
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "predictions": self.n,
            "hits": {str(k): h for k, h in zip(self.ks, self.hits, strict=True)},
            "rr": {str(k): x for k, x in zip(self.ks, self.rr, strict=True)},
            "rr2": {str(k): x for k, x in zip(self.ks, self.rr2, strict=True)},
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LiveCounts:
        """Counts written by :meth:`to_json`; ValueError if they are not."""
        try:
            ks = tuple(sorted(int(k) for k in obj["hits"]))
            return cls(
                ks,
                int(obj["predictions"]),
                [int(obj["hits"][str(k)]) for k in ks],
                [float(obj["rr"][str(k)]) for k in ks],
                [float(obj["rr2"][str(k)]) for k in ks],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not live counts: {str(obj)[:200]}") from exc


def tally(
    evaluations: Iterable[Evaluation], ks: Sequence[int] = KS
) -> dict[tuple[str, str], LiveCounts]:
    """The counts of ``evaluations`` by (arm, model version)."""
    out: dict[tuple[str, str], LiveCounts] = {}
    for e in evaluations:
        c = out.get((e.arm, e.version))
        if c is None:
            c = out[(e.arm, e.version)] = LiveCounts(tuple(ks))
        c.add_rank(e.rank)
    return out


@dataclass
class LiveRecord:
    """The counts a worker publishes to the live metrics topic for one input partition: those
    of the clicks of ``partition`` after offset ``after`` up to offset ``through``, by (arm,
    model version). ``time`` (epoch seconds) is when it was published."""

    app_id: str
    partition: int
    after: int
    through: int
    time: float
    worker: str
    counts: dict[tuple[str, str], LiveCounts]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "app_id": self.app_id,
                "partition": self.partition,
                "after": self.after,
                "through": self.through,
                "time": self.time,
                "worker": self.worker,
                "counts": [
                    {"arm": arm, "model_version": version, **c.to_json()}
                    for (arm, version), c in self.counts.items()
                ],
            }
        ).encode()

    @classmethod
    def from_json(cls, value: bytes | str) -> LiveRecord:
        """A record written by :meth:`to_json`; ValueError if it is not one."""
        try:
            obj = json.loads(value)
            counts = {
                (str(c["arm"]), str(c["model_version"])): LiveCounts.from_json(c)
                for c in obj["counts"]
            }
            return cls(
                str(obj["app_id"]),
                int(obj["partition"]),
                int(obj["after"]),
                int(obj["through"]),
                float(obj["time"]),
                str(obj["worker"]),
                counts,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a live metrics record: {str(value)[:200]}") from exc

    @property
    def ident(self) -> tuple[str, int, int, int]:
        """What tells a record from another: a producer's retry may write one twice."""
        return (self.app_id, self.partition, self.after, self.through)


def aggregate(
    records: Iterable[LiveRecord], ks: Sequence[int] = KS
) -> dict[tuple[str, str], LiveCounts]:
    """The counts of every worker by (arm, model version), each record counted once."""
    out: dict[tuple[str, str], LiveCounts] = {}
    seen: set[tuple[str, int, int, int]] = set()
    for r in records:
        if r.ident in seen:
            continue
        seen.add(r.ident)
        for key, c in r.counts.items():
            total = out.get(key)
            if total is None:
                total = out[key] = LiveCounts(tuple(ks))
            total.add(c)
    return out
