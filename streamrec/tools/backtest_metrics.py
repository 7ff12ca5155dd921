"""The backtest's figures, computed from a log and the recommendations that came back.

Pure functions over a pandas frame and a list of answers (``Recommendation``): no Kafka, no
model.

Ranks and counts are the workers' own live metrics code (:mod:`streamrec.serving.live`):
:func:`~streamrec.serving.live.live_rank` reads the offline evaluator's *conservative* rank
from a top-K answer, K = the largest cut-off + 1 (the workers publish K items in a backtest),
and :class:`~streamrec.serving.live.LiveCounts` adds the hits and reciprocal ranks up. So the
figures equal ``trainer evaluate``'s (the tests check it), and the workers' own live figures,
which the report carries beside them (``live``).

What is scored. The prediction made at click i (the answer to click i) is scored against the
next click of the same session in the log (sessions as the log names them, events in time
order), when click i is at or after the warm-up time; the period is the one holding click i.

The other figures, per period and overall, for each arm:

* ``coverage@20``: distinct items in the top 20 of the answers / distinct items in the log;
* new items: an item is new in the period in which the log first clicks it (warm-up items
  are not new). ``new_item_click_share`` (per period, the same for all arms): clicks on new
  items / clicks; ``new_item_rec_share@20``: top-20 slots given to new items / all slots;
  ``new_item_recall@20``: Recall@20 over the next clicks whose item is new;
* ``latency_p50_ms`` ...: an answer's ``emitted_at`` minus its click's producer timestamp.
  The replay is compressed (a period is published as fast as possible), so this includes
  queueing and is not the latency at a live rate; ``throughput_eps``: answers / (last answer
  minus first click sent);
* ``lost``: published clicks never answered; ``duplicates``: clicks answered more than once
  or answered as redeliveries. Both must be 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from streamrec.serving.live import KS, LiveCounts, live_rank
from streamrec.serving.records import Recommendation

__all__ = ["KS", "live_rank"]  # the workers' own, used here


@dataclass(frozen=True)
class Period:
    start: float
    end: float  # exclusive, except the last period, which holds the last event

    def to_json(self) -> dict[str, float]:
        return {"start": self.start, "end": self.end}


def make_periods(t0: float, t_last: float, every: float | None) -> list[Period]:
    """Periods of ``every`` seconds of event time from ``t0``; one period when ``every`` is None.

    The last period ends at ``t_last`` (inclusive).
    """
    if every is None or every <= 0 or t_last <= t0:
        return [Period(t0, t_last)]
    out: list[Period] = []
    start = t0
    while start <= t_last:
        end = start + every
        out.append(Period(start, min(end, t_last) if end > t_last else end))
        start = end
    return out


def period_of(times: np.ndarray, periods: Sequence[Period]) -> np.ndarray:
    """Index of the period holding each time (-1 before the first one)."""
    starts = np.array([p.start for p in periods], dtype=np.float64)
    idx = np.searchsorted(starts, times, side="right") - 1
    return idx.astype(np.int64)


@dataclass
class Answers:
    """One arm's answers, by click (event) id."""

    first: dict[str, Recommendation]
    duplicates: int  # clicks answered more than once, or answered as redeliveries
    lost: int  # produced clicks with no answer


def collect_answers(records: Iterable[Recommendation], click_ids: Iterable[str]) -> Answers:
    wanted = set(click_ids)
    first: dict[str, Recommendation] = {}
    counts: dict[str, int] = {}
    dup_flag: set[str] = set()
    for r in records:
        cid = r.click_id
        if cid not in wanted:
            continue
        counts[cid] = counts.get(cid, 0) + 1
        if r.duplicate:
            dup_flag.add(cid)
        first.setdefault(cid, r)
    duplicates = sum(1 for c, n in counts.items() if n > 1 or c in dup_flag)
    return Answers(first, duplicates, len(wanted) - len(first))


@dataclass
class LogView:
    """The log in replay order with what scoring needs, row i = event id ``ids[i]``."""

    df: pd.DataFrame
    ids: list[str]
    next_item: list[str | None]
    first_seen_period: np.ndarray  # per row: period where the row's item first occurs (-1: before)
    period: np.ndarray  # per row: its period (-1: warm-up)

    @classmethod
    def build(cls, df: pd.DataFrame, ids: Sequence[str], periods: Sequence[Period]) -> LogView:
        """``df`` in replay (time) order; ``ids`` the event id of each row."""
        sess = df["SessionId"].astype(str).to_numpy()
        items = df["ItemId"].astype(str).to_numpy()
        order = np.lexsort((np.arange(len(df)), sess))  # by session, then replay order
        nxt: list[str | None] = [None] * len(df)
        for a, b in itertools.pairwise(order):
            if sess[a] == sess[b]:
                nxt[int(a)] = str(items[b])
        times = df["Time"].to_numpy(dtype=np.float64)
        per = period_of(times, periods)
        first_row: dict[str, int] = {}
        for i, it in enumerate(items):
            first_row.setdefault(str(it), i)
        first_seen = np.array([per[first_row[str(it)]] for it in items], dtype=np.int64)
        return cls(df, list(ids), nxt, first_seen, per)


