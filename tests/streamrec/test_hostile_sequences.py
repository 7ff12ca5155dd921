"""Hostile *sequences* (issue 19): what an attacker or a faulty producer sends as many
messages, from several keys, repeated or combined, between the clicks of 40 victims; and the
property that no minority of a partition's keys moves its clock however many messages they
send.

The machinery: :func:`run_attack` plays the victims' stream (each victim clicks, then the
attack, then the idle sweep at the partition's clock, then each victim clicks again) with and
without an :class:`Attack`, and :func:`assert_victims_untouched` checks that the victims'
answers, their session and user states, and what the sweep ended are the same in both, and
that no victim click became a dead letter. :data:`SEQUENCES` is the corpus of measured cases
(tests/streamrec/test_hostile_sequences_broker.py sends some of them through a real worker).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.expiry import sweep_idle
from streamrec.serving.input_topic import InputTopic
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import BatchResult, Recommendation, Record
from streamrec.serving.state import SessionState, UserState
from streamrec.serving.state_store import StateStore
from streamrec.testing import tiny_serving_model

WALL = time.time()
CFG = CoreConfig(session_gap_seconds=1800.0, top_k=5, require_key=True)
VICTIMS = [f"victim{i}" for i in range(40)]
HOUR, DAY = 3600.0, 86400.0
YEAR = 365 * DAY
T2001 = 990_000_000.0  # 2001-05-16
MODEL = tiny_serving_model(n_items=50, user_dim=4)


def body(user: str, session: str, item: str, t: float, event_id: str | None = None) -> bytes:
    d: dict[str, Any] = {"session_id": session, "item_id": item, "user_id": user, "timestamp": t}
    if event_id is not None:
        d["event_id"] = event_id
    return json.dumps(d).encode()


@dataclass
class Attack:
    """Messages (key, event time) sent between the victims' clicks, in batches of ``batch``."""

    name: str
    messages: list[tuple[str, float]]
    batch: int = 64
    #: what the attack's own messages must become: "dead" (all dead-lettered), "ok" (none),
    #: or None (either)
    expect: str | None = None
    #: the attack comes before the victims' first clicks (a fresh clock after a restart)
    first: bool = False


def burst(name: str, keys: int, each: int, t: float, expect: str | None, **kw: Any) -> Attack:
    """``keys`` attacker keys sending ``each`` clicks at event time ``t``, interleaved."""
    msgs = [(f"mallory{k}", t + j * 0.01) for j in range(each) for k in range(keys)]
    return Attack(name, msgs, expect=expect, **kw)


def slow_producer(share: float = 0.6, keys: int = 12, n: int = 300) -> Attack:
    """A producer one year slow: ``keys`` keys (a minority) carrying ``share`` of the
    partition's traffic during the attack."""
    msgs = [(f"slow{j % keys}", WALL - YEAR + j) for j in range(n)]
    return Attack(f"a producer one year slow, {share:.0%} of the traffic", msgs, expect="dead")


SEQUENCES = [
    burst("6 keys x 60 clicks at +23 h", 6, 60, WALL + 23 * HOUR, "dead"),
    burst("6 keys x 60 clicks at +55 min", 6, 60, WALL + 55 * 60, "ok"),
    burst("6 keys x 60 clicks 40 days old", 6, 60, WALL - 40 * DAY, "dead"),
    burst("one key x 60 clicks dated 2001, on a fresh clock", 1, 60, T2001, None, first=True),
    burst("5 keys x 30 clicks dated 2001, on a fresh clock", 5, 30, T2001, None, first=True),
    burst("19 keys x 100 clicks at +50 min", 19, 100, WALL + 50 * 60, "ok"),
    burst("39 keys x 20 clicks a year old", 39, 20, WALL - YEAR, "dead"),
    slow_producer(),
    Attack(
        "alternating +55 min and -29 days from 10 keys",
        [(f"m{j % 10}", WALL + (55 * 60 if j % 2 else -29 * DAY)) for j in range(400)],
        batch=7,
    ),
]


