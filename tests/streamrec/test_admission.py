"""admit (streamrec.serving.admission) on its own: where a refused record's dead letter says it
came from, and which time a click without a body time is checked and used with."""

from __future__ import annotations

import json

from streamrec.serving.admission import Admitted, admit
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.events import DeadLetter
from streamrec.serving.records import Record

#: a click with no time in its body: the record's CreateTime, else its arrival, dates it
UNDATED = json.dumps({"session_id": "s1", "type": "click", "item_id": "i1"}).encode()
NOW = 1_800_000_000.0


def _admit(rec: Record) -> Admitted | DeadLetter:
    return admit(rec, CoreConfig(), StreamClock(), None, NOW)


def test_an_undecodable_record_is_dead_lettered_with_its_topic_partition_and_offset() -> None:
    dl = _admit(Record(b"{not json", b"s1", "clicks", 3, 41))
    assert isinstance(dl, DeadLetter)
    assert (dl.topic, dl.partition, dl.offset) == ("clicks", 3, 41)


def test_a_createtime_past_any_clock_is_dead_lettered_not_raised() -> None:
    rec = Record(UNDATED, b"s1", "clicks", 2, 7, timestamp=float("inf"))
    dl = _admit(rec)
    assert isinstance(dl, DeadLetter) and dl.reason == "timestamp_out_of_range"
    assert (dl.topic, dl.partition, dl.offset) == ("clicks", 2, 7)


def test_an_undated_click_takes_any_positive_createtime_else_its_arrival() -> None:
    for created, want in ((1.0, 1.0), (NOW - 60, NOW - 60), (0.0, NOW), (-1.0, NOW)):
        got = _admit(Record(UNDATED, b"s1", "clicks", 0, 0, timestamp=created))
        assert not isinstance(got, DeadLetter), (created, got)
        assert got[2] == want, created


def test_the_configured_message_size_bounds_what_is_admitted() -> None:
    small = CoreConfig(max_message_bytes=len(UNDATED) - 1)
    dl = admit(Record(UNDATED, b"s1", "clicks", 0, 0), small, StreamClock(), None, NOW)
    assert isinstance(dl, DeadLetter) and dl.reason == "oversized"
    fits = CoreConfig(max_message_bytes=len(UNDATED))
    assert not isinstance(admit(Record(UNDATED, b"s1"), fits, StreamClock(), None, NOW), DeadLetter)
