"""The Faust engine's last-activity index (streamrec.engines.faust.idle), without Kafka."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rocksdict import Options, Rdict

from streamrec.engines.faust.idle import BUCKET_SECONDS, IdleIndex, indexed_time
from streamrec.serving.state import SessionState, UserState

T0 = 1.7e9


def session(t: float) -> bytes:
    return SessionState("s", np.zeros(4, np.float32), "v", last_time=t).to_bytes()


def test_indexed_time_reads_both_state_encodings() -> None:
    assert indexed_time(session(T0 + 1.5)) == T0 + 1.5
    user = UserState("u", np.zeros(2, np.float32), "v", [["i1"]], 0, 1, T0 + 7).to_bytes()
    assert indexed_time(user) == T0 + 7
    assert indexed_time(b"short") is None


def test_index_lists_idle_keys_oldest_first_in_bounded_chunks_and_follows_writes() -> None:
    idx = IdleIndex()
    for j in range(300):  # one key per 10 s, in partition 0; a few in partition 1
        idx.note(0, f"a:s{j}", T0 + 10 * j)
    idx.note(1, "a:other", T0)
    assert len(idx) == 301
    # nothing idle before the first bucket ends
    assert idx.idle(0, T0, 100) == ([], False)
    # s0 active again (moves to a later bucket), s1 deleted: neither is listed as idle
    idx.note(0, "a:s0", T0 + 5000)
    idx.forget("a:s1", 0)
    assert len(idx) == 300
    cutoff = T0 + 1200  # whole buckets that ended by then: keys up to 1200 - 60 s
    seen: list[str] = []
    while True:
        keys, more = idx.idle(0, cutoff, 16)
        assert len(keys) <= 16
        seen += keys
        if not more:
            break
    times = sorted(10 * int(k[3:]) for k in seen)
    assert "a:s0" not in seen and "a:s1" not in seen
    assert times == [10 * j for j in range(2, len(seen) + 2)]  # oldest first, none skipped
    assert cutoff - BUCKET_SECONDS - 10 <= T0 + times[-1] < cutoff
    # listed keys left the index; the rest (and other partitions) stay
    assert idx.idle(0, cutoff, 1000) == ([], False)
    assert len(idx) == 300 - len(seen)
    keys, more = idx.idle(0, T0 + 10_000, 1000)
    assert "a:s0" in keys and not more and len(keys) == 300 - len(seen) - 1
    assert idx.idle(1, T0 + 120, 10) == (["a:other"], False)


def test_index_is_seeded_from_a_faust_rocksdb_in_bounded_steps(tmp_path: Path) -> None:
    """After a rebalance the states already in the local databases (restored from the
    changelog, written before a restart) are read into the index; keys noted since the reset
    keep their (newer) entry; Faust's offset key and values that are not states are passed
    over."""
    db = Rdict(str(tmp_path / "p0"), options=Options(raw_mode=True))
    for j in range(50):
        db[json.dumps(f"a:s{j}").encode()] = session(T0 + j)
    db[b"__faust\x00offset__"] = b"1234"
    db[json.dumps("a:junk").encode()] = b"x"
    idx = IdleIndex()
    idx.note(0, "a:stale", T0)  # from before the rebalance: dropped by the reset
    idx.reset([0, 1])  # partition 1 has no open database: nothing to read
    idx.note(0, "a:s7", T0 + 9000)  # written since the reset: newer than the database
    reads = []
    while idx.seeding:
        reads.append(idx.seed({0: db}, lambda k: json.loads(k), 20, (b"__faust\x00offset__",)))
    assert reads[:2] == [20, 20] and sum(reads) == 52 and all(r <= 20 for r in reads)
    assert idx.seeded(0) and idx.seeded(1)
    keys, more = idx.idle(0, T0 + 3600, 1000)
    assert sorted(keys) == sorted(f"a:s{j}" for j in range(50) if j != 7) and not more
    assert idx.idle(0, T0 + 9999, 10) == (["a:s7"], False)
    db.close()
