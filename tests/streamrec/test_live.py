"""Live metrics in the pipeline (no Kafka): ranks from the kept answer, the offline
evaluator's figures on a replayed log, the answer through the state store and the native
pipeline's overlap of batches, redeliveries never scored twice."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.data.synthetic import generate_clicks
from streamrec.serving.config import CoreConfig
from streamrec.serving.live import DEPTH, KS, Evaluation, LiveCounts, live_rank, tally
from streamrec.serving.pipeline import apply_batch, finish_batch, process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state import Answer, SessionState
from streamrec.serving.state_store import StateStore
from streamrec.serving.writes import InFlightStates
from streamrec.testing import click, tiny_serving_model
from streamrec.tools.replay import click_values
from trainer.metrics import ranks

T0 = 1.7e9
CFG = CoreConfig(session_gap_seconds=3600.0, top_k=5)


def test_live_rank_from_top_k_plus_one_equals_the_conservative_rank() -> None:
    """Scores on a coarse grid make many ties, also at the list's border: for every cut-off
    k <= 20 the hit and the reciprocal rank read from a top-21 answer equal the offline
    conservative rank's (trainer.metrics.ranks)."""
    gen = torch.Generator().manual_seed(0)
    n_items, trials = 60, 3000
    scores = torch.randint(0, 12, (trials, n_items), generator=gen).to(torch.float32) / 4
    targets = torch.randint(0, n_items, (trials,), generator=gen)
    offline = ranks(scores, targets, "conservative").tolist()
    border_ties = 0
    for i in range(trials):
        top_scores, top_rows = torch.topk(scores[i], DEPTH)
        items = [str(r) for r in top_rows.tolist()]
        live = live_rank(items, top_scores.tolist(), str(int(targets[i])), KS[-1])
        t_score = float(scores[i, targets[i]])
        border_ties += int(t_score == float(top_scores[-1]) and str(int(targets[i])) in items)
        for k in KS:
            assert (live <= k) == (offline[i] <= k), (i, live, offline[i])
            if offline[i] <= k:
                assert live == offline[i]
    assert border_ties > 0  # the case that needs the 21st item did occur


def test_counts_add_merge_and_round_trip_json() -> None:
    a = LiveCounts()
    for r in (1.0, 3.0, 7.0, 15.0, 21.0, math.inf):
        a.add_rank(r)
    assert a.n == 6 and a.hits == [1, 2, 3, 4]
    assert a.rr[-1] == pytest.approx(1 + 1 / 3 + 1 / 7 + 1 / 15)
    assert a.rr2[0] == 1.0
    assert a.recall(20) == 4 / 6 and a.mrr(1) == 1 / 6
    b = LiveCounts.from_json(a.to_json())
    assert b == a
    b.add(a)
    assert b.n == 12 and b.hits == [2, 4, 6, 8]
    with pytest.raises(ValueError):
        LiveCounts.from_json({"predictions": 1})
    t = tally([Evaluation(0, 1, "champion", "v1", 2.0), Evaluation(0, 2, "challenger", "v2", 1.0)])
    assert t[("champion", "v1")].hits == [0, 1, 1, 1] and t[("challenger", "v2")].n == 1


