"""The hostile-input corpus (issue 13): each case is sent between two good clicks of a victim
user and must (a) have its expected outcome (a named dead letter, accepted, or answered as a
duplicate), (b) leave the two good clicks' answers exactly as without it, and (c) end no
other key's session in the next sweep.

The same corpus (:data:`CASES`) is used by the broker test in test_hostile_broker.py.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.events import REASONS
from streamrec.serving.expiry import sweep_idle
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Recommendation, Record
from streamrec.serving.state_store import StateStore
from streamrec.testing import tiny_serving_model

WALL = time.time()
CFG = CoreConfig(
    session_gap_seconds=1800.0, recent_items=50, recent_sessions=10, top_k=5, require_key=True
)
VICTIM = "alice"


def ev(**fields: Any) -> bytes:
    """A click body: session "h", item "i3", now, unless overridden (None removes a field)."""
    d: dict[str, Any] = {"session_id": "h", "item_id": "i3", "timestamp": WALL - 2}
    d.update(fields)
    return json.dumps({k: v for k, v in d.items() if v is not None}).encode()


def raw_ev(body: str) -> bytes:
    return body.encode()


def T(literal: str) -> bytes:
    """A click body whose timestamp is the raw JSON ``literal``."""
    return b'{"session_id": "h", "item_id": "i3", "timestamp": ' + literal.encode() + b"}"


@dataclass(frozen=True)
class Case:
    name: str
    value: bytes | None
    expect: str  # "dead:<reason>", "ok", "dup", "unknown"
    key: bytes | None = b"h"
    create_time: float | None = None


C = Case
TOR = "dead:timestamp_out_of_range"
BIG = "x" * 256
ISO = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(WALL - 2))
V = VICTIM.encode()
EMOJI = "s\U0001f600".encode()
CASES: list[Case] = [
    # ---- not a message at all
    C("none", None, "dead:empty"),
    C("empty", b"", "dead:empty"),
    C("spaces", b"   \n\t ", "dead:empty"),
    C("oversized", b'{"session_id": "h", "pad": "' + b"x" * 20_000 + b'"}', "dead:oversized"),
    C("one megabyte", b"x" * 1_000_000, "dead:oversized"),
    C("16385 bytes", ev(pad="x" * (16_385 - len(ev(pad="")))), "dead:oversized"),
    C("16384 bytes", ev(pad="x" * (16_384 - len(ev(pad="")))), "ok"),
    # ---- not JSON
    C("broken json", b"{oops", "dead:unparseable"),
    C("invalid utf-8", b"\xff\xfe\xfa", "dead:unparseable"),
    C("gzip", gzip.compress(ev()), "dead:unparseable"),
    C("binary", bytes(range(256)), "dead:unparseable"),
    C("trailing garbage", ev() + b" x", "dead:unparseable"),
    C("two objects", ev() + ev(), "dead:unparseable"),
    C("comment", b'{"session_id": "h" /* c */}', "dead:unparseable"),
    C("single quotes", b"{'session_id': 'h', 'item_id': 'i3'}", "dead:unparseable"),
    C("deep nesting", b"[" * 5000 + b"]" * 5000, "dead:unparseable"),
    C("deep object", b'{"a":' * 2000 + b"1" + b"}" * 2000, "dead:unparseable"),
    C("bare NaN", b"NaN", "dead:not_an_object"),
    # ---- JSON, not an object
    C("array", b'[{"session_id": "h", "item_id": "i3"}]', "dead:not_an_object"),
    C("string", b'"session_id"', "dead:not_an_object"),
    C("number", b"42", "dead:not_an_object"),
    C("null", b"null", "dead:not_an_object"),
    C("true", b"true", "dead:not_an_object"),
    # ---- an object, not a click
    C("empty object", b"{}", "dead:invalid"),
    C("session id int", ev(session_id=1), "dead:invalid"),
    C("session id empty", ev(session_id=""), "dead:invalid"),
    C("session id 257", ev(session_id="s" * 257), "dead:invalid", key=b"s" * 257),
    C("session id object", ev(session_id={"a": 1}), "dead:invalid"),
    C("session id list", ev(session_id=["h"]), "dead:invalid"),
    C("session id null", ev(session_id=None), "dead:invalid"),
    C("item missing", ev(item_id=None), "dead:invalid"),
    C("item int", ev(item_id=3), "dead:invalid"),
    C("item list", ev(item_id=["i3"]), "dead:invalid"),
    C("item empty", ev(item_id=""), "dead:invalid"),
    C("item 257", ev(item_id="i" * 257), "dead:invalid"),
    C("user int", ev(user_id=7), "dead:invalid", key=b"7"),
    C("user empty", ev(user_id=""), "dead:invalid", key=b""),
    C("user 300", ev(user_id="u" * 300), "dead:invalid", key=b"u" * 300),
    C("type purchase", ev(type="purchase"), "dead:invalid"),
    C("type int", ev(type=1), "dead:invalid"),
    C("event id empty", ev(event_id=""), "dead:invalid"),
    C("event id object", ev(event_id={"x": 1}), "dead:invalid"),
    C("event id 257", ev(event_id="e" * 257), "dead:invalid"),
    C("lone surrogate id", raw_ev('{"session_id": "h\\ud800", "item_id": "i3"}'), "dead:invalid"),
    C("surrogate item", raw_ev('{"session_id": "h", "item_id": "\\udfff"}'), "dead:invalid"),
    C("timestamp bool", ev(timestamp=True), "dead:invalid"),
    C("timestamp word", ev(timestamp="yesterday"), "dead:invalid"),
    C("timestamp object", ev(timestamp={"s": 1}), "dead:invalid"),
    C("timestamp list", ev(timestamp=[1]), "dead:invalid"),
    C("timestamp empty string", ev(timestamp=""), "dead:invalid"),
    C("timestamp bad iso", ev(timestamp="2024-13-45T99:00:00"), "dead:invalid"),
    C("timestamp 65 chars", ev(timestamp="1" * 65), "dead:invalid"),
    # ---- times out of range (decode: absolute bounds; core: the partition's clock)
    C("timestamp 12", ev(timestamp=12), TOR),
    C("timestamp negative", ev(timestamp=-1), TOR),
    C("timestamp tiny", ev(timestamp=1e-300), TOR),
    C(
        "timestamp NaN",
        T("NaN"),
        TOR,
    ),
    C(
        "timestamp Infinity",
        T("Infinity"),
        TOR,
    ),
    C(
        "timestamp -Infinity",
        T("-Infinity"),
        TOR,
    ),
    C(
        "timestamp 1e400",
        T("1e400"),
        TOR,
    ),
    C(
        "timestamp 1 and 400 zeros",
        T("1" + "0" * 400),
        TOR,
    ),
    C("timestamp 9e15", ev(timestamp=9e15), TOR),
    C("timestamp string inf", ev(timestamp=" 1e400 "), TOR),
    C("timestamp string nan", ev(timestamp="NaN"), TOR),
    C("timestamp string -inf", ev(timestamp="-inf"), TOR),
    C("timestamp year 2286", ev(timestamp="2286-01-01T00:00:00Z"), TOR),
    C("timestamp 23 h ahead", ev(timestamp=WALL + 23 * 3600), TOR),
    C("timestamp 2 h ahead", ev(timestamp=WALL + 2 * 3600), TOR),
    C(
        "timestamp 10 years old",
        ev(timestamp=WALL - 10 * 365 * 86400),
        TOR,
    ),
    C("timestamp 40 days old", ev(timestamp=WALL - 40 * 86400), TOR),
    C("timestamp 2023 string", ev(timestamp="1700000000"), TOR),
    C("createtime 2286", ev(timestamp=None), TOR, create_time=1e10),
    C(
        "createtime 3 h ahead",
        ev(timestamp=None),
        TOR,
        create_time=WALL + 3 * 3600,
    ),
    C(
        "createtime 5 years old",
        ev(timestamp=None),
        TOR,
        create_time=WALL - 5 * 365 * 86400,
    ),
    # ---- keys that do not match the body
    C("keyed by another user", ev(user_id=VICTIM), "dead:key_mismatch", key=b"mallory"),
    C("victim's key, other user", ev(user_id="mallory"), "dead:key_mismatch", key=VICTIM.encode()),
    C("anonymous keyed by a user", ev(session_id="anon"), "dead:key_mismatch", key=VICTIM.encode()),
    C("user keyed by session", ev(user_id=VICTIM, session_id="s9"), "dead:key_mismatch", key=b"s9"),
    C("no key", ev(), "dead:key_mismatch", key=None),
    C("key not utf-8", ev(), "dead:key_mismatch", key=b"\xff\xfe"),
    C("key case differs", ev(user_id="Alice"), "dead:key_mismatch", key=VICTIM.encode()),
    C("key trailing space", ev(user_id=VICTIM), "dead:key_mismatch", key=b"alice "),
    C("key empty", ev(), "dead:key_mismatch", key=b""),
    # ---- valid, and must not disturb the victim or anyone else
    C("plain click", ev(), "ok"),
    C("unknown item", ev(item_id="never-seen"), "unknown"),
    C("unknown long item", ev(item_id=BIG), "unknown"),
    C("31 min fast", ev(timestamp=WALL + 31 * 60), "ok"),
    C("29 days old", ev(timestamp=WALL - 29 * 86400), "ok"),
    C("no timestamp", ev(timestamp=None), "ok"),
    C("createtime now", ev(timestamp=None), "ok", create_time=WALL - 1),
    C("createtime zero", ev(timestamp=None), "ok", create_time=0.0),
    C(
        "iso with offset",
        ev(timestamp=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(WALL - 2))),
        "ok",
    ),
    C("naive iso", ev(timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(WALL - 2))), "ok"),
    C("numeric string time", ev(timestamp=str(WALL - 2)), "ok"),
    C("anonymous with the victim's id", ev(session_id=VICTIM), "ok", key=VICTIM.encode()),
    C("anonymous u: prefix", ev(session_id="u:" + VICTIM), "ok", key=("u:" + VICTIM).encode()),
    C("user a: prefix", ev(user_id="a:x"), "ok", key=b"a:x"),
    C(
        "session end, other session of the victim",
        ev(user_id=VICTIM, session_id="zzz", type="session_end", item_id=None),
        "ok",
        key=VICTIM.encode(),
    ),
    C("session end of another key", ev(type="session_end", item_id=None), "ok"),
    C("session end with item", ev(type="session_end"), "ok"),
    C(
        "victim's event id again",
        ev(user_id=VICTIM, session_id="a2", item_id="i1", event_id="g1"),
        "dup",
        key=VICTIM.encode(),
    ),
    C("victim's event id, other key", ev(event_id="g1"), "ok"),
    C("extra fields", ev(extra={"deep": [1, 2, 3]}, __proto__={"x": 1}), "ok"),
    C("duplicate json keys", b'{"session_id": "zz", "session_id": "h", "item_id": "i3"}', "ok"),
    C("utf-8 bom", b"\xef\xbb\xbf" + ev(), "ok"),
    C("utf-16", "\ufeff".encode("utf-16-le") + ev().decode().encode("utf-16-le"), "ok"),
    C("nul in id", ev(session_id="h\x00x"), "ok", key=b"h\x00x"),
    C("control chars in id", ev(session_id="h\x1b[31m"), "ok", key=b"h\x1b[31m"),
    C(
        "emoji ids",
        ev(session_id="s\U0001f600", item_id="\U0001f600"),
        "unknown",
        key="s\U0001f600".encode(),
    ),
    C("zero width id", ev(session_id="h\u200b"), "ok", key="h\u200b".encode()),
    C("whitespace id", ev(session_id="   "), "ok", key=b"   "),
    C("digits id", ev(session_id="9" * 256), "ok", key=b"9" * 256),
    C("event id 256", ev(event_id="e" * 256), "ok"),
    C("user null explicit", raw_ev('{"session_id": "h", "item_id": "i3", "user_id": null}'), "ok"),
]


def _record(value: bytes | None, key: bytes | None, offset: int, create: float | None) -> Record:
    return Record(value, key, "clicks", 0, offset, create, WALL)


GOOD1 = _record(
    json.dumps(
        {
            "session_id": "a2",
            "item_id": "i1",
            "user_id": VICTIM,
            "timestamp": WALL - 4,
            "event_id": "g1",
        }
    ).encode(),
    VICTIM.encode(),
    30,
    None,
)
GOOD2 = _record(
    json.dumps(
        {"session_id": "a2", "item_id": "i2", "user_id": VICTIM, "timestamp": WALL - 3}
    ).encode(),
    VICTIM.encode(),
    32,
    None,
)


def _warm() -> list[Record]:
    """Ten live anonymous sessions and the victim's earlier session (the clock is trusted)."""
    out = [
        _record(
            json.dumps(
                {"session_id": f"w{j}", "item_id": f"i{j + 5}", "timestamp": WALL - 10 + j * 0.1}
            ).encode(),
            f"w{j}".encode(),
            j,
            None,
        )
        for j in range(10)
    ]
    for j, item in enumerate(["i7", "i8"]):
        body = {"session_id": "a1", "item_id": item, "user_id": VICTIM, "timestamp": WALL - 9 + j}
        out.append(_record(json.dumps(body).encode(), VICTIM.encode(), 10 + j, None))
    return out


