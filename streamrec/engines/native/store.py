"""State of the native worker: one RocksDB per assigned partition, written at checkpoints.

The stack, smallest first:

* :class:`PartitionState`: one input partition's RocksDB (rocksdict, raw bytes) holding both
  tables under a prefix (``s/`` sessions, ``u/`` users), plus two layers of writes not yet in
  it: ``pending`` (since the last checkpoint began) and ``flushing`` (the checkpoint under way).
  Reads see ``pending``, then ``flushing``, then the database. A checkpoint moves ``pending`` to
  ``flushing`` (:meth:`PartitionState.begin_checkpoint`) and sends it to the changelog; once the
  broker has acknowledged it and the input offsets are committed, ``flushing`` is written to
  RocksDB together with the changelog offset it reached, in one atomic batch
  (:meth:`PartitionState.commit`). So the local database is never ahead of the changelog:
  after a crash it is at most behind, and recovery replays the changelog from the stored
  offset.
* :class:`TableView`: one table (sessions or users) across all assigned partitions, as the
  ``MutableMapping[str, bytes]`` that :class:`streamrec.serving.state.StateStore` wants. Writes are
  buffered and routed to their partition after the batch (:meth:`TableView.route`), because
  a key's partition is known for sure only once the core has seen its event.

The in-memory twin is a plain dict (``StateStore()``), which the core's tests use.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import cast

from rocksdict import Options, Rdict, WriteBatch

from streamrec.errors import StreamrecError
from streamrec.serving.state import ANON_NS, STATE_LAYOUT, USER_NS, BufferedTable

log = logging.getLogger(__name__)

SESSIONS = b"s/"
USERS = b"u/"
#: the last changelog offset whose record is in this database (absent: none)
_CHANGELOG_OFFSET = b"\x00changelog-offset"
#: the state key layout of this database (absent in layout 1: keys without namespace)
_LAYOUT = b"\x00layout"
#: the key prefixes of layout 2: sessions of users and of anonymous keys, users
_VALID_PREFIXES = (
    SESSIONS + USER_NS.encode(),
    SESSIONS + ANON_NS.encode(),
    USERS + USER_NS.encode(),
)


#: last-activity index: ``ts/<bucket><state key>`` (sessions), ``tu/<bucket><state key>``
#: (users); bucket = last event time // BUCKET_SECONDS as 8 bytes big-endian, so the index
#: lists states oldest first. Local only (derived from the states; rebuilt by recovery).
INDEX_SESSIONS = b"ts/"
INDEX_USERS = b"tu/"
BUCKET_SECONDS = 60.0
#: full passes of the sweep over an index before it scans again from the start
FLOOR_RESET = 64
_BUCKET = struct.Struct(">Q")
#: last_time sits at this byte offset in both state encodings (streamrec.serving.state headers)
_LAST_TIME = struct.Struct("<d")
_LAST_TIME_AT = 14


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
    if len(value) < _LAST_TIME_AT + 8:
        return None
    (t,) = _LAST_TIME.unpack_from(value, _LAST_TIME_AT)
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


class StateLayoutError(StreamrecError, RuntimeError):
    """A state database or changelog written under another state key layout."""


def _refuse(where: str, found: str) -> StateLayoutError:
    return StateLayoutError(
        f"{where} holds state of layout {found}; this streamrec writes layout {STATE_LAYOUT} "
        "(users under u:<user id>, anonymous sessions under a:<session id>) and does not "
        "read older layouts. Start from empty state: delete the state directory and the "
        "changelog topic, or use a new worker.app_id (open sessions restart; user histories "
        "are lost)."
    )


class PartitionState:
    """One assigned partition's RocksDB and its writes not yet checkpointed."""

    def __init__(self, path: Path, partition: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.partition = partition
        self.db = Rdict(str(path), options=Options(raw_mode=True))
        self.pending: dict[bytes, bytes | None] = {}  # None: delete
        self.flushing: dict[bytes, bytes | None] = {}
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
                raise _refuse(f"state directory {path}", "1")
            self.db.put(_LAYOUT, str(STATE_LAYOUT).encode())
        elif layout != str(STATE_LAYOUT).encode():
            self.db.close()
            raise _refuse(f"state directory {path}", layout.decode(errors="replace"))

    def _db_keys(self, prefix: bytes) -> Iterator[bytes]:
        for raw in self.db.keys(from_key=prefix):
            key = cast(bytes, raw)  # raw mode: keys are bytes
            if not key.startswith(prefix):
                break
            yield key

    # ---- reads and writes of the current interval -----------------------------------------
    def get(self, key: bytes) -> bytes | None:
        if key in self.pending:
            return self.pending[key]
        if key in self.flushing:
            return self.flushing[key]
        return self.db.get(key)

    def keys(self, prefix: bytes) -> Iterator[bytes]:
        """Keys under ``prefix`` (writes not yet in the database included, deletes excluded)."""
        pending, flushing = self.pending, self.flushing
        for key in self._db_keys(prefix):
            if key not in pending and key not in flushing:
                yield key
        for key, value in list(flushing.items()):
            if value is not None and key not in pending and key.startswith(prefix):
                yield key
        for key, value in list(pending.items()):
            if value is not None and key.startswith(prefix):
                yield key

    # ---- checkpoint and recovery ----------------------------------------------------------
    @property
    def changelog_offset(self) -> int:
        """Offset of the last changelog record applied here; -1 if none."""
        raw = self.db.get(_CHANGELOG_OFFSET)
        return int(raw) if raw is not None else -1

    def begin_checkpoint(self) -> dict[bytes, bytes | None]:
        """Freeze the writes so far as the checkpoint's (returned, to send to the changelog)."""
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
        for key, value in self.flushing.items():
            _write(batch, key, value)
        if changelog_offset is not None:
            batch.put(_CHANGELOG_OFFSET, str(changelog_offset).encode())
        self.db.write(batch)
        self.flushing = {}
        self._flushing_drops = set()

    def apply_changelog(self, records: Iterable[tuple[bytes | None, bytes | None, int]]) -> int:
        """Apply (key, value or None, offset) records read from the changelog; returns how many.
        A record without a key, or with a key of no state namespace, is refused."""
        batch = WriteBatch(raw_mode=True)
        n, last = 0, None
        for key, value, offset in records:
            if key is None or not key.startswith(_VALID_PREFIXES):
                shown = key if key is None else key[:60]
                raise _refuse(f"changelog record at offset {offset} (key {shown!r})", "1")
            _write(batch, key, value)
            n, last = n + 1, offset
        if last is not None:
            batch.put(_CHANGELOG_OFFSET, str(last).encode())
            self.db.write(batch)
        return n

    def discard_pending(self) -> None:
        """Forget every write not yet in the database (the partition went elsewhere)."""
        self.pending.clear()
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


class TableView(BufferedTable):
    """One table across the assigned partitions, with buffered writes.

    ``where`` (key -> partition) is shared by the session and user views of one batch: it is
    filled from the batch's message keys, and by every key found in a partition (reads and
    iteration), so a key's writes go back to the partition it was read from.
    """

    def __init__(
        self, partitions: Mapping[int, PartitionState], prefix: bytes, where: dict[str, int]
    ) -> None:
        super().__init__()
        self.partitions = partitions
        self.prefix = prefix
        self.where = where

    def _read_base(self, key: str) -> bytes | None:
        full = self.prefix + key.encode()
        part = self.where.get(key)
        if part is not None and part in self.partitions:
            return self.partitions[part].get(full)
        for p, state in self.partitions.items():
            value = state.get(full)
            if value is not None:
                self.where[key] = p
                return value
        return None

    def _base_keys(self) -> Iterator[str]:
        n = len(self.prefix)
        for p, state in list(self.partitions.items()):
            for full in state.keys(self.prefix):
                key = full[n:].decode()
                self.where.setdefault(key, p)
                yield key

    def route(self, partitions: Mapping[str, int]) -> int:
        """Move the buffered writes into their partitions' pending sets; returns how many were
        dropped because their partition is not (or no longer) assigned here."""
        dropped = 0
        for key, value in self.writes.items():
            part = partitions.get(key, self.where.get(key))
            state = self.partitions.get(part) if part is not None else None
            if state is None:
                dropped += 1
                log.warning("state write for %r skipped: partition %s not assigned", key, part)
                continue
            state.pending[self.prefix + key.encode()] = value
        self.writes.clear()
        return dropped
