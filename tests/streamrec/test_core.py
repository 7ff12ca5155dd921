"""The pipeline core over the in-memory state twin (no Kafka)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.expiry import sweep_idle
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Recommendation, Record
from streamrec.serving.state import SessionState, UserState
from streamrec.serving.state_store import SESSIONS, USERS, MemoryPartition, StateStore
from streamrec.testing import click, offline_recommendations, tiny_serving_model

T0 = 1.7e9
CFG = CoreConfig(session_gap_seconds=100.0, recent_items=10, recent_sessions=3, top_k=5)


def recs(values: list[bytes], start: int = 0, partition: int = 0) -> list[Record]:
    return [
        Record(v, topic="clicks", partition=partition, offset=start + i)
        for i, v in enumerate(values)
    ]


def test_batch_with_several_keys_matches_offline_prefixes() -> None:
    model = tiny_serving_model()
    sessions = {"s1": ["i1", "i2", "i3"], "s2": ["i4", "i5"], "s3": ["i6", "i7", "i8", "i9"]}
    # interleave the sessions in one stream and cut it into batches of 4
    stream = []
    for j in range(4):
        for s, items in sessions.items():
            if j < len(items):
                stream.append(click(s, items[j], t=T0 + j))
    store = StateStore()
    out = []
    records = recs(stream)
    for i in range(0, len(records), 4):
        out += process_batch(records[i : i + 4], store, model, CFG).recommendations
    expected = dict(
        zip(
            [(s, j) for s, items in sessions.items() for j in range(len(items))],
            offline_recommendations(model, sessions.values(), k=5),
            strict=True,
        )
    )
    pos: dict[str, int] = {}
    for r in out:
        j = pos.get(r.session_id, 0)
        pos[r.session_id] = j + 1
        items, scores = expected[(r.session_id, j)]
        assert r.items == items
        np.testing.assert_allclose(r.scores, scores, rtol=1e-5, atol=1e-6)
        assert r.model_version == "v1" and not r.duplicate
    assert len(out) == len(stream)
    assert {k: s.n_events for k, s in store.iter_sessions()} == {"a:s1": 3, "a:s2": 2, "a:s3": 4}


def test_same_key_many_times_in_one_batch_keeps_order() -> None:
    model = tiny_serving_model()
    items = ["i1", "i2", "i3", "i4", "i5"]
    values = [click("s", it, t=T0 + j) for j, it in enumerate(items)]
    values.insert(2, click("other", "i9", t=T0))
    res = process_batch(recs(values), StateStore(), model, CFG)
    mine = [r for r in res.recommendations if r.session_id == "s"]
    assert [r.item_id for r in mine] == items
    assert [r.offset for r in mine] == sorted(r.offset for r in mine)
    ref = offline_recommendations(model, [items], k=5)
    assert [r.items for r in mine] == [x[0] for x in ref]
    # the whole batch equals feeding it one event at a time
    store1 = StateStore()
    for rec in recs(values):
        process_batch([rec], store1, model, CFG)
    store2 = StateStore()
    process_batch(recs(values), store2, model, CFG)
    assert store1.sessions.keys() == store2.sessions.keys()
    for key in store1.sessions:  # equal up to float rounding of different batch shapes
        s1, s2 = store1.get_session(key), store2.get_session(key)
        assert s1 is not None and s2 is not None and s1.same_as(s2)


def test_session_change_mid_batch_by_id_gap_and_end_event() -> None:
    model = tiny_serving_model()
    u = "u1"
    uk = "u:u1"
    values = [
        click("a", "i1", user=u, t=T0),
        click("a", "i2", user=u, t=T0 + 1),
        click("b", "i3", user=u, t=T0 + 2),  # new id: ends "a"
        click("b", "i4", user=u, t=T0 + 500),  # gap > 100 s: ends "b", same id restarts
        click("b", "", user=u, t=T0 + 501, type="session_end"),
        click("c", "i5", user=u, t=T0 + 502),
    ]
    values[4] = json.dumps({"session_id": "b", "user_id": u, "type": "session_end"}).encode()
    store = StateStore()
    res = process_batch(recs(values), store, model, CFG)
    assert len(res.recommendations) == 5
    assert res.stats["sessions_ended"] == 3
    s = store.get_session(uk)
    assert s is not None and s.session_id == "c" and s.recent_items == ["i5"]
    user = store.get_user(uk)
    assert user is not None and user.sessions == [["i1", "i2"], ["i3"], ["i4"]]
    assert user.offset == 4  # the session_end event that ended the last session
    ref = offline_recommendations(model, [["i1", "i2"], ["i3"], ["i4"], ["i5"]], k=5)
    assert [r.items for r in res.recommendations] == [x[0] for x in ref]


def test_hrnn_user_state_advances_at_session_end() -> None:
    model = tiny_serving_model(user_dim=8)
    store = StateStore()
    first = [click("a", "i1", user="u", t=T0), click("a", "i2", user="u", t=T0 + 1)]
    process_batch(recs(first), store, model, CFG)
    sess_a = store.get_session("u:u")
    assert sess_a is not None
    hidden_a = sess_a.hidden
    assert store.get_user("u:u") is None
    res = process_batch(recs([click("b", "i3", user="u", t=T0 + 2)], start=2), store, model, CFG)
    user = store.get_user("u:u")
    assert user is not None
    expected_ctx = model.end_session(model.initial_user_states(1), hidden_a[None])[0]
    np.testing.assert_allclose(user.context, expected_ctx, atol=1e-6)
    assert np.abs(user.context).sum() > 0
    # the new session starts from the advanced user context
    init = model.initial_states(expected_ctx[None], 1)
    ref = model.step(model.rows(["i3"]), init, expected_ctx[None], k=5)
    assert res.recommendations[0].items == model.ids(ref.top_rows[0]).tolist()
    sess_b = store.get_session("u:u")
    assert sess_b is not None
    np.testing.assert_allclose(sess_b.hidden, ref.states[0], atol=1e-6)
    # two users ending sessions in one batch (batched end_session)
    more = [
        click("x", "i1", user="v", t=T0),
        click("y", "i2", user="u", t=T0 + 3),
        click("z", "i2", user="v", t=T0 + 3),
    ]
    process_batch(recs(more, start=3), store, model, CFG)
    user_u, user_v = store.get_user("u:u"), store.get_user("u:v")
    assert user_u is not None and len(user_u.sessions) == 2
    assert user_v is not None and len(user_v.sessions) == 1


def test_unknown_items_do_not_advance_but_are_counted_and_recorded() -> None:
    model = tiny_serving_model()
    store = StateStore()
    res = process_batch(
        recs([click("s", "i1", t=T0), click("s", "NEW", t=T0 + 1), click("s", "i2", t=T0 + 2)]),
        store,
        model,
        CFG,
    )
    assert res.stats["unknown_items"] == 1
    assert res.unknown_items == [("NEW", "clicks:0:1")]
    r = res.recommendations
    assert r[1].unknown_item and r[1].items == r[0].items
    assert r[2].items == offline_recommendations(model, [["i1", "i2"]], k=5)[1][0]
    s = store.get_session("a:s")
    assert s is not None and s.recent_items == ["i1", "NEW", "i2"] and s.n_unknown == 1


def test_duplicates_not_applied_twice_but_answered() -> None:
    model = tiny_serving_model(user_dim=4)
    values = [click("a", f"i{j}", user="u", t=T0 + j) for j in range(1, 6)]
    values.append(json.dumps({"session_id": "a", "user_id": "u", "type": "session_end"}).encode())
    values += [click("b", f"i{j}", user="u", t=T0 + 10 + j) for j in range(6, 9)]
    once = StateStore()
    r_once = process_batch(recs(values), once, model, CFG)
    # a worker that crashed: it applied the first 7 events, then everything is redelivered
    crashed = StateStore()
    process_batch(recs(values[:4]), crashed, model, CFG)
    process_batch(recs(values[4:7], start=4), crashed, model, CFG)
    again = process_batch(recs(values), crashed, model, CFG)
    assert crashed.sessions == once.sessions and crashed.users == once.users
    assert again.stats["duplicates"] == 7
    # every click answered; a duplicate of the last applied click re-emits the original
    assert len(again.recommendations) == len(r_once.recommendations) == 8
    dup_last = [r for r in again.recommendations if r.offset == 6]
    orig = [r for r in r_once.recommendations if r.offset == 6]
    assert dup_last[0].duplicate and dup_last[0].items == orig[0].items
    assert [r.offset for r in again.recommendations if not r.duplicate] == [7, 8]


def test_bad_records_become_dead_letters_and_valid_ones_pass() -> None:
    model = tiny_serving_model()
    values = [b"{oops", click("s", "i1", t=T0), b'{"session_id": 1}', b"x" * 100_000]
    res = process_batch(recs(values), StateStore(), model, CFG)
    assert [d.reason for d in res.dead_letters] == ["unparseable", "invalid", "oversized"]
    assert [d.offset for d in res.dead_letters] == [0, 2, 3]
    assert len(res.recommendations) == 1 and res.recommendations[0].click_id == "clicks:0:1"


def test_the_click_id_is_the_key_and_event_id_and_values_serialise() -> None:
    """A click's id names its key and its event id, so two users (or a user and an anonymous
    session of the same name) sending the same event id get different click ids."""
    model = tiny_serving_model()
    values = [
        click("s", "i1", t=T0, event_id="e-1"),
        click("t", "i1", user="s", t=T0, event_id="e-1"),
        click("s/e-1", "i1", t=T0, event_id="x"),  # cannot forge "a:s/e-1" nor "u:s/e-1"
        click("%2F", "i1", t=T0, event_id="y"),
    ]
    res = process_batch(recs(values), StateStore(), model, CFG)
    assert [json.loads(v)["click_id"] for _, v in res.recommendation_values()] == [
        "a:s/e-1",
        "u:s/e-1",
        "a:s%2Fe-1/x",
        "a:%252F/y",
    ]
    assert res.recommendation_values()[0][0] == b"s"


def test_recommendation_json_is_json_dumps_of_its_fields_and_reads_back() -> None:
    model = tiny_serving_model()
    values = [click("s", "i1", t=T0, event_id="e-1"), click("s", "NEW", user=None, t=T0 + 1)]
    res = process_batch(recs(values), StateStore(), model, CFG)
    for r, (key, value) in zip(res.recommendations, res.recommendation_values(), strict=True):
        assert key == b"s" and value == json.dumps(r.as_dict()).encode() == r.to_json()
        assert list(json.loads(value)) == [f.name for f in dataclasses.fields(Recommendation)]
        assert Recommendation.from_json(value) == r  # the readers' one way back
    for bad in (b"[1]", b'{"click_id": "x"}', json.dumps({**r.as_dict(), "extra": 1})):
        with pytest.raises(ValueError, match="not a recommendation"):
            Recommendation.from_json(bad)


def test_model_swap_reencodes_old_states_from_recent_items() -> None:
    old = tiny_serving_model(version="v1", seed=1, user_dim=4)
    new = tiny_serving_model(version="v2", seed=2, user_dim=4)
    store = StateStore()
    vals = [click("a", "i1", user="u", t=T0), click("b", "i2", user="u", t=T0 + 1)]
    vals.append(click("b", "i3", user="u", t=T0 + 2))
    process_batch(recs(vals), store, old, CFG)
    res = process_batch(recs([click("b", "i4", user="u", t=T0 + 3)], start=3), store, new, CFG)
    assert res.stats["sessions_migrated"] == 1 and res.stats["users_migrated"] == 1
    migrated = store.get_session("u:u")
    assert migrated is not None and migrated.version == "v2"
    # the same as if v2 had served the whole history
    ref = StateStore()
    process_batch(recs([*vals, click("b", "i4", user="u", t=T0 + 3)]), ref, new, CFG)
    want = ref.get_session("u:u")
    assert want is not None and migrated.same_as(want)


def test_idle_sweep_closes_sessions_and_advances_users() -> None:
    model = tiny_serving_model(user_dim=4)
    store = StateStore()
    clock = StreamClock(min_keys=2)
    vals = [click("a", "i1", user="u", t=T0), click("s", "i2", t=T0 + 50)]
    process_batch(recs(vals), store, model, CFG, clock=clock)
    # the clock runs in event time: years behind the wall clock, a sweep at its time keeps both
    now = clock.now(0)
    assert now is not None and T0 <= now <= T0 + 50 + 60
    assert sweep_idle(store, model, CFG, clock=clock).sessions_ended == 0
    assert sorted(store.sessions) == ["a:s", "u:u"]
    res = sweep_idle(store, model, CFG, now=T0 + 120)
    assert res.sessions_ended == 1 and list(store.sessions) == ["a:s"]
    u = store.get_user("u:u")
    assert u is not None and u.sessions == [["i1"]] and u.offset == 0
    # a redelivered click of the swept session is answered but does not resurrect it
    again = process_batch(recs(vals[:1]), store, model, CFG)
    assert again.recommendations[0].duplicate and "u:u" not in store.sessions
    assert sweep_idle(store, model, CFG, now=T0 + 1000).sessions_ended == 1
    assert not store.sessions
    cfg = CoreConfig(session_gap_seconds=100.0, user_ttl_seconds=10.0)
    assert sweep_idle(store, model, cfg, now=T0 + 1000).users_expired == 1
    assert not store.users


def test_the_whole_sweep_counts_the_states_of_every_partition() -> None:
    """sweep_idle adds up every partition: sessions ended, users expired, and the states left
    (a user row that no longer decodes is not counted as left)."""
    model = tiny_serving_model(user_dim=4)
    store = StateStore({0: MemoryPartition(), 1: MemoryPartition()})
    for p in (0, 1):
        vals = [
            click(f"idle{p}", "i1", user=f"u{p}", t=T0),
            click(f"live{p}", "i2", t=T0 + 90),
            click(f"live{p}x", "i3", t=T0 + 95),
        ]
        process_batch(recs(vals, partition=p), store, model, CFG)
    part = store.partition(1)
    assert part is not None
    part.write(USERS, "u:broken", b"garbage")
    res = sweep_idle(store, model, CFG, now=T0 + 150)
    assert (res.sessions_ended, res.users_expired) == (2, 0)
    assert (res.sessions_left, res.users_left) == (4, 2)
    cfg = CoreConfig(session_gap_seconds=100.0, user_ttl_seconds=10.0)
    res = sweep_idle(store, model, cfg, now=T0 + 1000)
    assert (res.sessions_ended, res.users_expired, res.sessions_left) == (4, 2, 0)


def test_corrupt_state_is_replaced_not_fatal() -> None:
    model = tiny_serving_model()
    store = StateStore()
    twin = store.partition(0)
    assert twin is not None
    twin.write(SESSIONS, "a:s", b"garbage")
    res = process_batch(recs([click("s", "i1", t=T0)]), store, model, CFG)
    assert len(res.recommendations) == 1 and store.corrupt == 1
    assert isinstance(store.get_session("a:s"), SessionState)


@pytest.mark.parametrize("user_dim", [0, 6])
def test_user_state_types(user_dim: int) -> None:
    model = tiny_serving_model(user_dim=user_dim)
    store = StateStore()
    vals = [click("a", "i1", user="u", t=T0), click("b", "i1", user="u", t=T0 + 1)]
    process_batch(recs(vals), store, model, CFG)
    u = store.get_user("u:u")
    assert isinstance(u, UserState) and u.context.size == user_dim


def test_stream_clock_follows_event_time_not_wall_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's clock (per partition, issue 13): the arrival wall time plus the median skew
    (event time - arrival) of the partition's keys, one vote each (issue 19), so it reads
    event time, moves on with the wall clock between events, and no single event (late or
    early) nor any burst of one key moves it. Wall time is frozen here, so every value is
    exact."""
    import streamrec.serving.clock

    wall = [2.0e9]
    monkeypatch.setattr(streamrec.serving.clock.time, "time", lambda: wall[0])
    model = tiny_serving_model()
    store = StateStore()
    clock = StreamClock(min_keys=3)
    vals = [click("a", "i1", t=T0)] + [click(k, "i2", t=T0 + 50) for k in ("b", "d", "e")]
    process_batch(recs(vals), store, model, CFG, clock=clock, now=wall[0])
    assert clock.now(0) == T0 + 50  # the median event time, not the wall time (2e9)
    assert clock.now(1) is None  # another partition has a clock of its own, not trusted yet
    wall[0] += 30  # 30 s of wall time with no events: the clock moves on with it
    assert clock.now(0) == T0 + 80
    # one late event does not move it back (nor would one early event move it on)
    late = [click("c", "i3", t=T0 + 40)]
    process_batch(recs(late, start=4), store, model, CFG, clock=clock, now=wall[0])
    assert clock.now(0) == T0 + 80
    # the sweep at the clock's time ends exactly the sessions idle for longer than the gap
    wall[0] += 30  # clock: T0 + 110; a idle 110 s > 100, b, d, e 60 s, c 70 s
    res = sweep_idle(store, model, CFG, clock=clock)
    assert res.sessions_ended == 1 and sorted(store.sessions) == ["a:b", "a:c", "a:d", "a:e"]
    # one key's burst, however long, is one vote: the clock stays, nothing more ends
    burst = [click("b", f"i{j}", t=T0 + 560) for j in range(4, 24)]
    process_batch(recs(burst, start=5), store, model, CFG, clock=clock, now=wall[0])
    assert clock.now(0) == T0 + 110
    assert sweep_idle(store, model, CFG, clock=clock).sessions_ended == 0
    # the stream moving on, carried by most of the keys, does move it
    later = [click(k, "i5", t=T0 + 560) for k in ("c", "d")]
    process_batch(recs(later, start=25), store, model, CFG, clock=clock, now=wall[0])
    assert clock.now(0) == T0 + 560
    assert sweep_idle(store, model, CFG, clock=clock).sessions_ended == 1  # e, idle 510 s
    assert sorted(store.sessions) == ["a:b", "a:c", "a:d"]
