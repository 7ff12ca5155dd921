"""The archiver's exactly-once rules without a broker: its consumer is a stand-in for a clicks
topic (records served from a list, commits recorded, a crash or a revocation when the test
says), its storage a real directory whose write steps can fail (faulty_files.py). The same
rules against the embedded broker: test_archive.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from faulty_files import FaultyFiles, InjectedFault

from streamrec.kafka import clients
from streamrec.loop.archive import TMP_PREFIX, Storage, hour_of, list_archive
from streamrec.loop.archiver import Archiver
from streamrec.testing import click

TOPIC = "clicks"
T0 = 1_767_225_600.0  # 2026-01-01T00:00Z


@dataclass
class _Msg:
    _partition: int
    _offset: int
    _value: bytes | None
    _key: bytes | None

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return 0, 0  # TIMESTAMP_NOT_AVAILABLE: the bodies carry their times


@dataclass
class Topic:
    """The clicks topic and the group's committed offsets, shared by the archivers of a test
    (as the broker is): each archiver gets a :meth:`consumer` of it."""

    logs: dict[int, list[tuple[bytes | None, bytes | None]]]
    committed: dict[int, int] = field(default_factory=dict)
    commits: list[tuple[int, int]] = field(default_factory=list)

    def consumer(self, **kw: Any) -> StandInConsumer:
        return StandInConsumer(self, **kw)


class StandInConsumer:
    """What the archiver uses of confluent's Consumer. ``crash_after`` consume calls raise
    (a crash mid-run); ``batch`` records per consume call."""

    def __init__(
        self, topic: Topic, batch: int = 7, crash_after: int | None = None, stall_every: int = 0
    ) -> None:
        self.topic, self.batch, self.crash_after = topic, batch, crash_after
        self.stall_every = stall_every  # every n-th consume call returns nothing (a slow fetch)
        self.positions: dict[int, int] = {}
        self.on_assign: Callable[..., None] | None = None
        self.on_revoke: Callable[..., None] | None = None
        self.calls = 0
        self.closed = False

    def subscribe(self, topics: list[str], on_assign: Any, on_revoke: Any) -> None:
        assert topics == [TOPIC]
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, tp.partition, self.topic.committed.get(tp.partition, -1001))
                for tp in parts]  # fmt: skip

    def assign(self, parts: list[TopicPartition]) -> None:
        for tp in parts:
            self.positions[tp.partition] = 0 if tp.offset == OFFSET_BEGINNING else tp.offset

    def unassign(self) -> None:
        self.positions.clear()

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, p) for p in self.positions]

    def consume(self, num_messages: int, timeout: float) -> list[_Msg]:
        if self.on_assign is not None:  # the first call joins the group (and returns nothing)
            assign, self.on_assign = self.on_assign, None
            assign(self, [TopicPartition(TOPIC, p) for p in sorted(self.topic.logs)])
            return []
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise InjectedFault("the archiver died")
        if self.stall_every and self.calls % self.stall_every == 0:
            return []
        out = []
        for p, pos in sorted(self.positions.items()):
            for off in range(pos, min(pos + self.batch, len(self.topic.logs[p]))):
                key, value = self.topic.logs[p][off]
                out.append(_Msg(p, off, value, key))
            self.positions[p] = min(pos + self.batch, len(self.topic.logs[p]))
        return out

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        assert not asynchronous
        for tp in offsets:
            self.topic.committed[tp.partition] = tp.offset
            self.topic.commits.append((tp.partition, tp.offset))

    def list_topics(self, topic: str, timeout: float) -> Any:
        """Metadata with no partitions: this log is laid out by hand, not by a partitioner,
        so the archiver's partition check is off (its other admission checks run)."""
        return SimpleNamespace(topics={topic: SimpleNamespace(partitions={})})

    def get_watermark_offsets(self, tp: TopicPartition, **kw: Any) -> tuple[int, int]:
        return 0, len(self.topic.logs[tp.partition])

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        """The next offset to fetch per partition (the lag metric reads it)."""
        return [TopicPartition(TOPIC, tp.partition, self.positions.get(tp.partition, -1001))
                for tp in parts]  # fmt: skip

    def revoke(self) -> None:
        assert self.on_revoke is not None
        self.on_revoke(self, [TopicPartition(TOPIC, p) for p in sorted(self.positions)])

    def close(self) -> None:
        self.closed = True


