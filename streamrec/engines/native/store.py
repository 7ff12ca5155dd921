"""State of the native worker: one RocksDB per assigned partition, written at checkpoints.

:class:`RocksDBPartition` is the native engine's
:class:`~streamrec.serving.state_store.CheckpointedPartition`: one input partition's RocksDB
(rocksdict, raw bytes) holding both tables under a prefix (``s/`` sessions, ``u/`` users),
plus two layers of writes not yet in it: ``pending`` (since the last checkpoint began) and
``flushing`` (the checkpoint under way). The pipeline writes into ``pending`` directly (its
:class:`~streamrec.serving.state_store.StateStore` addresses each key's partition). Reads see
``pending``, then ``flushing``, then the database. A checkpoint moves ``pending`` to
``flushing`` (:meth:`RocksDBPartition.begin_checkpoint`) and sends it to the changelog; once
the broker has acknowledged it and the input offsets are committed, ``flushing`` is written
to RocksDB together with the changelog offset it reached, in one atomic batch
(:meth:`RocksDBPartition.commit`). So the local database is never ahead of the changelog:
after a crash it is at most behind, and recovery replays the changelog from the stored
offset.

The database also holds the last-activity index the idle sweep reads
(:meth:`RocksDBPartition.idle_candidates`). The in-memory twin of this class is
:class:`streamrec.serving.state_store.MemoryPartition`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from rocksdict import Options, Rdict, WriteBatch

from streamrec.serving.state import STATE_LAYOUT, encoded_last_time, layout_refused
from streamrec.serving.state_store import (
    SESSIONS,
    USERS,
    ChangelogRecord,
    RecoveryTally,
    is_state_key,
)

#: the last changelog offset whose record is in this database (absent: none)
_CHANGELOG_OFFSET = b"\x00changelog-offset"
#: the state key layout of this database (absent in layout 1: keys without namespace)
_LAYOUT = b"\x00layout"
#: how many sessions and users the database holds ("<sessions>,<users>"), written with every
#: batch that changes them (absent in a database written before it: counted at open)
_COUNTS = b"\x00state-counts"


#: last-activity index: ``ts/<bucket><state key>`` (sessions), ``tu/<bucket><state key>``
#: (users); bucket = last event time // BUCKET_SECONDS as 8 bytes big-endian, so the index
#: lists states oldest first. Local only (derived from the states; rebuilt by recovery).
INDEX_SESSIONS = b"ts/"
INDEX_USERS = b"tu/"
BUCKET_SECONDS = 60.0
#: full passes of the sweep over an index before it scans again from the start
FLOOR_RESET = 64
_BUCKET = struct.Struct(">Q")


def _bucket(t: float) -> int:
    if not math.isfinite(t) or t <= 0:
        return 0
    return min(int(t // BUCKET_SECONDS), 2**63)


def index_entry(key: bytes, value: bytes) -> bytes | None:
    """The index key of a state record (``s/...`` or ``u/...``), from its last event time."""
    if key.startswith(SESSIONS):
        prefix, n = INDEX_SESSIONS, len(SESSIONS)
    elif key.startswith(USERS):
        prefix, n = INDEX_USERS, len(USERS)
    else:
        return None
    t = encoded_last_time(value)
    if t is None:
        return None
    return prefix + _BUCKET.pack(_bucket(t)) + key[n:]


def _write(batch: WriteBatch, key: bytes, value: bytes | None) -> None:
    """One state write into ``batch``: a delete (``None``), or the value and its
    last-activity index entry (checkpoint commits and changelog recovery write alike)."""
    if value is None:
        batch.delete(key)
        return
    batch.put(key, value)
    entry = index_entry(key, value)
    if entry is not None:
        batch.put(entry, b"")


class RocksDBPartition:
    """One assigned partition's RocksDB and its writes not yet checkpointed."""

    def __init__(self, path: Path, partition: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.partition = partition
        self.db = Rdict(str(path), options=Options(raw_mode=True))
        # Two layers, because of the checkpoint order, not of where writes come from: the
        # writes of a checkpoint under way (``flushing``) are on their way to the changelog
        # and may reach RocksDB only once the broker has them and the input offsets are
        # committed; writes made meanwhile (``pending``, the batches go on) belong to the
        # next checkpoint. One layer would either write state to RocksDB ahead of its
        # changelog (a crash then leaves the database ahead of what recovery replays) or
        # stop processing until the broker acknowledges.
        self.pending: dict[bytes, bytes | None] = {}  # None: delete
        self.flushing: dict[bytes, bytes | None] = {}
        #: writes not yet sent to the changelog: every batch's are sent once it is applied,
        #: and its answers are published only once the broker has them (checkpoint.py)
        self.unsent: dict[bytes, bytes | None] = {}
        #: index entries examined by the sweep, deleted with the next checkpoint's writes
        #: (with the state deletes they go with, never before them)
        self.index_drops: set[bytes] = set()
        self._flushing_drops: set[bytes] = set()
        self._cursor: dict[bytes, bytes] = {}  # index prefix -> where the sweep goes on
        # index prefix -> below this, every entry was examined by a finished pass (a scan
        # starts there instead of wading through the tombstones of dropped entries); reset
        # every FLOOR_RESET passes, so an entry written later below it (an old event time)
        # is still found
        self._floor: dict[bytes, bytes] = {}
        self._passes = 0
        layout = cast(bytes | None, self.db.get(_LAYOUT))
        if layout is None:
            if any(True for _ in self._db_keys(SESSIONS)) or any(
                True for _ in self._db_keys(USERS)
            ):
                self.db.close()
                raise layout_refused(f"state directory {path}", "1")
            self.db.put(_LAYOUT, str(STATE_LAYOUT).encode())
        elif layout != str(STATE_LAYOUT).encode():
            self.db.close()
            raise layout_refused(f"state directory {path}", layout.decode(errors="replace"))
        self.tally = RecoveryTally()
        self._opened_at = self.changelog_offset
        #: sessions and users in the database (writes not yet committed are not counted)
        self.counts = self._stored_counts()

    def _stored_counts(self) -> dict[bytes, int]:
        raw = cast(bytes | None, self.db.get(_COUNTS))
        if raw is not None:
            sessions, users = raw.split(b",")
            return {SESSIONS: int(sessions), USERS: int(users)}
        return {t: sum(1 for _ in self._db_keys(t)) for t in (SESSIONS, USERS)}

    def _changes(self, final: dict[bytes, bytes | None]) -> dict[bytes, int]:
        """How the writes ``final`` (key -> last value, None: deleted) change the counts of
        the database (one multi-get of the keys)."""
        keys = [k for k in final if k.startswith((SESSIONS, USERS))]
        change = {SESSIONS: 0, USERS: 0}
        if keys:
            before = cast(list[bytes | None], self.db.get(list[Any](keys)))
            for key, old in zip(keys, before, strict=True):
                change[key[: len(SESSIONS)]] += (final[key] is not None) - (old is not None)
        return change

    def _write_counts(self, batch: WriteBatch, final: dict[bytes, bytes | None]) -> None:
        """Apply the count changes of ``final`` and store the counts in ``batch`` (with the
        writes, so they never disagree)."""
        for table, change in self._changes(final).items():
            self.counts[table] += change
        n = self.counts
        batch.put(_COUNTS, f"{n[SESSIONS]},{n[USERS]}".encode())

    def state_counts(self) -> tuple[int, int]:
        """(sessions, users) held, writes not yet checkpointed included (for the metrics:
        one multi-get of the keys written since the last checkpoint)."""
        pending, flushing = self.pending, self.flushing  # see get()
        change = self._changes({**flushing, **pending})
        return self.counts[SESSIONS] + change[SESSIONS], self.counts[USERS] + change[USERS]

    def _db_keys(self, prefix: bytes) -> Iterator[bytes]:
        for raw in self.db.keys(from_key=prefix):
            key = cast(bytes, raw)  # raw mode: keys are bytes
            if not key.startswith(prefix):
                break
            yield key

    # ---- reads and writes of the current interval -----------------------------------------
    def get(self, table: bytes, key: str) -> bytes | None:
        full = table + key.encode()
        # local references: a commit in the main thread may replace ``flushing`` while the
        # state thread reads (the old dict stays whole, and the database has its values)
        pending, flushing = self.pending, self.flushing
        if full in pending:
            return pending[full]
        if full in flushing:
            return flushing[full]
        return cast(bytes | None, self.db.get(full))

    def write(self, table: bytes, key: str, value: bytes | None) -> None:
        full = table + key.encode()
        self.pending[full] = value
        self.unsent[full] = value

    def take_unsent(self) -> dict[bytes, bytes | None]:
        """The writes since the last call, for the changelog (the last value of each key)."""
        unsent, self.unsent = self.unsent, {}
        return unsent

    def keys(self, table: bytes) -> Iterator[str]:
        """State keys of ``table`` (writes not yet in the database included, deletes
        excluded)."""
        pending, flushing = self.pending, self.flushing
        n = len(table)
        for key in self._db_keys(table):
            if key not in pending and key not in flushing:
                yield key[n:].decode()
        for key, value in list(flushing.items()):
            if value is not None and key not in pending and key.startswith(table):
                yield key[n:].decode()
        for key, value in list(pending.items()):
            if value is not None and key.startswith(table):
                yield key[n:].decode()

    # ---- checkpoint and recovery ----------------------------------------------------------
    @property
    def changelog_offset(self) -> int:
        """Offset of the last changelog record applied here; -1 if none."""
        raw = self.db.get(_CHANGELOG_OFFSET)
        return int(raw) if raw is not None else -1

    def begin_checkpoint(self) -> dict[bytes, bytes | None]:
        """Freeze the writes so far as the checkpoint's (returned; the native engine has sent
        them to the changelog batch by batch already, :meth:`take_unsent`)."""
        assert not self.flushing, "the previous checkpoint has not been committed"
        self.flushing, self.pending = self.pending, {}
        self._flushing_drops |= self.index_drops
        self.index_drops = set()
        return self.flushing

    def commit(self, changelog_offset: int | None) -> None:
        """Write the checkpoint's changes (on the changelog by now) durably, in one batch."""
        if not self.flushing and changelog_offset is None and not self._flushing_drops:
            return
        batch = WriteBatch(raw_mode=True)
        for entry in self._flushing_drops:
            batch.delete(entry)
        self._write_counts(batch, self.flushing)
        for key, value in self.flushing.items():
            _write(batch, key, value)
        if changelog_offset is not None:
            batch.put(_CHANGELOG_OFFSET, str(changelog_offset).encode())
        self.db.write(batch)
        self.flushing = {}
        self._flushing_drops = set()

    def recover(self, records: Iterable[ChangelogRecord]) -> int:
        """Apply (key, value or None, offset) records read from the changelog; returns how many.
        A record without a key, or with a key of no state namespace, is skipped and counted
        (:attr:`tally`); the stored changelog offset moves only with applied records, so a
        refused layout-1 changelog is met again at the next start."""
        batch = WriteBatch(raw_mode=True)
        n, last = 0, None
        final: dict[bytes, bytes | None] = {}
        for key, value, offset in records:
            if key is None or not is_state_key(key):
                self.tally.skip(key, value, offset)
                continue
            _write(batch, key, value)
            final[key] = value
            n, last = n + 1, offset
        if last is not None:
            self._write_counts(batch, final)
            batch.put(_CHANGELOG_OFFSET, str(last).encode())
            self.db.write(batch)
        self.tally.applied += n
        return n

    @property
    def held_state(self) -> bool:
        """Whether the database held changelog state when it was opened (a kept disk)."""
        return self._opened_at >= 0

    def discard_pending(self) -> None:
        """Forget every write not yet in the database (the partition went elsewhere)."""
        self.pending.clear()
        self.unsent.clear()
        self.flushing = {}
        self.index_drops = set()
        self._flushing_drops = set()
        self._cursor.clear()

    # ---- the last-activity index ------------------------------------------------------------
    def idle_candidates(self, prefix: bytes, before: float, limit: int) -> tuple[list[str], bool]:
        """Up to ``limit`` state keys whose index entry lies in a bucket that ended at or
        before ``before`` (every state still in such a bucket is idle since then), oldest
        first; their entries are dropped at the next checkpoint (a state written since has an
        entry of its own). Returns (keys, whether more may remain). Work is proportional to
        ``limit``: the scan goes on where the last call stopped."""
        end_bucket = _bucket(before) if before > 0 else 0
        # buckets b with (b + 1) * BUCKET_SECONDS <= before, i.e. b < floor(before / W)
        stop = prefix + _BUCKET.pack(end_bucket)
        start = self._cursor.get(prefix) or self._floor.get(prefix, prefix)
        keys: list[str] = []
        n = len(prefix) + _BUCKET.size
        more = False
        for raw in self.db.keys(from_key=start):
            entry = cast(bytes, raw)  # raw mode: keys are bytes
            if not entry.startswith(prefix) or entry >= stop:
                break
            if entry in self.index_drops or entry in self._flushing_drops:
                continue
            if len(keys) >= limit:
                more = True
                self._cursor[prefix] = entry
                break
            self.index_drops.add(entry)
            try:
                keys.append(entry[n:].decode())
            except UnicodeDecodeError:
                continue
        if not more:
            self._cursor.pop(prefix, None)
            self._passes += 1
            if self._passes % FLOOR_RESET == 0:
                self._floor.pop(prefix, None)
            else:
                self._floor[prefix] = max(self._floor.get(prefix, prefix), stop)
        return keys, more

    def close(self) -> None:
        self.db.close()
