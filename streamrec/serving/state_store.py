"""The state store: session and user states kept per input partition, behind one declared
interface (store -> partition -> checkpoint, as quix-streams arranges its state).

* :class:`StatePartition`: what the pipeline and the idle sweep need of one input
  partition's states: read a state, write (or delete) one, list a table's keys.
* :class:`CheckpointedPartition`: what an engine that keeps its own changelog needs beside:
  begin a checkpoint (the writes to send to the changelog), commit it, recover from the
  changelog, forget what was not checkpointed.
* Implementations: :class:`MemoryPartition` (the in-memory twin, used by the core's tests and
  benchmarks), ``streamrec.engines.native.store.RocksDBPartition`` (the native engine),
  ``streamrec.engines.faust.tables.FaustPartition`` (Faust tables; Faust checkpoints and
  recovers them itself, so it implements :class:`StatePartition` only).
* :class:`StateStore`: typed access (:class:`SessionState`, :class:`UserState`) to the
  partitions of one worker. Every state is addressed by (state key, partition), the
  partition being that of the records of the key's events (``BatchResult.key_partitions``):
  there is no other way of working out where a key lives.

Keys of the tables and of the changelog: ``s/<state key>`` (sessions), ``u/<state key>``
(users), the state key being namespaced (:func:`streamrec.serving.state.state_key`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from streamrec.serving.state import (
    ANON_NS,
    MAX_STATE_BYTES,
    SHADOW_NS,
    USER_NS,
    SessionState,
    StateDecodeError,
    UserState,
    layout_refused,
)

log = logging.getLogger(__name__)

#: the two tables, as the prefixes of their keys in a partition database and the changelog
SESSIONS = b"s/"
USERS = b"u/"
#: the key prefixes of state layout 2: sessions of users and of anonymous keys, users; and
#: the same for the states a shadow challenger keeps of its own (``streamrec.serving.arms``)
VALID_PREFIXES = tuple(
    table + arm + ns.encode()
    for arm in (b"", SHADOW_NS.encode())
    for table, ns in ((SESSIONS, USER_NS), (SESSIONS, ANON_NS), (USERS, USER_NS))
)
#: a changelog record as read back: (key, value or None for a delete, offset)
ChangelogRecord = tuple[bytes | None, bytes | None, int]
#: skipped changelog records a recovery sends to the dead-letter topic, per partition (a
#: flood of junk on the changelog costs counts, not memory)
DEAD_LETTERS_PER_RECOVERY = 100


@dataclass
class RecoveryTally:
    """What a partition's changelog recovery met: records applied, and records skipped
    because their key is no state key of this layout: ``old_layout`` (a table prefix without
    a namespace, as state layout 1 wrote them) or ``foreign`` (no key, or no table prefix:
    not written by a streamrec worker). A bad record is skipped, counted and kept for the
    dead-letter topic (the first of them), never the end of recovery: one stray record must
    not cost every user's history."""

    applied: int = 0
    old_layout: int = 0
    foreign: int = 0
    #: the first skipped key and its offset, for the log
    first_skipped: tuple[bytes | None, int] | None = None
    #: the first :data:`DEAD_LETTERS_PER_RECOVERY` skipped records, for the dead-letter
    #: topic (the engine sends them once recovery succeeded; the rest are only counted)
    to_dead_letter: list[ChangelogRecord] = field(default_factory=list)

    def skip(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        if key is not None and key.startswith((SESSIONS, USERS)):
            self.old_layout += 1
        else:
            self.foreign += 1
        if self.first_skipped is None:
            self.first_skipped = (key if key is None else key[:60], offset)
        if len(self.to_dead_letter) < DEAD_LETTERS_PER_RECOVERY:
            self.to_dead_letter.append((key, value, offset))

    @property
    def skipped(self) -> int:
        return self.old_layout + self.foreign

    def check_layout(self, where: str, had_state: bool) -> None:
        """Refuse a real layout-1 changelog: records of the old layout and not one of this
        layout, into a partition that held no state. (A changelog with any record of this
        layout was written by this streamrec, which never wrote the old layout beside it;
        its odd records are skipped.)"""
        if self.old_layout and not self.applied and not had_state:
            assert self.first_skipped is not None
            key, offset = self.first_skipped
            raise layout_refused(f"{where}: changelog record at offset {offset} (key {key!r})", "1")


def is_state_key(key: bytes | None) -> bool:
    """Whether ``key`` is a changelog key of this layout (``s/u:``, ``s/a:``, ``u/u:``)."""
    return key is not None and key.startswith(VALID_PREFIXES)


class StatePartition(Protocol):
    """The states of one input partition: what the pipeline and the sweep read and write."""

    def get(self, table: bytes, key: str) -> bytes | None:
        """The encoded state of ``key`` in ``table`` (:data:`SESSIONS`, :data:`USERS`)."""
        ...

    def write(self, table: bytes, key: str, value: bytes | None) -> None:
        """Store ``value`` under ``key`` (None deletes it)."""
        ...

    def keys(self, table: bytes) -> Iterator[str]:
        """The state keys of ``table`` (writes not yet durable included)."""
        ...


class CheckpointedPartition(StatePartition, Protocol):
    """A partition whose writes become durable at checkpoints, through a changelog topic.

    The engine's order: :meth:`begin_checkpoint` (send what it returns to the changelog) ->
    the broker acknowledges it and the outputs -> input offsets committed -> :meth:`commit`
    with the last changelog offset reached. :meth:`recover` replays changelog records read
    back (a new owner of the partition, a lost disk)."""

    @property
    def changelog_offset(self) -> int:
        """Offset of the last changelog record durable here; -1 if none."""
        ...

    def begin_checkpoint(self) -> Mapping[bytes, bytes | None]:
        """Freeze the writes since the last checkpoint; returns them (changelog key ->
        value, None for a delete) for the changelog."""
        ...

    def commit(self, changelog_offset: int | None) -> None:
        """Make the frozen writes durable, with the changelog offset they reached."""
        ...

    def recover(self, records: Iterable[ChangelogRecord]) -> int:
        """Apply changelog records; returns how many. Records whose key is no state key of
        this layout are skipped and counted in :attr:`tally`."""
        ...

    @property
    def tally(self) -> RecoveryTally:
        """What recovery met so far (applied, skipped)."""
        ...

    def discard_pending(self) -> None:
        """Forget every write not yet committed (the partition went to another worker)."""
        ...

    def close(self) -> None: ...


class MemoryPartition:
    """The in-memory twin of a partition (:class:`CheckpointedPartition`): one dict per table.

    Writes apply at once (memory is all the durability it has) and are also kept as the next
    checkpoint's changelog records; :meth:`commit` only records the offset, and
    :meth:`discard_pending` forgets those records (nothing to roll back: an in-memory
    partition is gone with its process anyway)."""

    def __init__(self) -> None:
        self.sessions: dict[str, bytes] = {}
        self.users: dict[str, bytes] = {}
        self._tables = {SESSIONS: self.sessions, USERS: self.users}
        # (table, key) -> value: made changelog keys at the checkpoint, not at every write
        self._pending: dict[tuple[bytes, str], bytes | None] = {}
        self._changelog_offset = -1
        self.tally = RecoveryTally()

    def get(self, table: bytes, key: str) -> bytes | None:
        return self._tables[table].get(key)

    def write(self, table: bytes, key: str, value: bytes | None) -> None:
        if value is None:
            self._tables[table].pop(key, None)
        else:
            self._tables[table][key] = value
        self._pending[(table, key)] = value

    def keys(self, table: bytes) -> Iterator[str]:
        return iter(list(self._tables[table]))

    @property
    def changelog_offset(self) -> int:
        return self._changelog_offset

    def begin_checkpoint(self) -> dict[bytes, bytes | None]:
        frozen, self._pending = self._pending, {}
        return {table + key.encode(): value for (table, key), value in frozen.items()}

    def commit(self, changelog_offset: int | None) -> None:
        if changelog_offset is not None:
            self._changelog_offset = changelog_offset

    def recover(self, records: Iterable[ChangelogRecord]) -> int:
        n = 0
        for key, value, offset in records:
            if key is None or not is_state_key(key):
                self.tally.skip(key, value, offset)
                continue
            table = self._tables[key[: len(SESSIONS)]]
            if value is None:
                table.pop(key[len(SESSIONS) :].decode(), None)
            else:
                table[key[len(SESSIONS) :].decode()] = value
            self._changelog_offset = offset
            n += 1
        self.tally.applied += n
        return n

    def discard_pending(self) -> None:
        self._pending = {}

    def close(self) -> None:
        pass


class _AcrossPartitions(Mapping[str, bytes]):
    """One table of every partition, read-only: for inspection (tests, tools). The pipeline
    never reads through it; it addresses each key's own partition."""

    def __init__(self, partitions: Mapping[int, StatePartition], table: bytes) -> None:
        self._partitions = partitions
        self._table = table

    def __getitem__(self, key: str) -> bytes:
        for part in list(self._partitions.values()):
            value = part.get(self._table, key)
            if value is not None:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for part in list(self._partitions.values()):
            for key in part.keys(self._table):
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: the partition number :meth:`StateStore.partitions` gives the in-memory twin, which holds the
#: states of every partition
ANY_PARTITION = -1


class StateStore:
    """Typed access to the session and user states of a worker's partitions.

    ``partitions`` maps input partition -> :class:`StatePartition` (the engine's, live: a
    partition assigned later is seen). Without it the store is the in-memory twin: one
    :class:`MemoryPartition` holding the states of every partition, so a key's records may
    come from any partition (the core's tests and benchmarks). A value that fails to decode
    is treated as absent and counted (:attr:`corrupt`) rather than stopping the worker; a
    write for a partition that is not there (not, or no longer, assigned) is dropped, logged
    and counted (:attr:`dropped`), never put elsewhere.
    """

    def __init__(self, partitions: Mapping[int, StatePartition] | None = None) -> None:
        self._twin = MemoryPartition() if partitions is None else None
        self._partitions: Mapping[int, StatePartition] = {} if partitions is None else partitions
        self.corrupt = 0
        self.dropped = 0

    # ---- partitions ---------------------------------------------------------------------
    def partition(self, partition: int | None) -> StatePartition | None:
        """The states of ``partition`` (None: not here). Only the twin, which holds every
        partition, may be asked without a partition."""
        if self._twin is not None:
            return self._twin
        if partition is None:
            raise ValueError("a store of several partitions needs the key's partition")
        return self._partitions.get(partition)

    def partitions(self) -> list[tuple[int, StatePartition]]:
        """Every partition held (the twin: one, numbered :data:`ANY_PARTITION`)."""
        if self._twin is not None:
            return [(ANY_PARTITION, self._twin)]
        return list(self._partitions.items())

    @property
    def sessions(self) -> Mapping[str, bytes]:
        """The encoded sessions of every partition by state key (the twin: its own dict)."""
        if self._twin is not None:
            return self._twin.sessions
        return _AcrossPartitions(self._partitions, SESSIONS)

    @property
    def users(self) -> Mapping[str, bytes]:
        """The encoded user states of every partition by state key (the twin: its dict)."""
        if self._twin is not None:
            return self._twin.users
        return _AcrossPartitions(self._partitions, USERS)

    # ---- typed reads and writes -----------------------------------------------------------
    def get_session(self, key: str, partition: int | None = None) -> SessionState | None:
        part = self._twin or self.partition(partition)
        raw = None if part is None else part.get(SESSIONS, key)
        if raw is None:
            return None
        try:
            return SessionState.from_bytes(raw)
        except StateDecodeError:
            self.corrupt += 1
            return None

    def get_user(self, key: str, partition: int | None = None) -> UserState | None:
        part = self._twin or self.partition(partition)
        raw = None if part is None else part.get(USERS, key)
        if raw is None:
            return None
        try:
            return UserState.from_bytes(raw)
        except StateDecodeError:
            self.corrupt += 1
            return None

    def has_session(self, key: str, partition: int | None = None) -> bool:
        part = self.partition(partition)
        return part is not None and part.get(SESSIONS, key) is not None

    def get_many(
        self, keys: Iterable[str], with_users: bool = True, partition: int | None = None
    ) -> tuple[dict[str, SessionState], dict[str, UserState]]:
        """The states of many keys of one partition."""
        sessions: dict[str, SessionState] = {}
        users: dict[str, UserState] = {}
        for k in keys:
            s = self.get_session(k, partition)
            if s is not None:
                sessions[k] = s
            if with_users:
                u = self.get_user(k, partition)
                if u is not None:
                    users[k] = u
        return sessions, users

    def put_session(
        self,
        key: str,
        state: SessionState,
        partition: int | None = None,
        max_bytes: int = MAX_STATE_BYTES,
    ) -> None:
        self._write(SESSIONS, key, state.to_bytes(max_bytes), partition)

    def put_user(
        self,
        key: str,
        state: UserState,
        partition: int | None = None,
        max_bytes: int = MAX_STATE_BYTES,
    ) -> None:
        self._write(USERS, key, state.to_bytes(max_bytes), partition)

    def delete_session(self, key: str, partition: int | None = None) -> None:
        self._delete(SESSIONS, key, partition)

    def delete_user(self, key: str, partition: int | None = None) -> None:
        self._delete(USERS, key, partition)

    def write(self, table: bytes, key: str, value: bytes | None, partition: int | None) -> None:
        """An encoded state (None: delete it) of ``table`` (:data:`SESSIONS`, :data:`USERS`)."""
        if value is None:
            self._delete(table, key, partition)
        else:
            self._write(table, key, value, partition)

    def iter_sessions(self) -> Iterator[tuple[str, SessionState]]:
        """Every decodable session of every partition (inspection, tests)."""
        for p, part in self.partitions():
            for key in part.keys(SESSIONS):
                s = self.get_session(key, p)
                if s is not None:
                    yield key, s

    def _write(self, table: bytes, key: str, value: bytes, partition: int | None) -> None:
        part = self._twin or self.partition(partition)
        if part is None:
            self.dropped += 1
            log.warning("state write for %r skipped: partition %s not assigned", key, partition)
            return
        part.write(table, key, value)

    def _delete(self, table: bytes, key: str, partition: int | None) -> None:
        part = self.partition(partition)
        if part is not None and part.get(table, key) is not None:
            part.write(table, key, None)
