"""Publish click logs to the clicks topic and evaluate the recommendations that came back.

Used by ``streamrec produce``, ``streamrec replay``, the demo and the benchmark. Live metrics
compare each click's first recommendation with the next click of the same session
(Recall@k / MRR@k, standard tie handling: the position in the published list).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from streamrec.data.clicklog import has_epoch_times
from streamrec.kafka import clients
from streamrec.kafka.clients import read_topic
from streamrec.serving.records import Recommendation


def click_values(df: pd.DataFrame) -> list[tuple[bytes, bytes, float]]:
    """(key, JSON value, log time) per row, keyed by user else session, in log order.

    ``Time`` that is not epoch seconds (an ordinal that only orders events:
    ``streamrec.data.clicklog.has_epoch_times``) is not sent: the worker then uses the Kafka
    record time.
    """
    real_time = has_epoch_times(df["Time"])
    has_user = "UserId" in df.columns
    sess = df["SessionId"].astype(str).tolist()
    items = df["ItemId"].astype(str).tolist()
    times = df["Time"].astype(float).tolist()
    users = df["UserId"].astype(str).tolist() if has_user else [None] * len(df)
    out = []
    for s, i, t, u in zip(sess, items, times, users, strict=True):
        d: dict[str, Any] = {"session_id": s, "item_id": i}
        if u is not None:
            d["user_id"] = u
        if real_time:
            d["timestamp"] = t
        out.append(((u or s).encode(), json.dumps(d).encode(), t))
    return out


@dataclass
class Produced:
    n: int = 0
    failed: int = 0
    seconds: float = 0.0
    #: click ids (topic:partition:offset) of the delivered clicks
    click_ids: set[str] = field(default_factory=set)
    #: click id -> local send time (epoch s), for click-to-recommendation latency
    sent_at: dict[str, float] = field(default_factory=dict)


def produce(
    conf: dict[str, Any],
    topic: str,
    values: Sequence[tuple[bytes, bytes, float]],
    *,
    rate: float | None = None,
    speedup: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    linger_ms: float = 1.0,
) -> Produced:
    """Publish as fast as possible, at ``rate`` events/s, or at log timing / ``speedup``."""
    out = Produced()
    producer = clients.producer(conf, {"linger.ms": linger_ms, "log_level": 0})

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            out.failed += 1
            return
        cid = f"{msg.topic()}:{msg.partition()}:{msg.offset()}"
        out.click_ids.add(cid)
        ts = msg.timestamp()[1]
        out.sent_at[cid] = ts / 1e3 if ts > 0 else time.time()

    t0 = time.perf_counter()
    t_log0 = values[0][2] if values else 0.0
    for i, (key, value, t_log) in enumerate(values):
        if rate:
            due = t0 + i / rate
        elif speedup:
            due = t0 + (t_log - t_log0) / speedup
        else:
            due = None
        if due is not None:
            wait = due - time.perf_counter()
            if wait > 0:
                producer.poll(0)
                time.sleep(wait)
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        if on_progress is not None and (i % 256 == 255 or i == len(values) - 1):
            on_progress(i + 1)
    producer.flush(60)
    out.n = len(values)
    out.seconds = time.perf_counter() - t0
    return out


def first_answers(records: Iterable[Recommendation]) -> dict[str, Recommendation]:
    """The first recommendation published for each click id."""
    first: dict[str, Recommendation] = {}
    for r in records:
        first.setdefault(r.click_id, r)
    return first


def read_recommendations(
    conf: dict[str, Any], topic: str, idle_timeout: float = 1.0
) -> list[Recommendation]:
    return [
        Recommendation.from_json(m.value())
        for m in read_topic(conf, topic, idle_timeout=idle_timeout)
    ]


def wait_for_answers(
    conf: dict[str, Any],
    topic: str,
    click_ids: set[str],
    timeout: float = 120.0,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Recommendation]:
    """Poll the recommendations topic (fresh reads) until every click id is answered."""
    deadline = time.monotonic() + timeout
    answers: dict[str, Recommendation] = {}
    while True:
        recs = read_recommendations(conf, topic, idle_timeout=0.5)
        answers = {k: v for k, v in first_answers(recs).items() if k in click_ids}
        if on_progress is not None:
            on_progress(len(answers))
        if len(answers) >= len(click_ids) or time.monotonic() > deadline:
            return answers
        time.sleep(0.5)


@dataclass
class LiveMetrics:
    k: int
    n: int
    recall: float
    mrr: float

    def __str__(self) -> str:
        return f"Recall@{self.k}={self.recall:.4f} MRR@{self.k}={self.mrr:.4f} (n={self.n})"


def live_metrics(answers: Iterable[Recommendation], k: int = 20) -> LiveMetrics:
    """Recall@k/MRR@k of each click's recommendation against the session's next click."""
    by_session: dict[tuple[str | None, str], list[Recommendation]] = {}
    for r in answers:
        by_session.setdefault((r.user_id, r.session_id), []).append(r)
    hits = 0
    rr = 0.0
    n = 0
    for recs in by_session.values():
        recs.sort(key=lambda r: (r.partition, r.offset))
        for cur, nxt in itertools.pairwise(recs):
            n += 1
            top = cur.items[:k]
            if nxt.item_id in top:
                hits += 1
                rr += 1.0 / (top.index(nxt.item_id) + 1)
    return LiveMetrics(k, n, hits / n if n else float("nan"), rr / n if n else float("nan"))


def latency_percentiles(values: Iterable[float]) -> dict[str, float]:
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    p = np.percentile(a, [50, 95, 99])
    return {"p50": p[0], "p95": p[1], "p99": p[2], "max": float(a.max())}
