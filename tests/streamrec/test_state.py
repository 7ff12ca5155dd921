"""Binary state encoding and the StateStore over the in-memory twin."""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.serving.state import SessionState, StateDecodeError, UserState
from streamrec.serving.state_store import SESSIONS, StateStore


def test_session_roundtrip_is_compact() -> None:
    h = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    s = SessionState("sess-1", h, "v3", "user-ü", ["a", "b", "ccc"], 3, 12345678901, 1.5, 1.0, 7, 1)
    raw = s.to_bytes()
    assert len(raw) < 4 * 100 + 100  # float32 bytes plus a small header
    back = SessionState.from_bytes(raw)
    assert back.same_as(s, atol=0)
    assert back.hidden.dtype == np.float32 and back.user_id == "user-ü"


def test_session_without_user_and_empty_state() -> None:
    s = SessionState("s", np.zeros(0, np.float32), "v")
    back = SessionState.from_bytes(s.to_bytes())
    assert back.user_id is None and back.hidden.size == 0 and back.offset == -1


def test_recent_items_bounded() -> None:
    s = SessionState("s", np.zeros(4, np.float32), "v")
    for i in range(10):
        s.push_item(str(i), limit=3)
    assert s.recent_items == ["7", "8", "9"]


def test_user_roundtrip_and_bounded_sessions() -> None:
    u = UserState("u", np.arange(8, dtype=np.float32), "v1", partition=1, offset=9, last_time=2.0)
    for i in range(5):
        u.push_session([f"x{i}", f"y{i}"], limit=2)
    back = UserState.from_bytes(u.to_bytes())
    assert back.sessions == [["x3", "y3"], ["x4", "y4"]]
    assert np.array_equal(back.context, u.context)
    assert (back.partition, back.offset, back.version) == (1, 9, "v1")


@pytest.mark.parametrize("raw", [b"", b"xx", b"S1" + b"\0" * 3, b"U1garbage"])
def test_corrupt_bytes_raise_decode_error(raw: bytes) -> None:
    with pytest.raises(StateDecodeError):
        SessionState.from_bytes(raw)


def test_store_treats_corrupt_as_absent() -> None:
    store = StateStore()
    twin = store.partition(0)  # the in-memory twin holds every partition
    assert twin is not None
    twin.write(SESSIONS, "k", b"junk")
    assert store.get_session("k") is None and store.corrupt == 1
    s = SessionState("s", np.ones(3, np.float32), "v")
    store.put_session("k", s)
    got, users = store.get_many(["k", "missing"])
    assert list(got) == ["k"] and users == {}
    store.delete_session("k")
    store.delete_session("k")
    assert "k" not in store.sessions