@dataclass
class Run:
    answers: dict[str, list[Recommendation]] = field(default_factory=dict)  # victim -> answers
    dead_victims: list[str] = field(default_factory=list)
    attack_dead: int = 0
    attack_ok: int = 0
    swept: int = 0
    store: StateStore = field(default_factory=StateStore)


def _victim_round(n: int, offset: int, t0: float) -> list[Record]:
    """Each victim's n-th click (victim i's event time spread over 40 s before ``t0``)."""
    return [
        Record(
            body(v, f"{v}-s", f"i{(i * 7 + n) % 50}", t0 - i, f"ev{n}"),
            v.encode(),
            "clicks",
            0,
            offset + i,
            None,
            WALL,
        )
        for i, v in enumerate(VICTIMS)
    ]


def run_attack(attack: Attack | None, clock: StreamClock | None = None) -> Run:
    run = Run()
    clock = clock or StreamClock.from_config(CFG)
    offset = 0

    def feed(records: list[Record], victims: bool) -> None:
        nonlocal offset
        res: BatchResult = process_batch(records, run.store, MODEL, CFG, clock=clock, now=WALL)
        offset += len(records)
        for d in res.dead_letters:
            if victims:
                run.dead_victims.append(d.detail)
            else:
                run.attack_dead += 1
        for r in res.recommendations:
            if victims:
                run.answers.setdefault(r.user_id or "", []).append(r)
            else:
                run.attack_ok += 1

    def attack_messages() -> None:
        assert attack is not None
        msgs = attack.messages
        for i in range(0, len(msgs), attack.batch):
            chunk = msgs[i : i + attack.batch]
            records = [
                Record(
                    body(key, f"{key}-s", f"i{j % 50}", t, "ev1"),
                    key.encode(),
                    "clicks",
                    0,
                    offset + j,
                    None,
                    WALL,
                )
                for j, (key, t) in enumerate(chunk)
            ]
            feed(records, victims=False)

    if attack is not None and attack.first:
        attack_messages()
    feed(_victim_round(0, offset, WALL - 600), victims=True)
    if attack is not None and not attack.first:
        attack_messages()
    # the clocks are read at the records' arrival (WALL, import time), not at run time: the
    # full suite runs these tests minutes after importing them
    run.swept = sweep_idle(run.store, MODEL, CFG, clock=clock, now=WALL).sessions_ended
    feed(_victim_round(1, offset, WALL - 1), victims=True)
    return run


BASELINE = run_attack(None)


def _victim_states(run: Run) -> dict[str, tuple[SessionState | None, UserState | None]]:
    return {
        v: (run.store.get_session("u:" + v, 0), run.store.get_user("u:" + v, 0)) for v in VICTIMS
    }


def assert_victims_untouched(run: Run) -> None:
    assert not run.dead_victims, run.dead_victims[:3]
    assert run.answers.keys() == BASELINE.answers.keys() == set(VICTIMS)
    for v in VICTIMS:
        got, want = run.answers[v], BASELINE.answers[v]
        assert [(r.click_id, r.duplicate, r.items) for r in got] == [
            (r.click_id, r.duplicate, r.items) for r in want
        ], v
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.scores, w.scores, rtol=1e-6, atol=1e-7)
    states, base = _victim_states(run), _victim_states(BASELINE)
    for v in VICTIMS:  # the same but for the offsets (the attack's records take offsets too)
        (s, u), (bs, bu) = states[v], base[v]
        assert s is not None and bs is not None
        s.offset = bs.offset
        assert s.same_as(bs), v
        assert (u is None) == (bu is None), v
    assert BASELINE.swept == 0


def test_the_baseline_keeps_every_victim_session_open() -> None:
    assert BASELINE.swept == 0 and not BASELINE.dead_victims
    assert all(len(a) == 2 and not a[1].duplicate for a in BASELINE.answers.values())


@pytest.mark.parametrize("attack", SEQUENCES, ids=[a.name for a in SEQUENCES])
def test_a_hostile_sequence_changes_no_victim_answer(attack: Attack) -> None:
    run = run_attack(attack)
    assert_victims_untouched(run)
    assert run.attack_ok + run.attack_dead == len(attack.messages)
    if attack.expect == "dead":
        assert run.attack_ok == 0
    elif attack.expect == "ok":
        assert run.attack_dead == 0


