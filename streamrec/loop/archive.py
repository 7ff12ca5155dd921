"""``streamrec archive``: the clicks topic, archived as Parquet files exactly once.

Layout: ``DIR/date=YYYY-MM-DD/hour=HH/p{P}-{FIRST:012d}-{LAST:012d}.parquet``. One file holds
the valid clicks of one contiguous offset range ``FIRST..LAST`` (inclusive) of partition ``P``
whose events fall in one event hour; records in the range that the worker dead-letters (or
``session_end`` markers) are skipped but their offsets still belong to the range. A flush
writes the file under a temporary name, fsyncs it, renames it, fsyncs the directory, and only
then commits ``LAST + 1``. On (re)assignment a partition resumes at the larger of the
committed offset and the end of its archived ranges, so a crash between the rename and the
commit does not write anything twice, and a crash before the rename leaves only a temporary
file that is ignored (and removed). Several archivers can share the group: each partition has
one owner at a time.

Storage: a local directory, or an fsspec URL (``s3://``, ``gs://``, ``hdfs://``, ...) where
the matching fsspec implementation (s3fs, gcsfs, pyarrow's HDFS) is installed; ``memory://``
is always there (tests). On an object store the rename is a copy + delete (not atomic), but
the temporary name is never read and the commit still follows the rename.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from streamrec.serving.events import ClickEvent, decode

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("SessionId", pa.string()),
        ("ItemId", pa.string()),
        ("Time", pa.float64()),
        ("UserId", pa.string()),
        ("event_id", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)
FILE_RE = re.compile(r"^p(\d+)-(\d+)-(\d+)\.parquet$")
TMP_PREFIX = ".tmp-"


class ArchiveError(RuntimeError):
    """The archive directory cannot be used (bad URL, missing fsspec implementation, ...)."""


# ----------------------------------------------------------------------------- storage


class Storage:
    """Where the files go: a local directory (fsync'd) or an fsspec filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = str(root)
        self.url = root
        self.fs: Any = None
        if "://" in root and not root.startswith("file://"):
            try:
                import fsspec

                self.fs, self.root = fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as exc:
                raise ArchiveError(
                    f"{root}: no fsspec implementation for this URL is installed ({exc})"
                ) from None
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self.root = root.removeprefix("file://")
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def list_files(self) -> list[str]:
        """Every path under the root (relative), temporary files included."""
        if self.fs is None:
            base = Path(self.root)
            return [str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()]
        base = self.root.rstrip("/") + "/"
        return [p.removeprefix(base) for p in self.fs.find(self.root)]

    def write_atomic(self, rel: str, table: pa.Table) -> None:
        """Temp name, fsync, rename, fsync of the directory."""
        final = self.join(rel)
        parent, name = final.rsplit("/", 1)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
        if self.fs is None:
            Path(parent).mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.fs.makedirs(parent, exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(table, f)
            self.fs.mv(tmp, final)

    def remove(self, rel: str) -> None:
        if self.fs is None:
            Path(self.join(rel)).unlink(missing_ok=True)
        else:
            self.fs.rm(self.join(rel))

    def open(self, rel: str) -> Any:
        return open(self.join(rel), "rb") if self.fs is None else self.fs.open(self.join(rel))


@dataclass(frozen=True)
class ArchiveFile:
    path: str  # relative to the archive root
    partition: int
    first: int
    last: int
    hour: str  # "YYYY-MM-DD/HH"


def list_archive(storage: Storage) -> list[ArchiveFile]:
    """The archive's finished files (temporary ones left out), by (partition, first offset)."""
    out = []
    for rel in storage.list_files():
        name = rel.rsplit("/", 1)[-1]
        m = FILE_RE.match(name)
        if not m:
            continue
        parts = rel.split("/")
        date = next((p[5:] for p in parts if p.startswith("date=")), "")
        hour = next((p[5:] for p in parts if p.startswith("hour=")), "")
        out.append(ArchiveFile(rel, int(m[1]), int(m[2]), int(m[3]), f"{date}/{hour}"))
    return sorted(out, key=lambda f: (f.partition, f.first))


def archived_end(files: list[ArchiveFile]) -> dict[int, int]:
    """Per partition, the offset after the last archived range."""
    end: dict[int, int] = {}
    for f in files:
        end[f.partition] = max(end.get(f.partition, 0), f.last + 1)
    return end


def hour_of(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d/%H")


def file_name(partition: int, first: int, last: int, hour: str) -> str:
    date, hh = hour.split("/")
    return f"date={date}/hour={hh}/p{partition}-{first:012d}-{last:012d}.parquet"


# ----------------------------------------------------------------------------- the archiver


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
        client_config: dict[str, Any],
        topic: str,
        directory: str,
        *,
        group: str = "streamrec-archiver",
        flush_events: int = 50_000,
        flush_interval_s: float = 10.0,
        session_timeout_ms: int = 6000,
        on_flush: Callable[[ArchiveFile], None] | None = None,
    ) -> None:
        from confluent_kafka import Consumer

        self.storage = Storage(directory)
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
        self.consumer = Consumer(
            {
                **client_config,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": session_timeout_ms,
                "heartbeat.interval.ms": min(1000, session_timeout_ms // 3),
                "fetch.wait.max.ms": 50,
                "log_level": 0,
            }
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
            self.buffers.pop(tp.partition, None)
        consumer.assign(parts)

    def _on_revoke(self, consumer: Any, parts: list[Any]) -> None:
        for tp in parts:
            if not self._failed:  # after a failure, leave the rest to the next owner
                self.flush(tp.partition)
            self.buffers.pop(tp.partition, None)
            self.next_offsets.pop(tp.partition, None)
        consumer.unassign()

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
            self.storage.write_atomic(rel, table)
            f = ArchiveFile(rel, partition, buf.first, buf.last, buf.hour)
            self.stats.files += 1
            self.stats.archived += len(buf.rows)
            if self.on_flush is not None:
                self.on_flush(f)
        # Only skipped records in the range: nothing to write, the commit alone records it
        # (a crash before it re-reads and re-skips them).
        self.consumer.commit(
            offsets=[TopicPartition(self.topic, partition, buf.last + 1)], asynchronous=False
        )
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


# ----------------------------------------------------------------------------- command


def archive_command() -> Any:
    import click

    @click.command("archive")
    @click.option("--dir", "directory", required=True, help="Archive directory or fsspec URL.")
    @click.option("--until-caught-up", is_flag=True, help="Exit once the end offsets are reached.")
    @click.option("--group", default=None, help="Consumer group (default: <app_id>-archiver).")
    @click.option("--flush-events", default=50_000, show_default=True, help="Rows per file, max.")
    @click.option("--flush-interval", default=10.0, show_default=True, help="Seconds per file.")
    @click.option("--idle", default=2.0, show_default=True, help="Idle s ending a catch-up.")
    def archive(
        directory: str,
        until_caught_up: bool,
        group: str | None,
        flush_events: int,
        flush_interval: float,
        idle: float,
    ) -> None:
        """Archive the clicks topic as Parquet, by event date and hour (exactly once)."""
        import signal

        from streamrec.cli.commands import ensure_service_topics
        from streamrec.settings import get_settings

        settings = get_settings()
        logging.basicConfig(
            level=settings.worker.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        ensure_service_topics(settings)
        try:
            archiver = Archiver(
                settings.kafka.confluent_config(),
                settings.topics.clicks,
                directory,
                group=group or f"{settings.worker.app_id}-archiver",
                flush_events=flush_events,
                flush_interval_s=flush_interval,
            )
        except ArchiveError as exc:
            raise click.ClickException(str(exc)) from None
        stop = [False]
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.__setitem__(0, True))
        click.echo(f"archiving {settings.topics.clicks} -> {directory}", err=True)
        st = archiver.run(until_caught_up=until_caught_up, idle_s=idle, stopped=lambda: stop[0])
        click.echo(
            f"archived {st.archived:,} clicks in {st.files} files ({st.skipped} skipped, "
            f"{st.records:,} records) in {st.seconds:.1f} s "
            f"({st.records / max(st.seconds, 1e-9):,.0f} records/s)",
            err=True,
        )

    return archive
