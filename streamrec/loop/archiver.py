"""The archiver behind ``streamrec archive``: the clicks topic into the archive, exactly once.

A consumer-group member (group ``<app_id>-archiver``; several archivers share the
partitions) that writes each partition's clicks to the archive (:mod:`streamrec.loop.archive`:
one file per contiguous offset range within one event hour) and commits ``LAST + 1`` only
after the file's rename. On (re)assignment a partition resumes at the larger of the committed
offset and the end of its archived ranges, so a crash between the rename and the commit does
not write anything twice, and a crash before the rename leaves only a temporary file that is
ignored (and removed at the next start). Clicks are validated by the worker's own
:func:`streamrec.serving.events.decode`: what the worker dead-letters is not archived.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from streamrec.kafka import clients
from streamrec.loop.archive import (
    SCHEMA,
    TMP_PREFIX,
    ArchiveFile,
    Storage,
    archived_end,
    file_name,
    hour_of,
    list_archive,
)
from streamrec.metrics import ArchiverMetrics
from streamrec.serving.events import ClickEvent, decode

log = logging.getLogger(__name__)


@dataclass
class _Buffer:
    """A partition's pending range: offsets first..last, the valid clicks among them."""

    first: int = -1
    last: int = -1
    hour: str = ""
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    opened: float = 0.0


@dataclass
class ArchiveStats:
    records: int = 0  # records read
    archived: int = 0  # rows written
    skipped: int = 0  # dead-lettered / session_end records
    files: int = 0
    seconds: float = 0.0


