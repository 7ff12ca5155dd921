"""The archiver behind ``streamrec archive``: the clicks topic into the archive, exactly once.

A consumer-group member (group ``<app_id>-archiver``; several archivers share the
partitions) that writes each partition's clicks to the archive (:mod:`streamrec.loop.archive`)
one *range* at a time: a contiguous offset range of one partition, written as one file per
event hour its clicks fall in (at most ``max_open_hours`` of them), then ``LAST + 1`` is
committed after the last file's rename. On (re)assignment a partition resumes at the larger
of the committed offset and the end of its archived (complete) ranges, after removing the
files of a range left incomplete; so a crash between the renames and the commit does not
write anything twice, a crash between two renames leaves a range that is never read and is
archived again, and a crash before a rename leaves only a temporary file that is ignored
(and removed at the next start). Each record goes through the workers' own admission
decision (:func:`streamrec.serving.admission.admit`: decode, key, partition, event time
against the archiver's own clock of the partition, CreateTime when the body has no time):
what the worker dead-letters is not archived, and a click is archived with the event time
the worker uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from streamrec.kafka import clients, tansu
from streamrec.loop.archive import (
    SCHEMA,
    TMP_PREFIX,
    ArchiveFile,
    Storage,
    archived_end,
    file_name,
    hour_of,
    incomplete_ranges,
    list_archive,
)
from streamrec.metrics import ArchiverMetrics
from streamrec.serving.admission import admit
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.events import DeadLetter
from streamrec.serving.input_topic import InputTopic
from streamrec.serving.records import Record

log = logging.getLogger(__name__)

#: event hours one range may hold at most (one file each) before it is written: a live
#: stream's current hour and a day of late clicks
MAX_OPEN_HOURS = 24


@dataclass
class _Range:
    """A partition's pending range: offsets first..last, its valid clicks by event hour."""

    first: int
    last: int
    opened: float
    hours: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    rows: int = 0


@dataclass
class ArchiveStats:
    records: int = 0  # records read
    archived: int = 0  # rows written
    skipped: int = 0  # dead-lettered / session_end records
    files: int = 0
    seconds: float = 0.0