def run(hostile: Case | None) -> tuple[list[Recommendation], Any, StateStore, Any]:
    """(victim's two answers, the hostile message's batch result, store, sweep result)."""
    model = tiny_serving_model(n_items=50, user_dim=4)
    store, clock = StateStore(), StreamClock()
    process_batch(_warm(), store, model, CFG, clock=clock, now=WALL)
    answers = process_batch([GOOD1], store, model, CFG, clock=clock, now=WALL).recommendations
    res = None
    if hostile is not None:
        rec = _record(hostile.value, hostile.key, 31, hostile.create_time)
        res = process_batch([rec], store, model, CFG, clock=clock, now=WALL)
    answers += process_batch([GOOD2], store, model, CFG, clock=clock, now=WALL).recommendations
    swept = sweep_idle(store, model, CFG, clock=clock, now=WALL)  # at arrival, not run time
    return answers, res, store, swept


BASELINE = run(None)


def test_the_corpus_is_large_and_every_reason_is_named() -> None:
    assert len(CASES) >= 100
    assert len({c.name for c in CASES}) == len(CASES)
    for c in CASES:
        if c.expect.startswith("dead:"):
            assert c.expect[5:] in REASONS
    assert {c.expect for c in CASES} >= {
        "dead:empty",
        "dead:oversized",
        "dead:unparseable",
        "dead:not_an_object",
        "dead:invalid",
        TOR,
        "dead:key_mismatch",
        "ok",
        "dup",
        "unknown",
    }


