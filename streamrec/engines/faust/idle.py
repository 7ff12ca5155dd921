"""The Faust engine's last-activity index: the states that may be idle, oldest first, so that
its idle sweep costs what expires rather than what is stored (the native engine keeps the same
index in its RocksDB, :mod:`streamrec.engines.native.store`).

Why in memory and not in the table's RocksDB: a Faust table is a key -> value mapping whose
every write goes to its changelog; it has no secondary index or ordered scan by anything but
the key, and a state restored from the changelog (or written by another worker before a
rebalance) reaches the local database without passing through this worker's code. So:

* every state write of this worker notes its key under the bucket (minute) of its last event
  time, moving it out of its previous bucket; every delete forgets it (:meth:`IdleIndex.note`,
  :meth:`IdleIndex.forget`): a key sits in one bucket, memory is about 200 B per state;
* after each rebalance the index starts empty and the active partitions' databases are read
  once, in bounded steps, taking only the key and the 8 bytes of last event time of each value
  (:meth:`IdleIndex.seed`); a state is swept once its partition has been seeded;
* the sweep pops whole buckets that ended at or before the cutoff (:meth:`IdleIndex.idle`);
  the core then reads each state and checks it is idle before it ends or expires it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from streamrec.serving.state import encoded_last_time

#: bucket width of the index (s); a bucket is swept once it ends before the cutoff
BUCKET_SECONDS = 60.0


def indexed_time(value: bytes) -> float | None:
    """The last event time an encoded state is indexed under (None: not indexed: too short
    to be a state, or a time that is not finite)."""
    t = encoded_last_time(value)
    return t if t is not None and math.isfinite(t) else None


def _bucket(t: float) -> int:
    return max(0, int(t // BUCKET_SECONDS)) if math.isfinite(t) else 0


class _Partition:
    __slots__ = ("buckets", "heap", "where")

    def __init__(self) -> None:
        self.where: dict[str, int] = {}  # key -> its bucket
        self.buckets: dict[int, set[str]] = {}  # bucket -> keys
        self.heap: list[int] = []  # the buckets, smallest first (each pushed once)


class IdleIndex:
    """Keys of one table by partition and bucket of last event time (see the module doc)."""

    def __init__(self) -> None:
        self._parts: dict[int, _Partition] = {}
        #: partition -> key to go on from (b"" at the start) while its database is read
        self._seeding: dict[int, bytes] = {}
        self._seeded: set[int] = set()

    def __len__(self) -> int:
        return sum(len(p.where) for p in self._parts.values())

    def note(self, partition: int, key: str, last_time: float) -> None:
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Partition()
        b = _bucket(last_time)
        old = part.where.get(key)
        if old == b:
            return
        if old is not None:
            self._drop(part, key, old)
        part.where[key] = b
        keys = part.buckets.get(b)
        if keys is None:
            keys = part.buckets[b] = set()
            heapq.heappush(part.heap, b)
        keys.add(key)

    def forget(self, key: str, partition: int | None = None) -> None:
        parts = [self._parts[partition]] if partition in self._parts else self._parts.values()
        for part in parts:
            b = part.where.pop(key, None)
            if b is not None:
                self._drop(part, key, b, popped=True)

    @staticmethod
    def _drop(part: _Partition, key: str, b: int, popped: bool = False) -> None:
        if not popped:
            part.where.pop(key, None)
        keys = part.buckets.get(b)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del part.buckets[b]  # its heap entry is skipped when it comes up

    def idle(self, partition: int, before: float, limit: int) -> tuple[list[str], bool]:
        """Up to ``limit`` keys of ``partition`` whose bucket ended at or before ``before``,
        oldest first, taken out of the index (a state written again is noted again). Returns
        (keys, whether more may remain)."""
        part = self._parts.get(partition)
        if part is None:
            return [], False
        end = _bucket(before) if before > 0 else 0  # buckets b < end ended by `before`
        out: list[str] = []
        while part.heap and part.heap[0] < end:
            b = part.heap[0]
            keys = part.buckets.get(b)
            if not keys:
                heapq.heappop(part.heap)
                part.buckets.pop(b, None)
                continue
            while keys and len(out) < limit:
                key = keys.pop()
                del part.where[key]
                out.append(key)
            if keys:
                return out, True  # the limit is reached inside this bucket
            heapq.heappop(part.heap)
            del part.buckets[b]
            if len(out) >= limit:
                return out, bool(part.heap and part.heap[0] < end)
        return out, False

    # ---- seeding from the local databases, after each rebalance -----------------------------
    def reset(self, partitions: Iterable[int]) -> None:
        """Forget everything; the given (active) partitions are to be seeded."""
        self._parts.clear()
        self._seeded.clear()
        self._seeding = {p: b"" for p in partitions}

    def seeded(self, partition: int) -> bool:
        return partition in self._seeded

    @property
    def seeding(self) -> bool:
        return bool(self._seeding)

    def seed(
        self,
        dbs: Mapping[int, Any],
        decode_key: Callable[[bytes], str],
        limit: int,
        skip: Iterable[bytes] = (),
    ) -> int:
        """Read up to ``limit`` records of the partitions still to seed from their databases
        (``dbs``: partition -> rocksdict ``Rdict`` in raw mode, as Faust opens them), in key
        order from where the last call stopped, and note them. Keys already noted since the
        reset keep their entry (a write of this worker is newer than what the scan read);
        records in ``skip`` (Faust's own offset key) or that are not states are passed over.
        Returns the number of records read."""
        skipped = set(skip)
        done = 0
        for p in list(self._seeding):
            db = dbs.get(p)
            if db is None:  # no database open for it (Faust opens every active one): empty
                del self._seeding[p]
                self._seeded.add(p)
                continue
            start = self._seeding[p]
            part = self._parts.get(p)
            finished = True
            for raw_key, value in db.items(from_key=start) if start else db.items():
                if done >= limit:
                    self._seeding[p] = raw_key
                    finished = False
                    break
                done += 1
                if raw_key in skipped or not isinstance(value, bytes):
                    continue
                t = indexed_time(value)
                if t is None:
                    continue
                try:
                    key = decode_key(raw_key)
                except Exception:  # not a key of this table: not a state
                    continue
                if part is not None and key in part.where:
                    continue
                self.note(p, key, t)
                part = self._parts.get(p)
            if not finished:
                return done
            del self._seeding[p]
            self._seeded.add(p)
        return done
