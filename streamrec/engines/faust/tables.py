"""The Faust engine's state: the session and user Faust tables, one input partition at a time,
as a :class:`~streamrec.serving.state_store.StatePartition` (:class:`FaustPartition`).

* Faust tables take the changelog partition from "the current event". A batch mixes
  partitions, so each read and write of a partition is done under a stand-in event of that
  partition (:func:`in_partition`); a read then goes to that partition's RocksDB only.
* The batch runs in an executor thread, and Faust's changelog producer is not thread-safe:
  writes are kept in :attr:`FaustPartition.writes` (reads see them first) and applied on the
  event loop after the batch (:meth:`FaustPartition.apply`), which also notes them in the
  last-activity indexes of the sweep.
* Faust checkpoints the tables (RocksDB + changelog, flushed before it commits offsets) and
  rebuilds them from their changelogs itself, so this adapter implements the read/write part
  of the interface only, not :class:`~streamrec.serving.state_store.CheckpointedPartition`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, cast

from faust.streams import _current_event

from streamrec.engines.faust.idle import IdleIndex, indexed_time


class _PartitionEvent:
    """The minimum of an event that Faust tables read: ``message.topic``/``message.partition``."""

    class _Msg:
        __slots__ = ("partition", "topic")

        def __init__(self, topic: str, partition: int) -> None:
            self.topic, self.partition = topic, partition

    __slots__ = ("__weakref__", "message")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = self._Msg(topic, partition)


@contextlib.contextmanager
def in_partition(topic: str, partition: int) -> Iterator[None]:
    """Faust table access within this block goes to ``partition`` (of the input ``topic``)."""
    event = _PartitionEvent(topic, partition)
    token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]  # a stand-in event
    try:
        yield
    finally:
        _current_event.reset(token)


class FaustPartition:
    """One input partition of the Faust tables (``tables``: table prefix -> Faust table,
    :data:`~streamrec.serving.state_store.SESSIONS` / ``USERS``)."""

    def __init__(self, tables: Mapping[bytes, Any], topic: str, partition: int) -> None:
        self.tables = tables
        self.topic = topic
        self.partition = partition
        #: (table, key) -> value (None: delete), applied on the event loop by :meth:`apply`
        self.writes: dict[tuple[bytes, str], bytes | None] = {}

    def get(self, table: bytes, key: str) -> bytes | None:
        if (table, key) in self.writes:
            return self.writes[(table, key)]
        with in_partition(self.topic, self.partition):
            return cast(bytes | None, self.tables[table].data.get(key))

    def write(self, table: bytes, key: str, value: bytes | None) -> None:
        self.writes[(table, key)] = value

    def keys(self, table: bytes) -> Iterator[str]:
        """The keys in this partition's RocksDB (Faust's store keeps one per partition) and
        the writes not yet applied."""
        store: Any = self.tables[table].data  # faust.stores.rocksdb.Store
        written = {k: v for (t, k), v in self.writes.items() if t == table}
        db = store._dbs.get(self.partition)
        skip = store.offset_key
        for raw in [] if db is None else db.keys():
            if raw == skip:
                continue
            try:
                key = store._decode_key(raw)
            except Exception:  # not a key of this table
                continue
            if key not in written:
                yield key
        yield from (k for k, v in written.items() if v is not None)

    def apply(self, indexes: Mapping[bytes, IdleIndex]) -> None:
        """Write the buffered changes into the Faust tables, each under this partition, and
        note them in the last-activity indexes (event loop only)."""
        with in_partition(self.topic, self.partition):
            for (name, key), value in self.writes.items():
                table, index = self.tables[name], indexes[name]
                if value is None:
                    if key in table:
                        del table[key]
                    index.forget(key, self.partition)
                else:
                    table[key] = value
                    t = indexed_time(value)
                    if t is not None:
                        index.note(self.partition, key, t)
        self.writes.clear()