class Archiver:
    """A consumer-group member that writes its partitions' clicks to the archive.

    ``flush_events`` / ``flush_interval_s`` bound a file's size and age; a file is also cut
    where the event hour changes. ``crash_after_write`` (tests) makes :meth:`flush` raise
    between the rename and the commit.
    """

    def __init__(
        self,
        client_config: Mapping[str, Any],
        topic: str,
        directory: str,
        *,
        group: str = "streamrec-archiver",
        flush_events: int = 50_000,
        flush_interval_s: float = 10.0,
        on_flush: Callable[[ArchiveFile], None] | None = None,
        metrics: ArchiverMetrics | None = None,
    ) -> None:
        self.storage = Storage(directory)
        self.group = group
        self.metrics = metrics or ArchiverMetrics()
        self.health = self.metrics.health
        self.topic = topic
        self.flush_events = flush_events
        self.flush_interval_s = flush_interval_s
        self.on_flush = on_flush
        self.buffers: dict[int, _Buffer] = {}
        #: next offset to archive per assigned partition (known before any message arrives)
        self.next_offsets: dict[int, int] = {}
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

    def _clean_temporaries(self) -> None:
        for rel in self.storage.list_files():
            if rel.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                log.info("removing unfinished file %s", rel)
                self.storage.remove(rel)

    # -- assignment: resume after the archived ranges ---------------------------------------
    def _on_assign(self, consumer: Any, parts: list[Any]) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        ends = archived_end(list_archive(self.storage))
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
            self.buffers.pop(tp.partition, None)
        consumer.assign(parts)
        self.health.set_ready(True, f"{len(parts)} partitions assigned")

    def _on_revoke(self, consumer: Any, parts: list[Any]) -> None:
        for tp in parts:
            if not self._failed:  # after a failure, leave the rest to the next owner
                self.flush(tp.partition)
            self.buffers.pop(tp.partition, None)
            self.next_offsets.pop(tp.partition, None)
            self.committed.pop(tp.partition, None)
            self.metrics.forget_partition(self.topic, tp.partition)
        consumer.unassign()
        self.health.set_ready(False, "partitions revoked; waiting for the next assignment")

    # -- records ----------------------------------------------------------------------------
    def add(self, partition: int, offset: int, value: bytes | None, key: bytes | None) -> None:
        self.stats.records += 1
        ev = decode(value, topic=self.topic, partition=partition, offset=offset, key=key)
        buf = self.buffers.get(partition)
        if not isinstance(ev, ClickEvent) or ev.type != "click":
            # dead-lettered by the worker (or a session end): not archived, offset covered
            self.stats.skipped += 1
            if buf is None or buf.first < 0:
                buf = self.buffers[partition] = _Buffer(offset, offset, "", [], time.monotonic())
            buf.last = offset
            return
        t = ev.timestamp if ev.timestamp is not None else time.time()
        hour = hour_of(t)
        if buf is not None and buf.first >= 0 and buf.hour and buf.hour != hour:
            self.flush(partition)
            buf = None
        if buf is None or buf.first < 0:
            buf = self.buffers[partition] = _Buffer(offset, offset, hour, [], time.monotonic())
        buf.hour = buf.hour or hour
        buf.last = offset
        buf.rows.append((ev.session_id, ev.item_id, t, ev.user_id, ev.event_id, partition, offset))
        if len(buf.rows) >= self.flush_events:
            self.flush(partition)

    def flush(self, partition: int) -> ArchiveFile | None:
        """Write the partition's pending range, then commit the offset after it."""
        from confluent_kafka import TopicPartition

        buf = self.buffers.pop(partition, None)
        if buf is None or buf.first < 0:
            return None
        f = None
        if buf.rows:
            cols = list(zip(*buf.rows, strict=True))
            table = pa.Table.from_arrays(
                [pa.array(c, type=SCHEMA.field(i).type) for i, c in enumerate(cols)],
                schema=SCHEMA,
            )
            rel = file_name(partition, buf.first, buf.last, buf.hour)
            size = self.storage.write_atomic(rel, table)
            f = ArchiveFile(rel, partition, buf.first, buf.last, buf.hour)
            self.stats.files += 1
            self.stats.archived += len(buf.rows)
            self.metrics.observe_file(len(buf.rows), size)
            if self.on_flush is not None:
                self.on_flush(f)
        # Only skipped records in the range: nothing to write, the commit alone records it
        # (a crash before it re-reads and re-skips them).
        self.consumer.commit(
            offsets=[TopicPartition(self.topic, partition, buf.last + 1)], asynchronous=False
        )
        self.committed[partition] = buf.last + 1
        self.metrics.archived_offset.labels(self.topic, str(partition)).set(buf.last)
        return f

    def flush_all(self) -> None:
        for p in list(self.buffers):
            self.flush(p)

    def run(
        self,
        *,
        until_caught_up: bool = False,
        idle_s: float = 2.0,
        stopped: Callable[[], bool] = lambda: False,
        max_s: float | None = None,
    ) -> ArchiveStats:
        """Archive until ``stopped()``; with ``until_caught_up``, until the end offsets are
        reached and nothing more arrives for ``idle_s`` (the embedded broker reports end
        offsets short of the last batch, so the idle wait completes them)."""
        t0 = time.monotonic()
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_msg = time.monotonic()
        try:
            while not stopped():
                self.health.beat()
                msgs = self.consumer.consume(num_messages=5000, timeout=0.2)
                now = time.monotonic()
                for m in msgs:
                    if m.error() is not None:
                        continue
                    p, o = m.partition(), m.offset()
                    if p is not None and o is not None:
                        self.add(p, o, m.value(), m.key())
                        self.next_offsets[p] = o + 1
                if msgs:
                    last_msg = now
                    self.metrics.records.inc(len(msgs))
                self.metrics.observe_lag(
                    self.group,
                    self.topic,
                    clients.lag_by_partition(self.consumer, self.topic, self.committed),
                )
                for p, buf in list(self.buffers.items()):
                    if now - buf.opened >= self.flush_interval_s:
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
        parts = self.consumer.assignment()
        if not parts:
            return False
        for tp in parts:
            # our own count, not consumer.position(): the position is unknown until a message
            # of the partition arrives in this run, and a partition with nothing new may get
            # none (it stalled --until-caught-up for minutes)
            _, high = self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            if self.next_offsets.get(tp.partition, 0) < high:
                return False
        return True