def _log(n: int, partition: int, bad_every: int = 0) -> list[tuple[bytes | None, bytes | None]]:
    """n records of one partition: clicks 2 min apart (files are cut at hour changes too),
    every ``bad_every``-th one a record the worker dead-letters, and session ends."""
    out: list[tuple[bytes | None, bytes | None]] = []
    for j in range(n):
        s = f"s{partition}-{j // 4}"
        if bad_every and j % bad_every == 0:
            out.append((s.encode(), b"{not json" if j % 2 else click(s, None)))
        elif j % 9 == 8:
            out.append((s.encode(), click(s, None, t=T0 + j * 120.0, type="session_end")))
        else:
            value = click(s, f"i{j % 13}", t=T0 + j * 120.0, event_id=f"e{partition}-{j}")
            out.append((s.encode(), value))
    return out


def _valid(topic: Topic) -> set[tuple[int, int]]:
    from streamrec.serving.events import ClickEvent, decode

    return {
        (p, o)
        for p, log in topic.logs.items()
        for o, (_, v) in enumerate(log)
        if isinstance(ev := decode(v), ClickEvent) and ev.type == "click"
    }


def _rows(directory: Path) -> list[tuple[int, int]]:
    storage = Storage(directory)
    rows: list[tuple[int, int]] = []
    for f in list_archive(storage):
        t = pq.read_table(storage.join(f.path))
        parts, offs, times = (t[c].to_pylist() for c in ("partition", "offset", "Time"))
        assert set(parts) == {f.partition} and all(f.first <= o <= f.last for o in offs)
        assert {hour_of(x) for x in times} == {f.hour}  # one event hour per file
        rows += zip(parts, offs, strict=True)
    return rows


def _archiver(topic: Topic, directory: Path | Storage, consumer: StandInConsumer,
              **kw: Any) -> Archiver:  # fmt: skip
    # the broker kind named, so that no cluster is asked (nothing listens on port 9)
    conf = clients.with_broker({"bootstrap.servers": "127.0.0.1:9"}, "kafka")
    a = Archiver(conf, TOPIC, directory, **kw)  # type: ignore[arg-type]  # a Path as the directory
    a.consumer.close()
    a.consumer = consumer  # type: ignore[assignment]  # a stand-in for confluent's Consumer
    return a


def test_every_valid_click_is_archived_once_and_committed_after_its_file(tmp_path: Path) -> None:
    topic = Topic({p: _log(60 + 7 * p, p, bad_every=11) for p in range(3)})
    flushed = []

    def on_flush(f: Any) -> None:  # each file is there before its range is committed
        assert topic.committed.get(f.partition, 0) <= f.first
        flushed.append(f)

    consumer = topic.consumer()
    a = _archiver(topic, tmp_path, consumer, flush_events=5, on_flush=on_flush)
    stats = a.run(until_caught_up=True, idle_s=0.0, max_s=60)
    rows = _rows(tmp_path)
    assert len(rows) == len(set(rows)) and set(rows) == _valid(topic)
    assert stats.archived == len(rows) and stats.files == len(flushed) == len(
        list_archive(a.storage)
    )
    assert stats.records == sum(len(x) for x in topic.logs.values())
    assert stats.skipped == stats.records - stats.archived
    assert topic.committed == {p: len(x) for p, x in topic.logs.items()}  # to the end
    for f in flushed:  # files are cut at flush_events rows and at hour changes
        assert 1 <= pq.read_table(a.storage.join(f.path)).num_rows <= 5
    assert consumer.closed


def test_a_restart_after_a_crash_resumes_after_the_archived_ranges(tmp_path: Path) -> None:
    """A crash after some renames and commits, with files renamed but not committed: the next
    archiver resumes at the end of the archived ranges, not at the committed offset, cuts its
    files elsewhere, and archives every click once; the crash's temporary file is removed."""
    topic = Topic({p: _log(80, p, bad_every=13) for p in range(2)})
    files = FaultyFiles("sync_dir", nth=4, after=True)  # the 4th file: renamed, then a crash
    consumer = topic.consumer()
    a = _archiver(topic, Storage(tmp_path, files=files), consumer, flush_events=6)
    with pytest.raises(InjectedFault):
        a.run(until_caught_up=True, idle_s=0.0, max_s=60)
    assert consumer.closed
    archived = set(_rows(tmp_path))
    ends = {p: max(o for q, o in archived if q == p) + 1 for p, _ in archived}
    assert any(ends[p] > topic.committed.get(p, 0) for p in ends)  # renamed, not committed
    leftover = tmp_path / "date=2026-01-01" / "hour=00" / f"{TMP_PREFIX}x-p0-1-2.parquet"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half")
    b = _archiver(topic, tmp_path, topic.consumer(batch=5), flush_events=4)
    assert not leftover.exists()
    b.run(until_caught_up=True, idle_s=0.0, max_s=60)
    rows = _rows(tmp_path)
    assert len(rows) == len(set(rows)), "a click archived twice"
    assert set(rows) == _valid(topic)


