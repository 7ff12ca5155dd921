"""The native worker's partition states (streamrec.engines.native.store) and the state store
over them (streamrec.serving.state_store), without Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.engines.native.store import RocksDBPartition
from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.state import SessionState, StateLayoutError, UserState
from streamrec.serving.state_store import (
    DEAD_LETTERS_PER_RECOVERY,
    SESSIONS,
    USERS,
    CheckpointedPartition,
    MemoryPartition,
    StateStore,
)
from streamrec.testing import click, tiny_serving_model


@pytest.fixture
def parts(tmp_path: Path):
    states = {p: RocksDBPartition(tmp_path / str(p), p) for p in range(3)}
    yield states
    for s in states.values():
        s.close()


def test_pending_is_read_first_and_durable_only_after_commit(tmp_path: Path) -> None:
    st = RocksDBPartition(tmp_path / "0", 0)
    st.write(SESSIONS, "a", b"1")
    assert st.pending == {b"s/a": b"1"} and st.get(SESSIONS, "a") == b"1"
    st.close()
    st = RocksDBPartition(tmp_path / "0", 0)  # reopened: the uncommitted write is gone
    assert st.get(SESSIONS, "a") is None and st.changelog_offset == -1
    st.write(SESSIONS, "a", b"1")
    st.write(SESSIONS, "b", b"2")
    st.begin_checkpoint()
    st.commit(changelog_offset=41)
    st.write(SESSIONS, "b", None)  # a pending delete hides the durable value
    assert st.get(SESSIONS, "b") is None
    assert sorted(st.keys(SESSIONS)) == ["a"]
    st.close()
    st = RocksDBPartition(tmp_path / "0", 0)
    assert (st.get(SESSIONS, "a"), st.get(SESSIONS, "b"), st.changelog_offset) == (b"1", b"2", 41)
    st.close()


def test_writes_during_a_checkpoint_stay_pending_and_win(tmp_path: Path) -> None:
    st = RocksDBPartition(tmp_path / "0", 0)
    for key in "abc":
        st.write(SESSIONS, key, b"1")
    assert st.begin_checkpoint() == {b"s/a": b"1", b"s/b": b"1", b"s/c": b"1"}
    with pytest.raises(AssertionError):
        st.begin_checkpoint()  # one checkpoint at a time
    st.write(SESSIONS, "a", b"2")  # while the checkpoint is under way
    st.write(SESSIONS, "c", None)
    assert [st.get(SESSIONS, k) for k in "abc"] == [b"2", b"1", None]
    assert sorted(st.keys(SESSIONS)) == ["a", "b"]
    st.commit(changelog_offset=7)  # writes the checkpoint's values only
    assert st.pending == {b"s/a": b"2", b"s/c": None} and st.flushing == {}
    assert (st.db.get(b"s/a"), st.db.get(b"s/c"), st.changelog_offset) == (b"1", b"1", 7)
    assert (st.get(SESSIONS, "a"), st.get(SESSIONS, "c")) == (b"2", None)
    st.begin_checkpoint()
    st.discard_pending()  # a lost partition forgets both layers
    assert st.get(SESSIONS, "a") == b"1" and st.get(SESSIONS, "c") == b"1"
    st.close()


def test_recovery_from_the_changelog_keeps_the_last_value_and_offset(tmp_path: Path) -> None:
    st = RocksDBPartition(tmp_path / "0", 0)
    n = st.recover([(b"s/u:a", b"1", 5), (b"u/u:a", b"x", 6), (b"s/u:a", None, 7)])
    assert n == 3 and st.get(SESSIONS, "u:a") is None and st.get(USERS, "u:a") == b"x"
    assert st.changelog_offset == 7
    assert st.recover([]) == 0 and st.changelog_offset == 7
    st.close()


def _session(key: str) -> SessionState:
    return SessionState(key, np.zeros(2, np.float32), "v")


def test_the_store_writes_each_key_into_its_own_partition_only(parts) -> None:
    store = StateStore(parts)
    s1, s2 = _session("k1"), _session("k2")
    store.put_session("k1", s1, 1)
    store.put_session("k2", s2, 2)
    assert parts[1].pending == {b"s/k1": s1.to_bytes()}
    assert parts[2].pending == {b"s/k2": s2.to_bytes()} and parts[0].pending == {}
    # a key is read from the partition it is asked in, never looked for elsewhere
    got = store.get_session("k2", 2)
    assert got is not None and got.same_as(s2) and store.get_session("k2", 1) is None
    assert store.has_session("k2", 2) and not store.has_session("k2", 1)
    store.delete_session("k2", 2)
    assert not store.has_session("k2", 2)
    assert parts[2].pending == {b"s/k2": None}
    store.delete_session("k9", 0)  # nothing to delete: no tombstone
    assert parts[0].pending == {}
    # a write whose partition is not assigned is dropped and counted, never misplaced
    store.put_user("lost", UserState("lost", np.zeros(2, np.float32), "v"), 7)
    assert store.dropped == 1
    assert all(b"u/lost" not in s.pending for s in parts.values())
    with pytest.raises(ValueError, match="partition"):
        store.get_session("k1")  # a store of several partitions: always say which


def test_iteration_covers_every_partition_and_table_prefix(parts) -> None:
    parts[0].write(SESSIONS, "a", b"1")
    parts[0].begin_checkpoint()
    parts[0].commit(None)
    parts[2].write(SESSIONS, "b", b"2")
    parts[2].write(USERS, "b", b"3")
    store = StateStore(parts)
    assert sorted(store.sessions) == ["a", "b"]
    assert store.sessions["b"] == b"2" and "a" in store.sessions
    assert list(store.users) == ["b"]
    assert len(store.users) == 1


def test_core_over_partition_states_equals_the_in_memory_twin(parts) -> None:
    model = tiny_serving_model(n_items=20)
    values = [click(f"s{j % 4}", f"i{(3 * j) % 20}") for j in range(40)]
    records = []
    from streamrec.serving.records import Record

    partition_of = {f"s{j}": j % 3 for j in range(4)}
    for off, v in enumerate(values):
        key = f"s{off % 4}"
        records.append(Record(v, key.encode(), "c", partition_of[key], off))
    twin = StateStore()
    store = StateStore(parts)
    for i in range(0, 40, 8):
        batch = records[i : i + 8]
        want = process_batch(batch, twin, model, CoreConfig())
        got = process_batch(batch, store, model, CoreConfig())
        assert store.dropped == 0
        assert [r.items for r in got.recommendations] == [r.items for r in want.recommendations]
        if i == 16:  # a checkpoint in the middle changes nothing
            for s in parts.values():
                s.begin_checkpoint()
                s.commit(None)
    got_states = dict(store.iter_sessions())
    assert got_states.keys() == dict(twin.iter_sessions()).keys()
    for k, s in twin.iter_sessions():
        assert got_states[k].same_as(s)
    # each state lies in the partition of its key's records, and only there
    for key, p in partition_of.items():
        assert [q for q in parts if parts[q].get(SESSIONS, "a:" + key)] == [p]


def test_a_database_of_the_old_key_layout_is_refused_with_a_clear_message(
    tmp_path: Path,
) -> None:
    st = RocksDBPartition(tmp_path / "0", 0)  # a new database is marked with the layout
    st.close()
    RocksDBPartition(tmp_path / "0", 0).close()  # and opens again
    # layout 1: keys without namespace, no layout marker
    from rocksdict import Options, Rdict

    db = Rdict(str(tmp_path / "old"), options=Options(raw_mode=True))
    db.put(b"s/alice", b"state")
    db.close()
    with pytest.raises(StateLayoutError, match=r"layout 1.*app_id"):
        RocksDBPartition(tmp_path / "old", 0)
    # a changelog of the old layout (and nothing else) is refused at the end of recovery,
    # nothing of it applied
    st = RocksDBPartition(tmp_path / "1", 1)
    assert st.recover([(b"s/alice", b"x", 0)]) == 0
    with pytest.raises(StateLayoutError, match=r"changelog record at offset 0 \(key b's/alice'\)"):
        st.tally.check_layout("changelog", st.held_state)
    assert st.get(SESSIONS, "alice") is None and st.changelog_offset == -1
    st.close()
    # one stray record (no key, another layout's key) among records of this layout is
    # skipped and counted, and recovery goes on (issue 19: it used to end every recovery)
    st = RocksDBPartition(tmp_path / "2", 1)
    assert st.recover([(b"s/a:x", b"x", 0), (None, b"x", 1), (b"s/bob", b"y", 2)]) == 1
    assert st.recover([(b"junk", b"z", 3), (b"u/u:y", b"w", 4)]) == 1
    st.tally.check_layout("changelog", st.held_state)  # not refused
    assert (st.tally.applied, st.tally.old_layout, st.tally.foreign) == (2, 1, 2)
    assert st.get(SESSIONS, "a:x") == b"x" and st.get(USERS, "u:y") == b"w"
    assert st.changelog_offset == 4
    # the skipped records are kept, bytes and all, for the dead-letter topic
    assert st.tally.to_dead_letter == [(None, b"x", 1), (b"s/bob", b"y", 2), (b"junk", b"z", 3)]
    st.close()
    # a flood of junk is counted whole, and only the first records are kept
    st = RocksDBPartition(tmp_path / "3", 1)
    flood = [(b"junk%d" % j, b"v", j) for j in range(DEAD_LETTERS_PER_RECOVERY + 50)]
    assert st.recover(flood) == 0
    assert st.tally.foreign == DEAD_LETTERS_PER_RECOVERY + 50
    assert st.tally.to_dead_letter == flood[:DEAD_LETTERS_PER_RECOVERY]
    st.close()


def test_last_activity_index_lists_idle_states_oldest_first_in_bounded_steps(
    tmp_path: Path,
) -> None:
    from streamrec.engines.native.store import BUCKET_SECONDS, INDEX_SESSIONS, INDEX_USERS

    st = RocksDBPartition(tmp_path / "0", 0)
    t0 = 1.7e9
    for j in range(1000):  # one state per 10 s
        s = SessionState(f"s{j}", np.zeros(4, np.float32), "v", last_time=t0 + 10 * j)
        st.write(SESSIONS, f"a:s{j}", s.to_bytes())
    st.write(USERS, "u:x", UserState("x", np.zeros(2, np.float32), "v", last_time=t0).to_bytes())
    st.begin_checkpoint()
    st.commit(0)
    # nothing idle before the first bucket ends
    assert st.idle_candidates(INDEX_SESSIONS, t0, 100) == ([], False)
    cutoff = t0 + 3000  # states older than 3000 s: at most 300 of them, whole buckets only
    seen: list[str] = []
    steps = 0
    while True:
        keys, more = st.idle_candidates(INDEX_SESSIONS, cutoff, 64)
        assert len(keys) <= 64
        seen += keys
        steps += 1
        if not more:
            break
    assert steps >= 4 and len(seen) == len(set(seen))
    times = sorted(10 * int(k[3:]) for k in seen)
    assert times == [10 * j for j in range(len(seen))]  # oldest first, none skipped
    assert cutoff - BUCKET_SECONDS - 10 <= t0 + times[-1] < cutoff
    # examined entries are dropped with the next checkpoint; a state written since (here
    # s0, active again) keeps an entry of its own and is listed when it is idle again
    again = SessionState("s0", np.zeros(4, np.float32), "v", last_time=t0 + 20_000)
    st.write(SESSIONS, "a:s0", again.to_bytes())
    st.begin_checkpoint()
    st.commit(1)
    assert st.idle_candidates(INDEX_SESSIONS, cutoff, 1000) == ([], False)
    keys, _ = st.idle_candidates(INDEX_SESSIONS, t0 + 30_000, 2000)
    assert "a:s0" in keys and len(keys) == 1000 - len(seen) + 1
    assert st.idle_candidates(INDEX_USERS, t0 + 120, 10) == (["u:x"], False)
    st.close()
    # recovery from the changelog rebuilds the index
    st2 = RocksDBPartition(tmp_path / "r", 0)
    st2.recover([(b"s/a:s0", again.to_bytes(), 0)])
    assert st2.idle_candidates(INDEX_SESSIONS, t0 + 30_000, 10) == (["a:s0"], False)
    st2.close()


def test_native_sweep_steps_are_bounded_and_cost_what_expires(tmp_path: Path) -> None:
    import time as _time

    from streamrec.engines.native.sweep import SWEEP_MIN_KEYS
    from streamrec.engines.native.worker import NativeWorker
    from streamrec.serving.clock import StreamClock
    from streamrec.serving.served_model import ModelHolder
    from streamrec.settings import load_settings

    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:9", "broker": "embedded"},
        state={"directory": str(tmp_path), "session_gap_seconds": 100.0},
    )
    model = tiny_serving_model(user_dim=4)
    worker = NativeWorker(settings, ModelHolder(model))
    try:
        st = RocksDBPartition(tmp_path / "p0", 0)
        worker.partitions[0] = st
        wall = _time.time()
        h = np.zeros(16, np.float32)
        for j in range(3000):  # 3000 idle sessions of users, 2000 live anonymous ones
            s = SessionState("s", h, "v1", f"user{j}", ["i1"], 0, j, wall - 1000, wall - 1000, 1)
            st.write(SESSIONS, f"u:user{j}", s.to_bytes())
        for j in range(2000):
            s = SessionState(f"a{j}", h, "v1", None, ["i2"], 0, 5000 + j, wall - 5, wall - 5, 1)
            st.write(SESSIONS, f"a:a{j}", s.to_bytes())
        old = UserState("old", np.zeros(4, np.float32), "v1", [["i1"]], 0, 1, wall - 10**8)
        st.write(USERS, "u:old", old.to_bytes())
        st.begin_checkpoint()
        st.commit(0)
        worker.clock = StreamClock(min_keys=1)
        worker.clock.observe(wall, 0, wall)
        steps = 0
        # a zero budget: each step does one chunk of keys and stops (deterministic, unlike a
        # time budget, which a fast machine can finish in one step)
        while worker.sweep(budget_s=0.0):
            steps += 1
            assert steps < 2000
        # bounded: one chunk of at most SWEEP_MIN_KEYS keys per step when no budget is left
        assert steps + 1 >= 3000 // SWEEP_MIN_KEYS  # calls: the last one returned False
        left = dict(StateStore(worker.partitions).iter_sessions())
        assert set(left) == {f"a:a{j}" for j in range(2000)}
        users = StateStore(worker.partitions).users
        assert "u:user7" in users and "u:old" not in users
        assert UserState.from_bytes(users["u:user7"]).sessions == [["i1"]]
    finally:
        for part in worker.partitions.values():
            part.close()
        worker.partitions.clear()


def test_native_sweep_step_fits_its_budget_when_keys_are_slow_and_partitions_take_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step sizes its chunks to the budget left at the measured cost per key: with session
    ends of >= 2 ms a key and a 20 ms budget, no step ends more than 10 + SWEEP_MIN_KEYS
    sessions (a fixed chunk of 128 keys made one step take 128 x 2 ms); and two partitions
    with much to expire are both worked on from the first steps."""
    import time as _time

    from streamrec.engines.native import sweep as native_sweep
    from streamrec.engines.native.worker import NativeWorker
    from streamrec.serving.clock import StreamClock
    from streamrec.serving.served_model import ModelHolder
    from streamrec.settings import load_settings

    real = native_sweep.end_idle_sessions
    per_key = 0.002

    def slow_end_idle_sessions(store: Any, partition: int, keys: Any, *a: Any) -> int:
        keys = list(keys)
        _time.sleep(per_key * len(keys))
        return real(store, partition, keys, *a)

    monkeypatch.setattr(native_sweep, "end_idle_sessions", slow_end_idle_sessions)
    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:9", "broker": "embedded"},
        state={"directory": str(tmp_path), "session_gap_seconds": 100.0},
    )
    worker = NativeWorker(settings, ModelHolder(tiny_serving_model(user_dim=4)))
    try:
        wall = _time.time()
        h = np.zeros(16, np.float32)
        worker.clock = StreamClock(min_keys=1)
        for p in (0, 1):
            st = RocksDBPartition(tmp_path / f"p{p}", p)
            worker.partitions[p] = st
            for j in range(150):
                s = SessionState(f"a{p}-{j}", h, "v1", None, ["i1"], p, j, wall - 1000, wall, 1)
                st.write(SESSIONS, f"a:a{p}-{j}", s.to_bytes())
            st.begin_checkpoint()
            st.commit(0)
            worker.clock.observe(wall, p, wall)
        sessions = StateStore(worker.partitions).sessions

        def left(p: int) -> int:
            return sum(1 for k in sessions if k.startswith(f"a:a{p}-"))

        budget = 10 * per_key
        per_step: list[int] = []
        more = True
        while more:
            before = left(0) + left(1)
            more = worker.sweep(budget_s=budget)
            per_step.append(before - left(0) - left(1))
            if len(per_step) == 2:
                assert left(0) < 150 and left(1) < 150  # both partitions had a turn
            assert len(per_step) < 300
        assert left(0) == left(1) == 0
        assert 0 < max(per_step) <= int(budget / per_key) + native_sweep.SWEEP_MIN_KEYS, per_step
    finally:
        for part in worker.partitions.values():
            part.close()
        worker.partitions.clear()


