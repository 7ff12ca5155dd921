"""Changelog recovery of the native worker's partitions (streamrec.engines.native.recovery)
against a stand-in changelog reader: each partition replays from the offset its database holds
to the end, an empty changelog partition is not read, and the reader is closed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from streamrec.engines.native import recovery
from streamrec.engines.native.store import RocksDBPartition
from streamrec.serving.state_store import SESSIONS, USERS

CHANGELOG = "app-state-changelog"


@dataclass
class _Msg:
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes | None
    _error: Any = None

    def error(self) -> Any:
        return self._error

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value


@dataclass
class _Reader:
    """The changelog as a consumer reads it: ``log[p]`` is partition p's records from offset
    0, handed out two at a time from the assigned positions."""

    log: dict[int, list[tuple[bytes | None, bytes | None]]]
    assigned: dict[int, int] = field(default_factory=dict)
    closed: bool = False

    def list_topics(self, topic: str, timeout: float = 0) -> None:
        assert topic == CHANGELOG

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = 0) -> tuple[int, int]:
        return 0, len(self.log.get(tp.partition, []))

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = {tp.partition: tp.offset for tp in tps}
        self._at = dict(self.assigned)

    def consume(self, n: int, timeout: float) -> list[_Msg]:
        out = [_Msg(9, -1, None, None, _error="partition EOF")]  # an event, not a record
        for p, at in self._at.items():
            for o in range(at, min(at + 2, len(self.log[p]))):
                out.append(_Msg(p, o, *self.log[p][o]))
            self._at[p] = min(at + 2, len(self.log[p]))
        return out

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> _Reader:
    log: dict[int, list[tuple[bytes | None, bytes | None]]] = {
        0: [(SESSIONS + b"a:s1", b"1"), (USERS + b"u:1", b"2"), (SESSIONS + b"a:s1", None)],
        1: [(SESSIONS + b"a:s2", b"3"), (b"not-a-state-key", b"x"), (SESSIONS + b"a:s3", b"4")],
        2: [],
    }
    stand_in = _Reader(log)
    monkeypatch.setattr(recovery.clients, "consumer", lambda *a, **kw: stand_in)
    monkeypatch.setattr(recovery.clients, "true_end_offsets", lambda conf, ends: dict(ends))
    return stand_in


def test_each_partition_replays_from_the_offset_its_database_holds_to_the_end(
    tmp_path: Path, reader: _Reader
) -> None:
    parts = [RocksDBPartition(tmp_path / str(p), p) for p in range(3)]
    parts[1].recover([(SESSIONS + b"a:s2", b"3", 0)])  # partition 1 holds offset 0 already
    try:
        applied = recovery.recover({}, "g", CHANGELOG, parts)
        assert reader.assigned == {0: 0, 1: 1}  # the empty partition 2 is not read
        assert applied == 3 + 1  # partition 1: offset 1 is no state key (skipped), offset 2
        assert [p.changelog_offset for p in parts] == [2, 2, -1]
        assert parts[0].db.get(SESSIONS + b"a:s1") is None  # the tombstone applied last
        assert parts[0].db.get(USERS + b"u:1") == b"2"
        assert parts[1].db.get(SESSIONS + b"a:s3") == b"4" and parts[1].tally.skipped == 1
        assert reader.closed
    finally:
        for p in parts:
            p.close()


def test_nothing_to_replay_reads_nothing(tmp_path: Path, reader: _Reader) -> None:
    part = RocksDBPartition(tmp_path / "2", 2)
    try:
        assert recovery.recover({}, "g", CHANGELOG, [part]) == 0
        assert reader.assigned == {} and reader.closed
    finally:
        part.close()