@pytest.mark.parametrize("step", ["write", "sync", "rename"])
def test_a_failed_write_commits_nothing_of_its_range(tmp_path: Path, step: str) -> None:
    topic = Topic({0: _log(40, 0)})
    a = _archiver(topic, Storage(tmp_path, files=FaultyFiles(step, nth=2)), topic.consumer(),
                  flush_events=5)  # fmt: skip
    with pytest.raises(InjectedFault):
        a.run(until_caught_up=True, idle_s=0.0, max_s=60)
    archived = set(_rows(tmp_path))
    assert len(list_archive(Storage(tmp_path))) == 1
    committed = topic.committed.get(0, 0)
    assert {(0, o) for o in range(committed) if (0, o) in _valid(topic)} <= archived
    assert committed <= max(o for _, o in archived) + 1
    b = _archiver(topic, tmp_path, topic.consumer(), flush_events=3)
    b.run(until_caught_up=True, idle_s=0.0, max_s=60)
    rows = _rows(tmp_path)
    assert len(rows) == len(set(rows)) and set(rows) == _valid(topic)


def test_a_revoked_partition_is_flushed_and_committed_then_forgotten(tmp_path: Path) -> None:
    topic = Topic({0: _log(10, 0), 1: _log(10, 1)})
    consumer = topic.consumer(batch=3)
    a = _archiver(topic, tmp_path, consumer, flush_events=1000, flush_interval_s=1e9)
    consumer.subscribe([TOPIC], a._on_assign, a._on_revoke)
    consumer.consume(10, 0)  # joins: both partitions assigned
    for m in consumer.consume(10, 0):
        a.add(m.partition(), m.offset(), m.value(), m.key())
    assert a.next_offsets == {0: 0, 1: 0} and set(a.ranges) == {0, 1}
    consumer.revoke()
    assert a.ranges == {} and a.next_offsets == {} and consumer.positions == {}
    assert topic.committed == {0: 3, 1: 3}
    assert set(_rows(tmp_path)) == {x for x in _valid(topic) if x[1] < 3}


def test_a_range_of_dead_letters_alone_is_committed_without_a_file(tmp_path: Path) -> None:
    bad: list[tuple[bytes | None, bytes | None]] = [
        (b"k", b"{not json"),
        (b"k", None),
        (b"k", click("k", None)),
    ]  # all dead-lettered
    topic = Topic({0: bad})
    a = _archiver(topic, tmp_path, topic.consumer())
    stats = a.run(until_caught_up=True, idle_s=0.0, max_s=60)
    assert list_archive(a.storage) == [] and topic.committed == {0: 3}
    assert (stats.records, stats.skipped, stats.archived, stats.files) == (3, 3, 0, 0)


def test_until_caught_up_waits_for_every_assigned_partition(tmp_path: Path) -> None:
    """Caught up only once every partition's next offset reaches its end offset (a partition
    with nothing new counts from the resumed offset, known before any message of it)."""
    topic = Topic({0: _log(30, 0), 1: []})
    consumer = topic.consumer(batch=4)
    a = _archiver(topic, tmp_path, consumer, flush_events=100)
    assert not a._caught_up()  # nothing assigned yet
    consumer.subscribe([TOPIC], a._on_assign, a._on_revoke)
    consumer.consume(10, 0)
    assert a.next_offsets == {0: 0, 1: 0} and not a._caught_up()
    a.next_offsets[0] = 29
    assert not a._caught_up()
    a.next_offsets[0] = 30
    assert a._caught_up()