def test_a_burst_on_a_fresh_clock_cannot_make_it_refuse_other_keys() -> None:
    """Issue 19's measured case: a burst dated 2001 accepted after 5 messages, and the next
    5 valid clicks of other keys dead-lettered. One key's burst is one vote: the clock is
    trusted only once 8 keys vote, and then it is the honest keys' time."""
    clock = StreamClock.from_config(CFG)
    attacker = [
        Record(body("old", "old-s", "i1", T2001 + j), b"old", "clicks", 0, j, None, WALL)
        for j in range(60)
    ]
    process_batch(attacker, StateStore(), MODEL, CFG, clock=clock, now=WALL)
    assert clock.now(0) is None  # one key: not trusted, however many messages
    honest = _victim_round(0, 100, WALL - 5)[:10]
    res = process_batch(honest, StateStore(), MODEL, CFG, clock=clock, now=WALL)
    assert not res.dead_letters and len(res.recommendations) == 10
    now = clock.now(0, wall=WALL)  # measured at the records' arrival, not at import + run time
    assert now is not None and abs(now - (WALL - 5)) < 60
    # and now the attacker's next click is out of range (its key dissents, alone)
    again = [Record(body("old", "old-s", "i1", T2001 + 61), b"old", "clicks", 0, 200, None, WALL)]
    res = process_batch(again, StateStore(), MODEL, CFG, clock=clock, now=WALL)
    assert [d.reason for d in res.dead_letters] == ["timestamp_out_of_range"]


def test_a_new_log_carried_by_most_keys_recentres_the_clock() -> None:
    """A real, lasting change of skew (another log replayed into the partition) is carried by
    a majority of the keys: once the dissenting keys that agree are more than half of the
    window's, the clock follows them, and the event that tips it is accepted; the clock is
    trusted again once more than two thirds of the votes agree."""
    clock = StreamClock.from_config(CFG)
    process_batch(_victim_round(0, 0, WALL - 5), StateStore(), MODEL, CFG, clock=clock, now=WALL)
    replay = [
        Record(body(f"r{j}", f"r{j}-s", "i1", WALL - 3 * YEAR + j), f"r{j}".encode(), "clicks", 0,
               100 + j, None, WALL)
        for j in range(125)
    ]  # fmt: skip
    res = process_batch(replay, StateStore(), MODEL, CFG, clock=clock, now=WALL)
    # the first 40 new keys are refused (40 dissenters against 40 voters), the 41st tips it
    assert [d.offset for d in res.dead_letters] == list(range(100, 140))
    assert len(res.recommendations) == 85
    now = clock.now(0, wall=WALL)  # 125 replayed keys and 40 live ones vote: the lower median
    assert now is not None and abs(now - (WALL - 3 * YEAR + 82)) < 60


def test_a_refused_event_takes_its_keys_vote_away() -> None:
    """A dead letter does not vote, even from a key whose earlier click did: 21 keys (a
    minority of the partition's 61) that click honestly and then send clicks 40 days old
    would otherwise hold more than a third of the votes far from the median, and the clock
    would no longer be trusted (its sweep stopped, any event time admitted)."""
    clock = StreamClock.from_config(CFG)
    process_batch(_victim_round(0, 0, WALL - 5), StateStore(), MODEL, CFG, clock=clock, now=WALL)
    attackers = [f"turn{k}" for k in range(21)]

    def clicks(t: float, offset: int, each: int = 1) -> list[Record]:
        return [
            Record(body(a, f"{a}-s", "i1", t + j, f"e{j}"), a.encode(), "clicks", 0,
                   offset + j * len(attackers) + k, None, WALL)
            for j in range(each)
            for k, a in enumerate(attackers)
        ]  # fmt: skip

    res = process_batch(clicks(WALL - 5, 100), StateStore(), MODEL, CFG, clock=clock, now=WALL)
    assert not res.dead_letters  # their honest clicks vote
    res = process_batch(
        clicks(WALL - 40 * DAY, 200, each=3), StateStore(), MODEL, CFG, clock=clock, now=WALL
    )
    assert len(res.dead_letters) == 63 and not res.recommendations
    now = clock.now(0, wall=WALL)
    assert now is not None and abs(now - (WALL - 5)) < 60