def test_native_reload_loads_in_the_background_and_swaps_between_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading and validating a checkpoint takes seconds; the poll loop must not wait for it:
    ``reload`` starts the load in the loader thread and returns at once, and a later call
    swaps the loaded model in (before, the loop was held for the whole load: ~3 s of no
    answers after each swap in bench/results/reencode-serving.md)."""
    import threading
    import time as _time

    from streamrec.engines.native.worker import NativeWorker
    from streamrec.serving.served_model import ModelHolder
    from streamrec.settings import load_settings

    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:9", "broker": "embedded"},
        state={"directory": str(tmp_path)},
    )
    holder = ModelHolder(tiny_serving_model())
    worker = NativeWorker(settings, holder)
    new = tiny_serving_model()
    new.version = "v-next"
    release = threading.Event()

    def slow_prepare() -> object:
        release.wait(10)  # a load that takes as long as the test wants
        return new

    monkeypatch.setattr(holder, "prepare_reload", slow_prepare)
    try:
        t = _time.monotonic()
        worker.reload()
        assert _time.monotonic() - t < 1.0
        worker.reload()  # still loading: nothing changes, nothing waits
        assert holder.current is not new and _time.monotonic() - t < 1.0
        release.set()
        deadline = _time.monotonic() + 10
        while holder.current is not new and _time.monotonic() < deadline:
            worker.reload()
            _time.sleep(0.01)
        assert holder.current is new
        assert worker.metrics.model_swaps._value.get() == 1
    finally:
        release.set()
        worker.close()


@pytest.mark.parametrize("kind", ["memory", "rocksdb"])
def test_both_checkpointed_partitions_give_the_same_changelog_and_recover_alike(
    kind: str, tmp_path: Path
) -> None:
    """The in-memory twin and the RocksDB partition, through the one interface: the same
    writes give the same changelog records, and a fresh partition recovered from them holds
    the same states (old-layout keys refused)."""

    def fresh(name: str) -> CheckpointedPartition:
        return MemoryPartition() if kind == "memory" else RocksDBPartition(tmp_path / name, 0)

    part = fresh("a")
    part.write(SESSIONS, "a:s1", b"x1")
    part.write(SESSIONS, "a:s2", b"x2")
    part.write(USERS, "u:u1", b"y1")
    part.write(SESSIONS, "a:s1", None)  # written then deleted before the checkpoint
    frozen = dict(part.begin_checkpoint())
    assert frozen == {b"s/a:s1": None, b"s/a:s2": b"x2", b"u/u:u1": b"y1"}
    part.commit(2)
    assert part.changelog_offset == 2 and dict(part.begin_checkpoint()) == {}
    assert sorted(part.keys(SESSIONS)) == ["a:s2"] and list(part.keys(USERS)) == ["u:u1"]
    copy = fresh("b")
    records = [(k, v, off) for off, (k, v) in enumerate(frozen.items())]
    assert copy.recover(records) == 3 and copy.changelog_offset == 2
    for table, key in ((SESSIONS, "a:s1"), (SESSIONS, "a:s2"), (USERS, "u:u1")):
        assert copy.get(table, key) == part.get(table, key)
    # a record of another layout is skipped (a copy that holds state of this layout was
    # written by this streamrec: the record is a stray, not an old store)
    assert copy.recover([(b"s/alice", b"x", 3)]) == 0 and copy.tally.old_layout == 1
    copy.tally.check_layout("changelog", had_state=False)
    assert copy.changelog_offset == 2
    part.close()
    copy.close()
