"""ClickEvent validation and dead letters: bad input never raises."""

from __future__ import annotations

import base64
import json
import time

import pytest

from streamrec.serving import events
from streamrec.serving.events import (
    MAX_MESSAGE_BYTES,
    ClickEvent,
    DeadLetter,
    decode,
    encode,
    make_dead_letter,
)


def _ok(d: dict) -> ClickEvent:
    ev = decode(json.dumps(d).encode())
    assert isinstance(ev, ClickEvent), ev
    return ev


def test_valid_click_and_key() -> None:
    now = time.time()
    ev = _ok({"session_id": "s1", "item_id": "a", "timestamp": now})
    assert ev.type == "click" and ev.key == "s1" and ev.timestamp == pytest.approx(now)
    ev = _ok({"session_id": "s1", "item_id": "a", "user_id": "u9", "event_id": "e1"})
    assert ev.key == "u9" and ev.event_id == "e1" and ev.timestamp is None


def test_iso_timestamp_and_session_end() -> None:
    ev = _ok({"session_id": "s", "item_id": "a", "timestamp": "2024-03-01T10:00:00Z"})
    assert ev.timestamp == pytest.approx(1709287200.0)
    ev = _ok({"session_id": "s", "item_id": "a", "timestamp": "2024-03-01T10:00:00"})
    assert ev.timestamp == pytest.approx(1709287200.0)
    ev = _ok({"session_id": "s", "type": "session_end"})
    assert ev.type == "session_end" and ev.item_id is None


def test_old_logs_are_accepted() -> None:
    """Any finite, non-negative event time decodes: a 1997 log (MovieLens-100k) and the
    epoch itself; how far a time may be from its partition's clock is the clock's call."""
    for t in (874_724_710, "1997-09-20T03:05:10Z", 0, 0.0, 946_684_799):
        assert _ok({"session_id": "s", "item_id": "a", "timestamp": t}).timestamp is not None


def test_roundtrip_encode() -> None:
    ev = _ok({"session_id": "s", "item_id": "a", "user_id": "u", "timestamp": 1.7e9})
    assert decode(encode(ev)) == ev


BAD = [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"{not json", "unparseable"),
    (b"\xff\xfe\x00garbage", "unparseable"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'"a string"', "not_an_object"),
    (b"null", "not_an_object"),
    (b'{"item_id": "a"}', "invalid"),
    (b'{"session_id": "s"}', "invalid"),
    (b'{"session_id": 5, "item_id": "a"}', "invalid"),
    (b'{"session_id": "s", "item_id": 17}', "invalid"),
    (b'{"session_id": "s", "item_id": ["a"]}', "invalid"),
    (b'{"session_id": "", "item_id": "a"}', "invalid"),
    (b'{"session_id": "s", "item_id": "a", "timestamp": true}', "invalid"),
    (b'{"session_id": "s", "item_id": "a", "timestamp": -12}', "timestamp_out_of_range"),
    (b'{"session_id": "s", "item_id": "a", "timestamp": "-0.5"}', "timestamp_out_of_range"),
    (b'{"session_id": "s", "item_id": "a", "timestamp": 9e15}', "timestamp_out_of_range"),
    (b'{"session_id": "s", "item_id": "a", "timestamp": "yesterday"}', "invalid"),
    (b'{"session_id": "s", "item_id": "a", "timestamp": {"x": 1}}', "invalid"),
    (b'{"session_id": "s", "item_id": "a", "type": "purchase"}', "invalid"),
    (
        b'{"session_id": "s", "item_id": "a", "user_id": null, "timestamp": NaN}',
        "timestamp_out_of_range",
    ),
    (json.dumps({"session_id": "s" * 300, "item_id": "a"}).encode(), "invalid"),
    (b"[" * 50_000, "oversized"),
    (b'{"session_id": "s", "item_id": "' + b"x" * 20_000 + b'"}', "oversized"),
    (b"[" * 5000 + b"]" * 5000, "unparseable"),  # recursion bomb
]


@pytest.mark.parametrize(("raw", "reason"), BAD)
def test_bad_input_is_dead_lettered(raw: bytes, reason: str) -> None:
    dl = decode(raw, topic="t", partition=2, offset=7, key=b"k")
    assert isinstance(dl, DeadLetter), dl
    assert dl.reason == reason, dl
    assert dl.original == raw[: len(dl.original)] and dl.original_size == len(raw)
    assert (dl.topic, dl.partition, dl.offset) == ("t", 2, 7)
    assert base64.b64decode(dl.key_b64 or "") == b"k"
    again = DeadLetter.model_validate_json(dl.to_bytes())
    assert again.reason == reason