@dataclass
class Acc:
    """Accumulates the figures of one arm over one slice of clicks."""

    ks: tuple[int, ...]
    counts: LiveCounts = field(init=False)
    recommended: set[str] = field(default_factory=set)
    slots: int = 0
    new_slots: int = 0
    new_targets: int = 0
    new_hits: int = 0
    answers: int = 0
    latencies: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    emitted: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = LiveCounts(self.ks)

    def add_rank(self, rank: float) -> None:
        self.counts.add_rank(rank)

    def result(self, catalogue: int) -> dict[str, Any]:
        from streamrec.tools.replay import latency_percentiles

        out: dict[str, Any] = self.counts.result()  # recall@k, mrr@k, n_scored
        out["answers"] = self.answers
        out["coverage@20"] = len(self.recommended) / catalogue if catalogue else None
        out["new_item_rec_share@20"] = self.new_slots / self.slots if self.slots else None
        out["new_item_recall@20"] = self.new_hits / self.new_targets if self.new_targets else None
        lat = latency_percentiles(self.latencies)
        for q in ("p50", "p95", "p99"):
            v = lat[q]
            out[f"latency_{q}_ms"] = None if math.isnan(v) else v * 1e3
        span = (max(self.emitted) - min(self.sent)) if self.emitted and self.sent else 0.0
        out["throughput_eps"] = self.answers / span if span > 0 else None
        return out


def score_arm(
    view: LogView,
    answers: Answers,
    sent_at: Mapping[str, float],
    n_periods: int,
    ks: Sequence[int] = KS,
    cov_k: int = 20,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Per-period figures, overall figures, and series for the plots of one arm.

    ``sent_at`` maps an answer's input record (``topic:partition:offset``) to its send time.
    """
    ks = tuple(sorted(ks))
    k_max = ks[-1]
    per = [Acc(ks) for _ in range(n_periods)]
    overall = Acc(ks)
    items = view.df["ItemId"].astype(str).to_numpy()
    # catalogue: the distinct items of the whole log
    first_per = view.first_seen_period
    catalogue = int(np.unique(items).size)
    new_in_period: list[set[str]] = [set() for _ in range(n_periods)]
    for it, p in zip(items, first_per, strict=True):
        if p >= 0:
            new_in_period[int(p)].add(str(it))
    versions: list[tuple[float, str]] = []
    for i, eid in enumerate(view.ids):
        p = int(view.period[i])
        if p < 0:
            continue
        a = answers.first.get(eid)
        if a is None:
            continue
        accs = (per[p], overall)
        top = a.items[:cov_k]
        cid = f"{a.topic}:{a.partition}:{a.offset}"
        t_sent = sent_at.get(cid)
        versions.append((a.event_time, a.model_version))
        for acc in accs:
            acc.answers += 1
            acc.recommended.update(top)
            acc.slots += len(top)
            acc.new_slots += sum(1 for x in top if x in new_in_period[p])
            if t_sent is not None:
                acc.latencies.append(a.emitted_at - t_sent)
                acc.sent.append(t_sent)
            acc.emitted.append(a.emitted_at)
        target = view.next_item[i]
        if target is None:
            continue
        rank = live_rank(a.items, a.scores, target, k_max)
        is_new = target in new_in_period[p]
        for acc in accs:
            acc.add_rank(rank)
            if is_new:
                acc.new_targets += 1
                acc.new_hits += int(rank <= cov_k)
    periods_out = [acc.result(catalogue) for acc in per]
    overall_out = overall.result(catalogue)
    series = {
        "latencies_ms": sorted(x * 1e3 for x in overall.latencies),
        "emitted": sorted(overall.emitted),
        "versions": versions,
    }
    return periods_out, overall_out, series


def plot_series(
    latencies_ms: Sequence[float], emitted: Sequence[float], t0: float
) -> dict[str, Any]:
    """What the latency CDF and throughput plots need, small enough for report.json: the
    latency at 201 evenly spaced quantiles, and answers per wall-clock bin since ``t0``."""
    out: dict[str, Any] = {"latency_ms_quantiles": [], "throughput": None}
    if len(latencies_ms):
        q = np.quantile(np.asarray(latencies_ms, dtype=np.float64), np.linspace(0, 1, 201))
        out["latency_ms_quantiles"] = [float(x) for x in q]
    if len(emitted):
        em = np.asarray(emitted, dtype=np.float64) - t0
        span = float(em.max())
        width = max(1.0, span / 200)
        counts = np.bincount(np.floor(em / width).astype(np.int64))
        out["throughput"] = {"bin_s": width, "counts": counts.tolist()}
    return out


def model_swaps(versions: Sequence[tuple[float, str]]) -> list[dict[str, Any]]:
    """Where the model version of the answers changes, in event-time order."""
    out: list[dict[str, Any]] = []
    last: str | None = None
    for t, v in sorted(versions, key=lambda x: x[0]):
        if last is not None and v != last:
            out.append({"event_time": t, "from": last, "to": v})
        last = v
    return out


def new_item_click_share(view: LogView, n_periods: int) -> list[float | None]:
    """Per period: the share of its clicks on items first seen in that period."""
    out: list[float | None] = []
    for p in range(n_periods):
        mask = view.period == p
        n = int(mask.sum())
        out.append(float((view.first_seen_period[mask] == p).sum()) / n if n else None)
    return out