def test_click_ids_do_not_collide_across_users() -> None:
    """Two users sending the same event id get answers with different click ids; a consumer
    that drops repeats by click id keeps both (issue 19, README)."""
    recs = [
        Record(body("alice", "a", "i1", WALL - 2, "e1"), b"alice", "clicks", 0, 0, None, WALL),
        Record(body("mallory", "m", "i2", WALL - 2, "e1"), b"mallory", "clicks", 0, 1, None, WALL),
    ]
    res = process_batch(recs, StateStore(), MODEL, CFG, now=WALL)
    ids = [r.click_id for r in res.recommendations]
    assert len(set(ids)) == 2 and not any(r.duplicate for r in res.recommendations)
    kept: dict[str, Recommendation] = {}
    for r in res.recommendations:
        kept.setdefault(r.click_id, r)
    assert {r.user_id for r in kept.values()} == {"alice", "mallory"}


def test_a_key_on_a_partition_it_does_not_hash_to_is_dead_lettered() -> None:
    """A producer with another partitioner (Java's murmur2 against librdkafka's crc32) puts
    one user's clicks on two partitions: the clicks on the wrong one are dead-lettered
    ``wrong_partition``, and the user's answers are those of one session on one partition."""
    topic = InputTopic(partitions=3, partitioner="consistent_random")
    key = b"alice"
    right = topic.partition_of(key)
    assert right is not None
    wrong = (right + 1) % 3
    clicks = [body("alice", "s", f"i{j}", WALL - 10 + j) for j in range(6)]
    alone = [Record(v, key, "clicks", right, j, None, WALL) for j, v in enumerate(clicks)]
    want = process_batch(alone, StateStore(), MODEL, CFG, now=WALL, topic=topic)
    mixed = [
        Record(v, key, "clicks", right if j % 2 == 0 else wrong, j, None, WALL)
        for j, v in enumerate(clicks)
    ]
    got = process_batch(mixed, StateStore(), MODEL, CFG, now=WALL, topic=topic)
    assert [d.reason for d in got.dead_letters] == ["wrong_partition"] * 3
    assert [d.offset for d in got.dead_letters] == [1, 3, 5]
    assert got.recommendations[0].items == want.recommendations[0].items
    # each answer on the right partition is the single session's answer after its prefix
    ref = [
        process_batch(alone[: j + 1 : 2], StateStore(), MODEL, CFG, now=WALL, topic=topic)
        for j in (0, 2, 4)
    ]
    assert [r.items for r in got.recommendations] == [x.recommendations[-1].items for x in ref]
    # murmur2 (Java's partitioner) as the setting: the same records judged by it
    java = InputTopic(partitions=3, partitioner="murmur2_random")
    got_java = process_batch(mixed, StateStore(), MODEL, CFG, now=WALL, topic=java)
    p_java = java.partition_of(key)
    assert len(got_java.recommendations) == sum(r.partition == p_java for r in mixed)


def test_a_recreated_topic_is_not_a_duplicate_source() -> None:
    """Issue 19: after the clicks topic is re-created (or the embedded broker restarted),
    offsets start at 0 again; a state written in the earlier incarnation does not make a
    returning user's clicks duplicates. Redeliveries within one incarnation still are."""
    store, clock = StateStore(), StreamClock.from_config(CFG)
    old = InputTopic(incarnation="old-id", ends={0: 1000})
    first = [
        Record(body(v, f"{v}-s", "i1", WALL - 60, f"a{j}"), v.encode(), "clicks", 0, 500 + j,
               None, WALL)
        for j, v in enumerate(VICTIMS[:10])
    ]  # fmt: skip
    process_batch(first, store, MODEL, CFG, clock=clock, now=WALL, topic=old)
    again = process_batch(first[:3], store, MODEL, CFG, clock=clock, now=WALL, topic=old)
    assert all(r.duplicate for r in again.recommendations)  # a redelivery: flagged
    # the new topic already reaches past the old positions (many clicks since it was
    # re-created), so the end bound alone would call them duplicates: the incarnation decides
    new = InputTopic(incarnation="new-id", ends={0: 2000})
    returning = [
        Record(body(v, f"{v}-s", "i2", WALL - 30, f"b{j}"), v.encode(), "clicks", 0, j, None,
               WALL)
        for j, v in enumerate(VICTIMS[:10])
    ]  # fmt: skip
    res = process_batch(returning, store, MODEL, CFG, clock=clock, now=WALL, topic=new)
    assert not any(r.duplicate for r in res.recommendations) and len(res.recommendations) == 10
    s = store.get_session("u:" + VICTIMS[0], 0)
    assert s is not None and (s.incarnation, s.offset, s.recent_items) == (
        "new-id",
        0,
        ["i1", "i2"],
    )
    # and in the new incarnation a redelivery is flagged again
    res = process_batch(returning[:2], store, MODEL, CFG, clock=clock, now=WALL, topic=new)
    assert all(r.duplicate for r in res.recommendations)