def test_none_and_non_bytes_never_raise() -> None:
    assert isinstance(decode(None), DeadLetter)
    assert isinstance(decode(123), DeadLetter)  # type: ignore[arg-type]  # the wrong type on purpose
    assert isinstance(decode('{"session_id": "s", "item_id": "a"}'), ClickEvent)


def test_a_missing_or_wrongly_typed_value_is_dead_lettered_with_its_reason() -> None:
    """What an operator reads in the dead-letter record: the reason, a detail, no original."""
    dl = decode(None, topic="t", partition=1, offset=3)
    assert isinstance(dl, DeadLetter)
    assert (dl.reason, dl.detail, dl.original_size, dl.offset) == (
        "empty",
        "message has no value",
        0,
        3,
    )
    dl = decode(123, topic="t", partition=1, offset=4)  # type: ignore[arg-type]  # on purpose
    assert isinstance(dl, DeadLetter)
    assert (dl.reason, dl.detail, dl.original_size) == ("type", "value is int", 0)
    assert (dl.topic, dl.partition, dl.offset) == ("t", 1, 4)
    # a str that cannot be encoded at all (a lone surrogate outside the escaped bytes)
    dl = decode("\ud800", offset=5)
    assert isinstance(dl, DeadLetter) and dl.reason == "error" and dl.original_size == 0
    assert dl.offset == 5 and dl.detail.startswith("UnicodeEncodeError")


def test_a_str_value_is_read_as_its_utf8_bytes_undecodable_ones_included() -> None:
    """A str whose undecodable bytes were kept as surrogates (surrogateescape) is judged on
    those bytes: not JSON, so ``unparseable`` with the bytes kept, never a decoder error."""
    raw = b'{"session_id": "s", "item_id": "\xff"}'
    dl = decode(raw.decode("utf-8", "surrogateescape"))
    assert isinstance(dl, DeadLetter) and dl.reason == "unparseable", dl
    assert dl.original == raw


DETAILS = [
    (b"   ", "empty", "message is empty"),
    (b"[1, 2]", "not_an_object", "list"),
    (b"{x", "unparseable", "Expecting property name enclosed in double quotes: line 1 column 2"),
    (b'{"item_id": 5}', "invalid", "session_id: Field required; item_id: Input should be"),
    (b"[" * 20_000, "oversized", f"20000 > {MAX_MESSAGE_BYTES} bytes"),
]


@pytest.mark.parametrize(("raw", "reason", "detail"), DETAILS)
def test_a_dead_letter_says_what_is_wrong(raw: bytes, reason: str, detail: str) -> None:
    """The detail an operator reads: the field and the error, the parser's message, the
    type found, the size against the limit."""
    dl = decode(raw)
    assert isinstance(dl, DeadLetter) and dl.reason == reason
    assert dl.detail.startswith(detail), dl.detail


def test_a_message_of_exactly_the_size_limit_is_judged_on_its_content() -> None:
    head, tail = '{"session_id": "s", "item_id": "a"', "}"
    text = head + " " * (MAX_MESSAGE_BYTES - len(head) - len(tail)) + tail
    assert len(text.encode()) == MAX_MESSAGE_BYTES
    assert isinstance(decode(text), ClickEvent)  # a str: the careful path
    invalid = text.replace('"item_id"', '"itemxid"').encode()  # the fast path refuses it
    dl = decode(invalid)
    assert isinstance(dl, DeadLetter) and dl.reason == "invalid", dl


def test_an_unexpected_error_while_decoding_is_a_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bad input never stops a worker, even input that breaks the decoder in a way nobody
    foresaw: the record is dead-lettered as ``error`` with the exception, bytes kept."""

    def broken(raw: bytes) -> object:
        raise RuntimeError("the parser broke")

    monkeypatch.setattr(events.json, "loads", broken)
    raw = b"\xef\xbb\xbf{}"  # a BOM: the fast path refuses it, so the careful path reads it
    dl = decode(raw, topic="t", partition=1, offset=2, key=b"k")
    assert isinstance(dl, DeadLetter)
    assert (dl.reason, dl.detail) == ("error", "RuntimeError: the parser broke")
    assert dl.original == raw and (dl.topic, dl.partition, dl.offset) == ("t", 1, 2)


def test_a_dead_letters_detail_is_cut_at_1000_characters() -> None:
    dl = make_dead_letter(b"x", "invalid", "d" * 5000)
    assert dl.detail == "d" * 1000 and dl.original_size == 1


def test_encoded_events_leave_out_absent_fields() -> None:
    """The clicks topic's value carries only the fields an event has (no nulls)."""
    ev = _ok({"session_id": "s", "item_id": "a"})
    assert json.loads(encode(ev)) == {"session_id": "s", "item_id": "a", "type": "click"}


def test_extra_fields_ignored() -> None:
    ev = _ok({"session_id": "s", "item_id": "a", "price": 3.5})
    assert ev.item_id == "a"
