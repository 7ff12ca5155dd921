"""The native worker's partition states (streamrec.engines.native.store), without Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.engines.native.store import (
    SESSIONS,
    USERS,
    PartitionState,
    StateLayoutError,
    TableView,
)
from streamrec.serving.pipeline import CoreConfig, message_key_partitions, process_batch
from streamrec.serving.state import StateStore
from streamrec.testing import click, tiny_serving_model


@pytest.fixture
def parts(tmp_path: Path):
    states = {p: PartitionState(tmp_path / str(p), p) for p in range(3)}
    yield states
    for s in states.values():
        s.close()


def test_pending_is_read_first_and_durable_only_after_commit(tmp_path: Path) -> None:
    st = PartitionState(tmp_path / "0", 0)
    st.pending[b"s/a"] = b"1"
    assert st.get(b"s/a") == b"1"
    st.close()
    st = PartitionState(tmp_path / "0", 0)  # reopened: the uncommitted write is gone
    assert st.get(b"s/a") is None and st.changelog_offset == -1
    st.pending[b"s/a"] = b"1"
    st.pending[b"s/b"] = b"2"
    st.begin_checkpoint()
    st.commit(changelog_offset=41)
    st.pending[b"s/b"] = None  # a pending delete hides the durable value
    assert st.get(b"s/b") is None
    assert sorted(st.keys(SESSIONS)) == [b"s/a"]
    st.close()
    st = PartitionState(tmp_path / "0", 0)
    assert (st.get(b"s/a"), st.get(b"s/b"), st.changelog_offset) == (b"1", b"2", 41)
    st.close()


def test_writes_during_a_checkpoint_stay_pending_and_win(tmp_path: Path) -> None:
    st = PartitionState(tmp_path / "0", 0)
    st.pending.update({b"s/a": b"1", b"s/b": b"1", b"s/c": b"1"})
    assert st.begin_checkpoint() == {b"s/a": b"1", b"s/b": b"1", b"s/c": b"1"}
    with pytest.raises(AssertionError):
        st.begin_checkpoint()  # one checkpoint at a time
    st.pending.update({b"s/a": b"2", b"s/c": None})  # while the checkpoint is under way
    assert (st.get(b"s/a"), st.get(b"s/b"), st.get(b"s/c")) == (b"2", b"1", None)
    assert sorted(st.keys(SESSIONS)) == [b"s/a", b"s/b"]
    st.commit(changelog_offset=7)  # writes the checkpoint's values only
    assert st.pending == {b"s/a": b"2", b"s/c": None} and st.flushing == {}
    assert (st.db.get(b"s/a"), st.db.get(b"s/c"), st.changelog_offset) == (b"1", b"1", 7)
    assert (st.get(b"s/a"), st.get(b"s/c")) == (b"2", None)
    st.begin_checkpoint()
    st.discard_pending()  # a lost partition forgets both layers
    assert st.get(b"s/a") == b"1" and st.get(b"s/c") == b"1"
    st.close()


def test_apply_changelog_keeps_the_last_value_and_offset(tmp_path: Path) -> None:
    st = PartitionState(tmp_path / "0", 0)
    n = st.apply_changelog([(b"s/u:a", b"1", 5), (b"u/u:a", b"x", 6), (b"s/u:a", None, 7)])
    assert n == 3 and st.get(b"s/u:a") is None and st.get(b"u/u:a") == b"x"
    assert st.changelog_offset == 7
    assert st.apply_changelog([]) == 0 and st.changelog_offset == 7
    st.close()


def test_table_view_routes_writes_to_the_partition_of_the_key(parts) -> None:
    where = {"k1": 1}
    view = TableView(parts, SESSIONS, where)
    view["k1"] = b"v1"
    view["k2"] = b"v2"  # partition learnt only from the batch result
    assert view["k1"] == b"v1" and "k2" in view
    assert parts[1].pending == {} and parts[2].pending == {}  # buffered until routed
    dropped = view.route({"k2": 2, "k9": 0})
    assert dropped == 0
    assert parts[1].pending == {b"s/k1": b"v1"} and parts[2].pending == {b"s/k2": b"v2"}
    # a fresh view finds keys in whatever partition holds them, and remembers where
    where2: dict[str, int] = {}
    view2 = TableView(parts, SESSIONS, where2)
    assert view2["k2"] == b"v2" and where2 == {"k2": 2}
    del view2["k2"]
    assert "k2" not in view2
    view2.route({})
    assert parts[2].pending == {b"s/k2": None}
    # a write whose partition is not assigned is dropped and counted, never misplaced
    view3 = TableView(parts, USERS, {})
    view3["lost"] = b"x"
    assert view3.route({"lost": 7}) == 1
    assert all(b"u/lost" not in s.pending for s in parts.values())


def test_iteration_covers_every_partition_and_table_prefix(parts) -> None:
    parts[0].pending[b"s/a"] = b"1"
    parts[0].begin_checkpoint()
    parts[0].commit(None)
    parts[2].pending[b"s/b"] = b"2"
    parts[2].pending[b"u/b"] = b"3"
    where: dict[str, int] = {}
    assert sorted(TableView(parts, SESSIONS, where)) == ["a", "b"]
    assert where == {"a": 0, "b": 2}
    assert list(TableView(parts, USERS, {})) == ["b"]
    assert len(TableView(parts, USERS, {})) == 1


def test_core_over_partition_states_equals_the_in_memory_twin(parts) -> None:
    model = tiny_serving_model(n_items=20)
    values = [click(f"s{j % 4}", f"i{(3 * j) % 20}") for j in range(40)]
    records = []
    from streamrec.serving.pipeline import Record

    for off, v in enumerate(values):
        key = f"s{off % 4}"
        records.append(Record(v, key.encode(), "c", hash(key) % 3, off, 1000.0 + off))
    twin = StateStore()
    for i in range(0, 40, 8):
        batch = records[i : i + 8]
        want = process_batch(batch, twin, model, CoreConfig())
        where = message_key_partitions(batch)
        sessions, users = TableView(parts, SESSIONS, where), TableView(parts, USERS, where)
        got = process_batch(batch, StateStore(sessions, users), model, CoreConfig())
        assert sessions.route(got.key_partitions) == 0 and users.route(got.key_partitions) == 0
        assert [r["items"] for r in got.recommendations] == [
            r["items"] for r in want.recommendations
        ]
        if i == 16:  # a checkpoint in the middle changes nothing
            for s in parts.values():
                s.begin_checkpoint()
                s.commit(None)
    got_states = dict(StateStore(TableView(parts, SESSIONS, {}), {}).iter_sessions())
    assert got_states.keys() == dict(twin.iter_sessions()).keys()
    for k, s in twin.iter_sessions():
        assert got_states[k].same_as(s)


def test_a_database_of_the_old_key_layout_is_refused_with_a_clear_message(
    tmp_path: Path,
) -> None:
    st = PartitionState(tmp_path / "0", 0)  # a new database is marked with the layout
    st.close()
    PartitionState(tmp_path / "0", 0).close()  # and opens again
    # layout 1: keys without namespace, no layout marker
    from rocksdict import Options, Rdict

    db = Rdict(str(tmp_path / "old"), options=Options(raw_mode=True))
    db.put(b"s/alice", b"state")
    db.close()
    with pytest.raises(StateLayoutError, match=r"layout 1.*app_id"):
        PartitionState(tmp_path / "old", 0)
    # a changelog of the old layout is refused during recovery, before anything is applied
    st = PartitionState(tmp_path / "1", 1)
    with pytest.raises(StateLayoutError, match="changelog"):
        st.apply_changelog([(b"s/alice", b"x", 0)])
    assert st.get(b"s/alice") is None and st.changelog_offset == -1
    # so is a record without a key (no streamrec worker writes one)
    with pytest.raises(StateLayoutError, match=r"offset 1 \(key None\)"):
        st.apply_changelog([(b"s/a:x", b"x", 0), (None, b"x", 1)])
    assert st.get(b"s/a:x") is None and st.changelog_offset == -1
    st.close()


def test_last_activity_index_lists_idle_states_oldest_first_in_bounded_steps(
    tmp_path: Path,
) -> None:
    from streamrec.engines.native.store import BUCKET_SECONDS, INDEX_SESSIONS, INDEX_USERS
    from streamrec.serving.state import SessionState, UserState

    st = PartitionState(tmp_path / "0", 0)
    t0 = 1.7e9
    for j in range(1000):  # one state per 10 s
        s = SessionState(f"s{j}", np.zeros(4, np.float32), "v", last_time=t0 + 10 * j)
        st.pending[b"s/a:" + f"s{j}".encode()] = s.to_bytes()
    st.pending[b"u/u:x"] = UserState("x", np.zeros(2, np.float32), "v", last_time=t0).to_bytes()
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
    st.pending[b"s/a:s0"] = again.to_bytes()
    st.begin_checkpoint()
    st.commit(1)
    assert st.idle_candidates(INDEX_SESSIONS, cutoff, 1000) == ([], False)
    keys, _ = st.idle_candidates(INDEX_SESSIONS, t0 + 30_000, 2000)
    assert "a:s0" in keys and len(keys) == 1000 - len(seen) + 1
    assert st.idle_candidates(INDEX_USERS, t0 + 120, 10) == (["u:x"], False)
    st.close()
    # recovery from the changelog rebuilds the index
    st2 = PartitionState(tmp_path / "r", 0)
    st2.apply_changelog([(b"s/a:s0", again.to_bytes(), 0)])
    assert st2.idle_candidates(INDEX_SESSIONS, t0 + 30_000, 10) == (["a:s0"], False)
    st2.close()


def test_native_sweep_steps_are_bounded_and_cost_what_expires(tmp_path: Path) -> None:
    import time as _time

    from streamrec.engines.native.worker import SWEEP_MIN_KEYS, NativeWorker
    from streamrec.serving.pipeline import StreamClock
    from streamrec.serving.served_model import ModelHolder
    from streamrec.serving.state import SessionState, UserState
    from streamrec.settings import load_settings

    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:9"},
        state={"directory": str(tmp_path), "session_gap_seconds": 100.0},
    )
    model = tiny_serving_model(user_dim=4)
    worker = NativeWorker(settings, ModelHolder(model))
    try:
        st = PartitionState(tmp_path / "p0", 0)
        worker.partitions[0] = st
        wall = _time.time()
        h = np.zeros(16, np.float32)
        for j in range(3000):  # 3000 idle sessions of users, 2000 live anonymous ones
            s = SessionState("s", h, "v1", f"user{j}", ["i1"], 0, j, wall - 1000, wall - 1000, 1)
            st.pending[f"s/u:user{j}".encode()] = s.to_bytes()
        for j in range(2000):
            s = SessionState(f"a{j}", h, "v1", None, ["i2"], 0, 5000 + j, wall - 5, wall - 5, 1)
            st.pending[f"s/a:a{j}".encode()] = s.to_bytes()
        st.pending[b"u/u:old"] = UserState(
            "old", np.zeros(4, np.float32), "v1", [["i1"]], 0, 1, wall - 10**8
        ).to_bytes()
        st.begin_checkpoint()
        st.commit(0)
        worker.clock = StreamClock(min_events=1)
        worker.clock.observe(wall, 0, wall)
        steps = 0
        # a zero budget: each step does one chunk of keys and stops (deterministic, unlike a
        # time budget, which a fast machine can finish in one step)
        while worker.sweep(budget_s=0.0):
            steps += 1
            assert steps < 2000
        # bounded: one chunk of at most SWEEP_MIN_KEYS keys per step when no budget is left
        assert steps + 1 >= 3000 // SWEEP_MIN_KEYS  # calls: the last one returned False
        left = dict(StateStore(TableView(worker.partitions, SESSIONS, {}), {}).iter_sessions())
        assert set(left) == {f"a:a{j}" for j in range(2000)}
        users = TableView(worker.partitions, USERS, {})
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

    from streamrec.engines.native import worker as native
    from streamrec.serving.pipeline import StreamClock
    from streamrec.serving.served_model import ModelHolder
    from streamrec.serving.state import SessionState
    from streamrec.settings import load_settings

    real = native.sweep_idle
    per_key = 0.002

    def slow_sweep_idle(store: Any, model: Any, config: Any, **kw: Any) -> Any:
        keys = list(kw.pop("keys"))
        _time.sleep(per_key * len(keys))
        return real(store, model, config, keys=keys, **kw)

    monkeypatch.setattr(native, "sweep_idle", slow_sweep_idle)
    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:9"},
        state={"directory": str(tmp_path), "session_gap_seconds": 100.0},
    )
    worker = native.NativeWorker(settings, ModelHolder(tiny_serving_model(user_dim=4)))
    try:
        wall = _time.time()
        h = np.zeros(16, np.float32)
        worker.clock = StreamClock(min_events=1)
        for p in (0, 1):
            st = PartitionState(tmp_path / f"p{p}", p)
            worker.partitions[p] = st
            for j in range(150):
                s = SessionState(f"a{p}-{j}", h, "v1", None, ["i1"], p, j, wall - 1000, wall, 1)
                st.pending[f"s/a:a{p}-{j}".encode()] = s.to_bytes()
            st.begin_checkpoint()
            st.commit(0)
            worker.clock.observe(wall, p, wall)
        sessions = TableView(worker.partitions, SESSIONS, {})

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
        assert 0 < max(per_step) <= int(budget / per_key) + native.SWEEP_MIN_KEYS, per_step
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
        kafka={"bootstrap_servers": "127.0.0.1:9"}, state={"directory": str(tmp_path)}
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