def test_a_forged_position_beyond_the_partition_end_freezes_nobody() -> None:
    """Issue 19: a well-formed state with offset 10^12 (written to the changelog by anyone
    who can) made every later click of its victim a duplicate. A position at or beyond what
    the partition's log reaches is no duplicate source: the clicks are applied."""
    store = StateStore()
    topic = InputTopic(incarnation="id", ends={0: 100})
    forged = SessionState("s", np.zeros(16, np.float32), MODEL.version, "alice", [], 0, 10**12)
    forged.incarnation = "id"
    store.put_session("u:alice", forged, 0)
    clicks = [
        Record(body("alice", "s", f"i{j}", WALL - 10 + j), b"alice", "clicks", 0, 90 + j, None,
               WALL)
        for j in range(4)
    ]  # fmt: skip
    res = process_batch(clicks, store, MODEL, CFG, now=WALL, topic=topic)
    assert [r.duplicate for r in res.recommendations] == [False] * 4
    s = store.get_session("u:alice", 0)
    assert s is not None and s.offset == 93 and s.n_events == 4
    assert topic.ends[0] == 100  # no record read reached it
    # the bound follows the records read: a state written now is a duplicate source
    later = [Record(body("alice", "s", "i9", WALL), b"alice", "clicks", 0, 150, None, WALL)]
    process_batch(later, store, MODEL, CFG, now=WALL, topic=topic)
    assert topic.ends[0] == 151
    res = process_batch(later, store, MODEL, CFG, now=WALL, topic=topic)
    assert [r.duplicate for r in res.recommendations] == [True]


# ---- the property: no minority of keys moves the clock --------------------------------------

#: the stated share: attacker keys strictly fewer than half of the partition's keys (40 victims)
MAX_ATTACKERS = len(VICTIMS) - 1
OFFSETS = st.one_of(
    st.sampled_from([23 * HOUR, 55 * 60, -40 * DAY, -YEAR, 29 * DAY, T2001 - WALL, 3599.0]),
    st.floats(min_value=-20 * YEAR, max_value=1.5 * HOUR, allow_nan=False),
)


@st.composite
def attacks(draw: st.DrawFn) -> Attack:
    n_keys = draw(st.integers(min_value=1, max_value=MAX_ATTACKERS))
    plans = [(draw(st.integers(min_value=1, max_value=40)), draw(OFFSETS)) for _ in range(n_keys)]
    msgs = [
        (f"m{k}", WALL + offset + j * draw(st.sampled_from([0.0, 1.0, 60.0])))
        for k, (size, offset) in enumerate(plans)
        for j in range(size)
    ]
    order = draw(st.permutations(range(len(msgs))))
    return Attack(
        "generated",
        [msgs[i] for i in order],
        batch=draw(st.integers(min_value=1, max_value=300)),
        first=False,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attacks())
def test_no_minority_of_keys_changes_other_keys_sessions_or_answers(attack: Attack) -> None:
    """Any attacker set of fewer keys than half the partition's, any burst sizes, any event
    time offsets, in any order and batching: every victim's answers and states are those of
    the run without them, and the sweep ends no victim session."""
    assert_victims_untouched(run_attack(attack))