def assert_same_answers(got: list[Recommendation], want: list[Recommendation]) -> None:
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g.items == w.items
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-6, atol=1e-7)
        assert (g.duplicate, g.click_id) == (w.duplicate, w.click_id)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_message_between_two_good_clicks(case: Case) -> None:
    answers, res, store, swept = run(case)
    assert res is not None
    if case.expect.startswith("dead:"):
        assert [d.reason for d in res.dead_letters] == [case.expect[5:]], [
            (d.reason, d.detail) for d in res.dead_letters
        ]
        assert not res.recommendations
        assert res.dead_letters[0].offset == 31
    else:
        assert not res.dead_letters, [(d.reason, d.detail) for d in res.dead_letters]
        (r,) = res.recommendations if case.expect != "ok" or res.recommendations else [None]
        if r is not None:
            assert r.duplicate == (case.expect == "dup")
            assert r.unknown_item == (case.expect == "unknown")
            assert all(np.isfinite(r.scores))
    # the good clicks' answers are exactly those without the hostile message
    assert_same_answers(answers, BASELINE[0])
    # no other key's session ended, the victim's history is intact
    base_store = BASELINE[2]
    for key in base_store.sessions:
        assert key in store.sessions, key
    assert store.users["u:" + VICTIM] == base_store.users["u:" + VICTIM]
    assert store.sessions["u:" + VICTIM] == base_store.sessions["u:" + VICTIM]
    # the sweep ends nothing but (at most) the hostile message's own idle session
    assert BASELINE[3].sessions_ended == 0
    assert swept.sessions_ended == (1 if case.name == "29 days old" else 0)