def test_until_caught_up_reads_the_last_record_after_a_fetch_that_returned_nothing(
    tmp_path: Path,
) -> None:
    """A fetch that returns nothing while records remain (the broker slow for a moment) is
    not the end: --until-caught-up stops only when its next offset reaches the end offset,
    so the last click is archived and committed in this run, not left to the next one."""
    topic = Topic({0: [(b"s", click("s", f"i{j}", t=T0 + j, event_id=f"e{j}")) for j in range(6)]})
    consumer = topic.consumer(batch=1, stall_every=2)
    a = _archiver(topic, tmp_path, consumer, flush_events=100)
    a.run(until_caught_up=True, idle_s=0.0, max_s=60)
    assert set(_rows(tmp_path)) == _valid(topic) and len(_valid(topic)) == 6
    assert topic.committed == {0: 6}


def test_readiness_lag_and_offsets_follow_the_assignment(tmp_path: Path) -> None:
    """Ready while it holds partitions; not ready once they are revoked or it stops. The
    lag and the last archived offset are reported per (group, topic, partition), and a
    revoked partition's offset gauge is dropped (its new owner reports it)."""
    topic = Topic({0: _log(20, 0), 1: _log(20, 1)})
    consumer = topic.consumer(batch=3)
    a = _archiver(topic, tmp_path, consumer, flush_events=4, group="g")
    registry = a.metrics.registry
    assert not a.health.ready()[0]
    seen = []
    a.on_flush = lambda f: seen.append(a.health.ready())
    a.run(until_caught_up=True, idle_s=0.0, max_s=60)
    assert seen and all(ok for ok, _ in seen)  # ready while archiving
    assert a.health.ready() == (False, "stopped")
    for p in (0, 1):
        lag = registry.get_sample_value(
            "streamrec_consumer_lag", {"group": "g", "topic": TOPIC, "partition": str(p)}
        )
        assert lag is not None and 0 <= lag <= 20  # as of the last poll, before the last flush
        last = registry.get_sample_value(
            "streamrec_archiver_last_archived_offset", {"topic": TOPIC, "partition": str(p)}
        )
        assert last == 19

    consumer = topic.consumer(batch=3)
    b = _archiver(topic, tmp_path, consumer, group="g")
    consumer.subscribe([TOPIC], b._on_assign, b._on_revoke)
    consumer.consume(10, 0)  # joins: both partitions assigned, nothing new to read
    assert b.health.ready()[0] and b.committed == {0: 20, 1: 20}
    b.flush(0)
    b.metrics.archived_offset.labels(TOPIC, "1").set(19)
    consumer.revoke()
    assert b.health.ready() == (False, "partitions revoked; waiting for the next assignment")
    assert b.committed == {} and b.next_offsets == {} and b.ranges == {}
    assert b.metrics.registry.get_sample_value(
        "streamrec_archiver_last_archived_offset", {"topic": TOPIC, "partition": "1"}
    ) is None  # fmt: skip


def test_files_are_cut_by_age_and_a_stopped_run_writes_what_it_read(tmp_path: Path) -> None:
    """flush_interval_s bounds a file's age (0: a file every other poll); a run
    stopped from outside (the command's signal handler, no max_s) writes what it read."""

    def one_partition() -> Topic:
        return Topic(
            {0: [(b"s", click("s", f"i{j}", t=T0 + j, event_id=f"e{j}")) for j in range(12)]}
        )

    topic = one_partition()
    a = _archiver(topic, tmp_path / "a", topic.consumer(batch=4), flush_events=1000,
                  flush_interval_s=0.0)  # fmt: skip
    a.run(until_caught_up=True, idle_s=0.0, max_s=60)
    # a poll's records are older than 0 s at the next poll (its time is taken before reading)
    assert [(f.first, f.last) for f in list_archive(a.storage)] == [(0, 7), (8, 11)]

    polls: list[int] = []

    def stopped() -> bool:
        polls.append(1)
        return len(polls) > 5  # joined, three polls of 4 records, one empty

    topic = one_partition()
    b = _archiver(topic, tmp_path / "b", topic.consumer(batch=4), flush_events=1000,
                  flush_interval_s=1e9)  # fmt: skip
    before = time.monotonic()
    stats = b.run(stopped=stopped)
    assert [(f.first, f.last) for f in list_archive(b.storage)] == [(0, 11)]
    assert topic.committed == {0: 12}
    assert 0 <= stats.seconds <= time.monotonic() - before