def test_worker_counts_are_the_uncounted_evaluations_added_in_order() -> None:
    """LiveMetrics.add: what a worker publishes for an input partition is the tally of the
    batches' evaluations above the partition's watermark, sums equal to adding the ranks one
    by one in arrival order (and add_ranks is add_rank of each)."""
    from prometheus_client import CollectorRegistry

    from streamrec.engines.live import LiveMetrics
    from streamrec.serving.live import LiveRecord
    from streamrec.serving.records import BatchResult
    from streamrec.settings import Settings

    rng = random.Random(5)
    ranks = [1.0, 2.0, 3.0, 6.0, 7.0, 11.0, 13.0, 20.0, 21.0, math.inf]
    evals = [
        Evaluation(rng.randrange(3), offset, rng.choice(["champion", "challenger"]),
                   rng.choice(["v1", "v2"]), rng.choice(ranks))
        for offset in range(900)
    ]  # fmt: skip
    live = LiveMetrics(Settings(), CollectorRegistry(), {"bootstrap.servers": "unused:9"})
    offsets = {p: [e.offset for e in evals if e.partition == p] for p in range(3)}
    # counted before: partition 0 up to a click of its own, 2 to its end, 1 none
    marks = {0: offsets[0][len(offsets[0]) // 2], 1: -1, 2: offsets[2][-1]}
    live.watermarks = dict(marks)
    for lo in range(0, len(evals), 64):
        batch = evals[lo : lo + 64]
        res = BatchResult(evaluations=batch)
        res.last_offsets = {e.partition: e.offset for e in batch}
        live.add(res)
    sent: list[LiveRecord] = []
    # a stub producer in place of the Kafka one (mypy: a method assigned on an instance)
    live._produce = lambda partition, value: sent.append(LiveRecord.from_json(value))  # type: ignore[method-assign]
    live.publish(flush=False)
    assert sorted(r.partition for r in sent) == [0, 1]
    for rec in sent:
        want: dict[tuple[str, str], LiveCounts] = {}
        for e in evals:
            if e.partition == rec.partition and e.offset > marks[e.partition]:
                want.setdefault((e.arm, e.version), LiveCounts()).add_rank(e.rank)
        assert rec.counts == want and rec.after == marks[rec.partition]
    one_by_one, at_once = LiveCounts(), LiveCounts()
    for e in evals:
        one_by_one.add_rank(e.rank)
    at_once.add_ranks(e.rank for e in evals)
    assert at_once == one_by_one


# ----------------------------------------------------------------------------- the replay


def _records(df: pd.DataFrame, partitions: int = 3) -> list[Record]:
    """The log as records in time order, spread over partitions by key (as Kafka would)."""
    out, next_offset = [], [0] * partitions
    for key, value, t in click_values(df):
        p = sum(key) % partitions
        out.append(Record(value, key, "clicks", p, next_offset[p], None, t))  # arrives on time
        next_offset[p] += 1
    return out


def _replay(
    records: Sequence[Record], model: ServingModel, batch: int, overlap: bool
) -> tuple[list[Evaluation], StateStore]:
    """Every record through the pipeline in batches; ``overlap``: as the native worker does,
    batch N+1 applied before batch N is scored and stored."""
    store, evals = StateStore(), []
    in_flight = InFlightStates()
    waiting = None
    for seq, lo in enumerate(range(0, len(records), batch)):
        applied = apply_batch(
            records[lo : lo + batch], store, model, CFG, in_flight=in_flight, seq=seq
        )
        if not overlap:
            evals += finish_batch(applied, store, CFG).evaluations
            in_flight.stored(seq)
            continue
        if waiting is not None:
            evals += finish_batch(waiting[0], store, CFG).evaluations
            in_flight.stored(waiting[1])
        waiting = (applied, seq)
    if waiting is not None:
        evals += finish_batch(waiting[0], store, CFG).evaluations
    return evals, store


def _log(users: bool) -> pd.DataFrame:
    """Sessions that overlap in time (a session's clicks are several batches apart)."""
    df = generate_clicks(60, 40, 8 if users else None, seed=5, span_days=0.02,
                         mean_click_gap=60.0, min_session_gap=1800.0)  # fmt: skip
    return df.sort_values("Time", kind="stable").reset_index(drop=True)


def _assert_equal(live: LiveCounts, offline: dict[str, float]) -> None:
    assert live.n == offline["n_events"] > 0
    for k in KS:
        assert live.recall(k) == offline[f"recall@{k}"], k
        assert live.mrr(k) == pytest.approx(offline[f"mrr@{k}"], abs=1e-12), k


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_live_figures_equal_the_offline_evaluator_gru4rec(overlap: bool) -> None:
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
    from trainer.evaluate import evaluate_next_item

    df = _log(users=False)
    items = sorted(df["ItemId"].astype(str).unique())
    net = GRU4Rec(GRU4RecConfig(n_items=len(items), layers=[16]), seed=3)
    model = ServingModel(net, items, "g1", top_k=5)
    evals, _ = _replay(_records(df), model, batch=5, overlap=overlap)
    index = {it: i for i, it in enumerate(items)}
    offline = evaluate_next_item(net, df, index, ks=KS)
    counts = tally(evals)
    assert list(counts) == [("champion", "g1")]
    _assert_equal(counts[("champion", "g1")], offline)
    # every scored click is a click that continues its session, once
    assert len({(e.partition, e.offset) for e in evals}) == len(evals)


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_live_figures_equal_the_offline_evaluator_hrnn(overlap: bool) -> None:
    """HRNN (no split step: answers scored as states advance), user states across sessions,
    a session memory with its offsets and gate set (not silent): the same figures as
    ``trainer evaluate``'s per-user evaluator on the same log."""
    from streamrec.model.hrnn import HRNN
    from trainer.hier.evaluate import evaluate_users_job

    df = _log(users=True)
    items = sorted(df["ItemId"].astype(str).unique())
    torch.manual_seed(4)
    net = HRNN(len(items), layers=[16], user_layers=[8], session_memory=8, memory_gate=True)
    memory = net.session_memory()
    assert memory is not None and memory.gate_weight is not None
    with torch.no_grad():
        memory.bias.copy_(torch.randn_like(memory.bias))
        memory.gate_weight.copy_(torch.randn_like(memory.gate_weight))
    net.eval()
    model = ServingModel(net, items, "h1", top_k=5)
    evals, _ = _replay(_records(df), model, batch=5, overlap=overlap)
    index = {it: i for i, it in enumerate(items)}
    offline = evaluate_users_job(net, df, index, KS, "conservative")
    _assert_equal(tally(evals)[("champion", "h1")], offline)


def test_the_answer_is_kept_in_the_session_state_and_survives_a_restart() -> None:
    """The state after a click holds that click's answer (top-DEPTH); a later click in a new
    process (the store is all that is left) is scored against it."""
    model = tiny_serving_model(n_items=50, top_k=5)
    store = StateStore()
    first = process_batch([Record(click("s", "i1", t=T0), None, "c", 0, 0)], store, model, CFG)
    s = store.get_session("a:s")
    assert s is not None and s.answer is not None
    assert s.answer.items is not None and len(s.answer.items) == DEPTH
    assert s.answer.items[:5] == first.recommendations[0].items
    assert (s.answer.version, s.answer.arm) == ("v1", "champion")
    assert first.evaluations == []  # the session's first click has nothing to be scored on
    target = s.answer.items[2]
    # "restart": a fresh process sees the stored bytes only
    again = StateStore()
    part = again.partition(0)
    assert part is not None
    for key, value in store.sessions.items():
        part.write(b"s/", key, value)
    res = process_batch([Record(click("s", target, t=T0 + 1), None, "c", 0, 1)], again, model, CFG)
    assert res.evaluations == [Evaluation(0, 1, "champion", "v1", 3.0)]


def test_a_redelivered_click_is_answered_and_never_scored_twice() -> None:
    model = tiny_serving_model(n_items=50, top_k=5)
    store = StateStore()
    values = [click("s", f"i{j}", t=T0 + j) for j in range(4)]
    records = [Record(v, None, "c", 0, j) for j, v in enumerate(values)]
    once = process_batch(records, store, model, CFG)
    assert [e.offset for e in once.evaluations] == [1, 2, 3]
    # a crash after the states were stored: the last two clicks come again
    again = process_batch(records[2:], store, model, CFG)
    assert all(r.duplicate for r in again.recommendations) and again.evaluations == []
    # the same event id at another offset is a duplicate too
    with_ids = [Record(click("t", "i1", t=T0, event_id="e1"), None, "c", 0, 10)]
    with_ids.append(Record(click("t", "i2", t=T0 + 1, event_id="e2"), None, "c", 0, 11))
    process_batch(with_ids, store, model, CFG)
    dup = process_batch([Record(click("t", "i2", t=T0 + 1, event_id="e2"), None, "c", 0, 12)],
                        store, model, CFG)  # fmt: skip
    assert dup.recommendations[0].duplicate and dup.evaluations == []


def test_live_metrics_off_keeps_no_answer() -> None:
    model = tiny_serving_model(n_items=50, top_k=5)
    cfg = CoreConfig(session_gap_seconds=3600.0, top_k=5, live_metrics=False)
    store = StateStore()
    values = [click("s", f"i{j}", t=T0 + j) for j in range(3)]
    res = process_batch(
        [Record(v, None, "c", 0, j) for j, v in enumerate(values)], store, model, cfg
    )
    assert res.evaluations == []
    s = store.get_session("a:s")
    assert s is not None and s.answer is None
    assert all(len(r.items) == 5 for r in res.recommendations)


def test_session_states_of_earlier_formats_decode_without_an_answer() -> None:
    """S2 states (before answers) still decode; the next click then has nothing to be scored
    on, and its answer is kept from then on."""
    s = SessionState("s", np.ones(4, np.float32), "v", None, ["a"], 0, 3, 1.0, 1.0, 1, 0, ["e"])
    s4 = s.to_bytes()
    # S4 ends with the incarnation ("": a 2-byte length) and the answer (none: one byte)
    assert s4[:2] == b"S4" and s4[-3:] == b"\x00\x00\x00"
    s3 = b"S3" + s4[2:-3] + b"\x00"  # S3: the answer, no incarnation
    s2 = b"S2" + s4[2:-3]
    for old in (s3, s2):
        back = SessionState.from_bytes(old)
        assert back.answer is None and back.same_as(s, atol=0)
    s.answer = Answer("v", "challenger", ["a", "b"], [2.0, 1.0])
    assert SessionState.from_bytes(s.to_bytes()).answer == s.answer


def test_answers_of_ids_with_the_separator_and_a_capped_state() -> None:
    odd = ["a\x1fb", "c", ""]
    s = SessionState(
        "s", np.zeros(2, np.float32), "v", answer=Answer("v", "champion", odd, [3, 2, 1])
    )
    back = SessionState.from_bytes(s.to_bytes())
    assert back.answer is not None and back.answer.items == odd
    # over the cap with nothing else to drop, the answer goes
    top = Answer("v", "champion", ["x" * 300] * DEPTH, [1.0] * DEPTH)
    big = SessionState("s", np.zeros(2, np.float32), "v", answer=top)
    raw = big.to_bytes(1000)
    assert len(raw) <= 1000 and SessionState.from_bytes(raw).answer is None