class Archiver:
    """A consumer-group member that writes its partitions' clicks to the archive.

    ``flush_events`` / ``flush_interval_s`` bound a range's rows and age; a click of an
    event hour the range does not hold yet, when it holds ``max_open_hours`` already, starts
    a new range. ``directory``: a path or URL, or a :class:`Storage` (tests hand in one
    whose write steps fail, :mod:`streamrec.loop.files`). ``on_flush`` (tests) is called
    after each file's rename, so raising there crashes between renames or between the last
    rename and the commit.
    """

    def __init__(
        self,
        client_config: Mapping[str, Any],
        topic: str,
        directory: str | Storage,
        *,
        group: str = "streamrec-archiver",
        flush_events: int = 50_000,
        flush_interval_s: float = 10.0,
        max_open_hours: int = MAX_OPEN_HOURS,
        on_flush: Callable[[ArchiveFile], None] | None = None,
        metrics: ArchiverMetrics | None = None,
        config: CoreConfig | None = None,
        partitioner: str = "consistent_random",
    ) -> None:
        if max_open_hours < 1:
            raise ValueError(f"max_open_hours must be at least 1, not {max_open_hours}")
        #: the workers' admission: their core config (keys required), a clock per partition
        #: of the archiver's own, the topic's partitioner over its partition count (learnt
        #: at each assignment: building an archiver asks the broker nothing)
        self.config = config or CoreConfig(require_key=True)
        self.clock = StreamClock.from_config(self.config)
        self.input_topic = InputTopic(0, partitioner)
        self.storage = directory if isinstance(directory, Storage) else Storage(directory)
        self.client_config = client_config
        self.group = group
        self.metrics = metrics or ArchiverMetrics()
        self.health = self.metrics.health
        self.topic = topic
        self.flush_events = flush_events
        self.flush_interval_s = flush_interval_s
        self.max_open_hours = max_open_hours
        self.on_flush = on_flush
        self.ranges: dict[int, _Range] = {}
        #: next offset to archive per assigned partition (known before any message arrives)
        self.next_offsets: dict[int, int] = {}
        #: per partition, the end offset a read past the reported one found (_caught_up)
        self._ends: dict[int, int] = {}
        self.stats = ArchiveStats()
        self._failed = False
        self._clean_temporaries()
        #: the offset committed per assigned partition (what the group's lag is measured from)
        self.committed: dict[int, int] = {}
        self.consumer = clients.consumer(
            client_config,
            group,
            joins_group=True,
            fixed={"enable.auto.commit": False, "auto.offset.reset": "earliest"},
            site={"fetch.wait.max.ms": 50, "log_level": 0},
        )
        #: frees the group when a departed leader holds it (an embedded-broker bug)
        self.join_watch = tansu.JoinWatch(
            client_config,
            group,
            [topic],
            tansu.GROUP_TIMEOUTS["session.timeout.ms"],
            enabled=clients.is_embedded(client_config),
        )

    def _clean_temporaries(self) -> None:
        for rel in self.storage.list_files():
            if rel.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                log.info("removing unfinished file %s", rel)
                self.storage.remove(rel)

    # -- assignment: resume after the archived ranges ---------------------------------------
    def _on_assign(self, consumer: Any, parts: list[Any]) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        self.join_watch.assigned()
        mine = {tp.partition for tp in parts}
        for f in incomplete_ranges(self.storage):
            if f.partition in mine:  # a crash between the renames of one range
                log.warning("removing %s: its range lacks some of its %d files", f.path, f.parts)
                self.storage.remove(f.path)
        ends = archived_end(list_archive(self.storage))
        meta = consumer.list_topics(self.topic, timeout=10).topics[self.topic]
        self.input_topic.partitions = len(meta.partitions)
        committed = consumer.committed(parts, timeout=10)
        for tp, c in zip(parts, committed, strict=True):
            start = max(c.offset if c.offset >= 0 else 0, ends.get(tp.partition, 0))
            if start > max(c.offset, 0):
                log.warning(
                    "partition %d: archived up to %d but committed %d (crash after a rename); "
                    "resuming at %d",
                    tp.partition,
                    start,
                    c.offset,
                    start,
                )
            tp.offset = start if start > 0 else OFFSET_BEGINNING
            self.next_offsets[tp.partition] = start
            self.committed[tp.partition] = start
            self.ranges.pop(tp.partition, None)
        consumer.assign(parts)
        self.health.set_ready(True, f"{len(parts)} partitions assigned")

    def _on_revoke(self, consumer: Any, parts: list[Any]) -> None:
        self.join_watch.waiting()
        for tp in parts:
            if not self._failed:  # after a failure, leave the rest to the next owner
                self.flush(tp.partition)
            self.ranges.pop(tp.partition, None)
            self.next_offsets.pop(tp.partition, None)
            self.committed.pop(tp.partition, None)
            self.metrics.forget_partition(self.topic, tp.partition)
        consumer.unassign()
        self.health.set_ready(False, "partitions revoked; waiting for the next assignment")

    # -- records ----------------------------------------------------------------------------
    def add(
        self,
        partition: int,
        offset: int,
        value: bytes | None,
        key: bytes | None,
        timestamp: float | None = None,
    ) -> None:
        """One record of the topic (``timestamp``: its CreateTime, epoch seconds)."""
        self.stats.records += 1
        rec = Record(value, key, self.topic, partition, offset, timestamp, time.time())
        admitted = admit(rec, self.config, self.clock, self.input_topic, rec.received_at or 0.0)
        if isinstance(admitted, DeadLetter) or admitted[0].type != "click":
            # dead-lettered by the worker (or a session end): not archived, offset covered
            self.stats.skipped += 1
            self._range(partition, offset, None).last = offset
            return
        ev, _, t = admitted
        hour = hour_of(t)
        rng = self._range(partition, offset, hour)
        rng.last = offset
        rng.hours.setdefault(hour, []).append(
            (ev.session_id, ev.item_id, t, ev.user_id, ev.event_id, partition, offset)
        )
        rng.rows += 1
        if rng.rows >= self.flush_events:
            self.flush(partition)

    def _range(self, partition: int, offset: int, hour: str | None) -> _Range:
        """The open range ``offset`` extends: a new one when there is none, or when ``hour``
        would be one event hour more than a range may hold (the open one is written first,
        so a range stays contiguous and each hour of it is one file)."""
        rng = self.ranges.get(partition)
        new_hour = rng is not None and hour is not None and hour not in rng.hours
        if rng is not None and new_hour and len(rng.hours) >= self.max_open_hours:
            self.flush(partition)
            rng = None
        if rng is None:
            rng = self.ranges[partition] = _Range(offset, offset, time.monotonic())
        return rng

    def flush(self, partition: int) -> list[ArchiveFile]:
        """Write the partition's pending range (one file per event hour), then commit the
        offset after it."""
        from confluent_kafka import TopicPartition

        rng = self.ranges.pop(partition, None)
        if rng is None:
            return []
        files = []
        for hour in sorted(rng.hours):
            rows = rng.hours[hour]
            cols = list(zip(*rows, strict=True))
            table = pa.Table.from_arrays(
                [pa.array(c, type=SCHEMA.field(i).type) for i, c in enumerate(cols)],
                schema=SCHEMA,
            )
            rel = file_name(partition, rng.first, rng.last, hour, parts=len(rng.hours))
            size = self.storage.write_atomic(rel, table)
            f = ArchiveFile(rel, partition, rng.first, rng.last, hour, len(rng.hours))
            files.append(f)
            self.stats.files += 1
            self.stats.archived += len(rows)
            self.metrics.observe_file(len(rows), size)
            if self.on_flush is not None:
                self.on_flush(f)
        # Only skipped records in the range: nothing to write, the commit alone records it
        # (a crash before it re-reads and re-skips them).
        self.consumer.commit(
            offsets=[TopicPartition(self.topic, partition, rng.last + 1)], asynchronous=False
        )
        self.committed[partition] = rng.last + 1
        self.metrics.archived_offset.labels(self.topic, str(partition)).set(rng.last)
        return files

    def flush_all(self) -> None:
        for p in list(self.ranges):
            self.flush(p)

    def run(
        self,
        *,
        until_caught_up: bool = False,
        idle_s: float = 2.0,
        stopped: Callable[[], bool] = lambda: False,
        max_s: float | None = None,
    ) -> ArchiveStats:
        """Archive until ``stopped()``; with ``until_caught_up``, until nothing has arrived
        for ``idle_s`` and every assigned partition is read to its end (:meth:`_caught_up`)."""
        t0 = time.monotonic()
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.join_watch.waiting()
        last_msg = time.monotonic()
        try:
            while not stopped():
                self.health.beat()
                msgs = self.consumer.consume(num_messages=5000, timeout=0.2)
                self.join_watch.check()
                now = time.monotonic()
                for m in msgs:
                    if m.error() is not None:
                        continue
                    p, o = m.partition(), m.offset()
                    if p is not None and o is not None:
                        ts_type, ts_ms = m.timestamp()
                        created = ts_ms / 1000.0 if ts_type else None  # 0: not available
                        self.add(p, o, m.value(), m.key(), created)
                        self.next_offsets[p] = o + 1
                if msgs:
                    last_msg = now
                    self.metrics.records.inc(len(msgs))
                self.metrics.observe_lag(
                    self.group,
                    self.topic,
                    clients.lag_by_partition(self.consumer, self.topic, self.committed),
                )
                for p, rng in list(self.ranges.items()):
                    if now - rng.opened >= self.flush_interval_s:
                        self.flush(p)
                if until_caught_up and now - last_msg >= idle_s and self._caught_up():
                    break
                if max_s is not None and now - t0 >= max_s:
                    break
            self.flush_all()
        except BaseException:
            self._failed = True
            raise
        finally:
            self.stats.seconds = time.monotonic() - t0
            self.health.set_ready(False, "stopped")
            self.consumer.close()
        return self.stats

    def _caught_up(self) -> bool:
        """Every assigned partition is read to its end: its next offset is at least the
        reported end, and a read from there finds nothing.

        The reported end (high watermark) alone can be short: the embedded broker reports
        the last record batch's base offset + 1, which after an archiver was killed was
        below the offset it resumed at, so "caught up" held before any record was read and
        115 clicks were never archived. Reading past it is
        :func:`streamrec.kafka.clients.true_end_offsets` (on Apache Kafka it finds nothing and
        costs one short read when the archiver is idle).
        """
        parts = self.consumer.assignment()
        if not parts:
            return False
        # our own count, not consumer.position(): the position is unknown until a message
        # of the partition arrives in this run, and a partition with nothing new may get
        # none (it stalled --until-caught-up for minutes)
        positions = {
            (self.topic, tp.partition): self.next_offsets.get(tp.partition, 0) for tp in parts
        }
        for tp in parts:
            _, high = self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            # an end found by an earlier read counts too: no read again before it is reached
            if positions[(self.topic, tp.partition)] < max(high, self._ends.get(tp.partition, 0)):
                return False
        ends = clients.true_end_offsets(self.client_config, positions)
        self._ends.update({p: end for (_, p), end in ends.items()})
        return all(ends[k] <= positions[k] for k in positions)
