"""A batch's state writes, made once the batch is scored, and the writes of batches in flight.

A session state ends with the answer to its last click (live metrics), which exists only once
the batch is scored; the pipeline encodes each changed state when it has advanced it
(:class:`StateWrite`, the answer still to come) and writes it after scoring
(:func:`write_states`, the answer added). So every state reaches the store once per batch,
answer included, and nothing is written twice.

The native worker applies batch N+1 while batch N is scored: the states batch N changed are
not in the store yet. :class:`InFlightStates` holds them for the apply step of the next batch
(its own thread) until the scoring thread has stored them.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from streamrec.serving.state import Answer, with_answer
from streamrec.serving.state_store import StateStore


@dataclass(slots=True)
class StateWrite:
    """One state write of a batch: ``value`` None deletes; ``answer``: the answer (not yet
    scored when the state was encoded) to add to a session state before it is stored."""

    table: bytes
    key: str
    partition: int
    value: bytes | None
    answer: Answer | None = None


def write_states(
    writes: Iterable[StateWrite], store: StateStore, max_bytes: int, stats: Counter[str]
) -> None:
    """Store a scored batch's writes, each session's answer added (left out, and counted as
    ``live_answers_dropped``, when the state would pass ``max_bytes`` with it)."""
    for w in writes:
        value = w.value
        if value is not None and w.answer is not None and w.answer.scored:
            full = with_answer(value, w.answer)
            if len(full) <= max_bytes:
                value = full
            else:
                stats["live_answers_dropped"] += 1
        store.write(w.table, w.key, value, w.partition)


class InFlightStates:
    """The last write of each state by batches applied but not yet stored.

    The apply thread adds a batch's writes (:meth:`add`) and drops those of batches stored
    since (:meth:`prune`); the scoring thread only says which batch it has stored
    (:meth:`stored`). Everything is stored once the pipeline is drained (:meth:`clear`)."""

    def __init__(self) -> None:
        self._writes: dict[tuple[bytes, str], tuple[int, StateWrite]] = {}
        self._batches: deque[tuple[int, list[StateWrite]]] = deque()
        self._stored = -1  # the last batch the scoring thread stored (an int: one store)

    def get(self, table: bytes, key: str, partition: int) -> StateWrite | None:
        found = self._writes.get((table, key))
        if found is None or found[1].partition != partition:
            return None
        return found[1]

    def add(self, seq: int, writes: list[StateWrite]) -> None:
        for w in writes:
            self._writes[(w.table, w.key)] = (seq, w)
        self._batches.append((seq, writes))

    def stored(self, seq: int) -> None:
        """Batch ``seq`` (and every one before it) is in the store."""
        self._stored = seq

    def prune(self) -> None:
        stored = self._stored
        while self._batches and self._batches[0][0] <= stored:
            seq, writes = self._batches.popleft()
            for w in writes:
                found = self._writes.get((w.table, w.key))
                if found is not None and found[0] == seq:
                    del self._writes[(w.table, w.key)]

    def clear(self) -> None:
        self._writes.clear()
        self._batches.clear()

    def __len__(self) -> int:
        return len(self._writes)
