"""The native worker's changelog and checkpoint, in the order that makes a committed offset
imply durable results and every published answer imply a durable state:

* each batch, once applied: its state writes sent to the changelog (:meth:`Checkpoints.
  send_changelog`, a :class:`ChangelogTicket`); the batch's answers are published only once
  the broker has acknowledged them (``stages.py``). So after a kill -9, every click that was
  answered finds its state change in the changelog, and its redelivery is answered again
  with ``duplicate: true`` (before, a checkpoint sent the changelog once a second, and the
  answers of the last second were given again as first answers);
* every ``commit_interval_s``: the writes so far frozen (``flushing``; what is left unsent,
  the sweep's, is sent now) -> everything produced until then (outputs and changelog)
  acknowledged -> input offsets committed -> the frozen state written to RocksDB with the
  changelog offsets of the tickets it covers.

In the loop the middle step does not block: processing goes on, and the checkpoint completes
on the first loop turn that finds the producer empty (or blocks after a whole interval without
one); before a revoke and at shutdown it blocks. A crash anywhere replays events from the last
committed offset; the offsets kept in each state recognise the ones already applied.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamrec.engines.common import Outputs
from streamrec.engines.native.store import RocksDBPartition
from streamrec.metrics import Metrics

log = logging.getLogger(__name__)


class ChangelogTicket:
    """The changelog records of one send (a batch's state writes): how many the broker has
    not acknowledged yet, the last offset of each changelog partition, a refusal if any."""

    __slots__ = ("_lock", "failed", "offsets", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.offsets: dict[int, int] = {}
        self.failed: str | None = None
        # reports are served by whichever thread polls the producer (the loop's, or the
        # scoring thread's while it waits out a full queue)
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.pending <= 0

    def delivered(self, err: Any, msg: Any) -> None:
        with self._lock:
            self.pending -= 1
        if err is not None:
            self.failed = str(err)
            return
        p, o = msg.partition(), msg.offset()
        if o > self.offsets.get(p, -1):
            self.offsets[p] = o


@dataclass
class _Checkpoint:
    """A checkpoint begun: the input offsets it covers, when it began (monotonic), and the
    changelog sends whose writes it makes durable in RocksDB."""

    offsets: dict[int, int]
    started: float
    tickets: list[ChangelogTicket]


class Checkpoints:
    """Begins and finishes the checkpoints of the partitions in ``partitions`` (the worker's,
    live), committing input offsets of ``clicks`` through ``consumer``."""

    def __init__(
        self,
        consumer: Consumer,
        outputs: Outputs,
        partitions: Mapping[int, RocksDBPartition],
        clicks: str,
        changelog: str,
        metrics: Metrics,
    ) -> None:
        self.consumer = consumer
        self.outputs = outputs
        self.partitions = partitions
        self.clicks = clicks
        self.changelog = changelog
        self.metrics = metrics
        self.in_flight: _Checkpoint | None = None
        self._tickets: list[ChangelogTicket] = []  # sent since the last checkpoint began
        #: input partition -> the offset last committed (what the group's lag is measured from)
        self.committed: dict[int, int] = {}

    def send_changelog(self) -> ChangelogTicket:
        """Send every partition's writes not yet sent to the changelog (by the scoring stage
        after it stored a batch, or by the loop's thread with the pipeline drained); the
        ticket says when the broker has them."""
        ticket = ChangelogTicket()
        errors = self.outputs.errors

        def delivered(err: Any, msg: Any) -> None:
            ticket.delivered(err, msg)
            if err is not None:
                errors.append(f"{self.changelog}: {err}")

        writes = [(p, state.take_unsent()) for p, state in self.partitions.items()]
        # the whole count before the first record goes: a report served meanwhile by the
        # loop's thread must not find the ticket done half-way
        ticket.pending = sum(len(unsent) for _, unsent in writes)
        for p, unsent in writes:
            for key, value in unsent.items():
                self.outputs.produce(self.changelog, value, key, p, on_delivery=delivered)
        self._tickets.append(ticket)
        return ticket

    def begin(self, offsets: dict[int, int], started: float) -> None:
        """Freeze every partition's writes so far (sending what is still unsent), and note the
        input ``offsets`` they cover (the pipeline is drained: no batch is in flight)."""
        assert self.in_flight is None
        self.send_changelog()
        for state in self.partitions.values():
            state.begin_checkpoint()
        tickets, self._tickets = self._tickets, []
        self.in_flight = _Checkpoint(offsets, started, tickets)

    def finish(self, block: bool) -> bool:
        """Commit the input offsets and write the frozen states to RocksDB, once nothing
        produced before the checkpoint began is still unacknowledged. Without ``block`` it
        returns False instead of waiting (so the loop never stalls on the broker). Raises
        ``DeliveryError`` if the broker refused anything (then nothing may be committed)."""
        ck = self.in_flight
        if ck is None:
            return True
        producer = self.outputs.producer
        if block:
            self.outputs.wait()
        else:
            producer.poll(0)
            if len(producer) > 0:  # queued, in flight, or delivery reports not yet served
                return False
        self.outputs.raise_errors()
        if ck.offsets:
            self._commit_offsets(ck.offsets, block)
        ends: dict[int, int] = {}
        for ticket in ck.tickets:  # all acknowledged: the producer was empty
            for p, o in ticket.offsets.items():
                ends[p] = max(ends.get(p, -1), o)
        for p, state in self.partitions.items():
            state.commit(ends.get(p))
        self.in_flight = None
        self.metrics.checkpoint_seconds.observe(time.monotonic() - ck.started)
        return True

    def _commit_offsets(self, offsets: dict[int, int], block: bool) -> None:
        tps = [TopicPartition(self.clicks, p, o) for p, o in offsets.items()]
        try:
            # Asynchronous in the loop: a commit that fails is harmless (below), and this
            # thread should not wait a broker round trip every second. (Two calls: the
            # stub types `commit` by the literal value of `asynchronous`.)
            if block:
                self.consumer.commit(offsets=tps, asynchronous=False)
            else:
                self.consumer.commit(offsets=tps, asynchronous=True)
            self.committed.update(offsets)
        except KafkaException as exc:
            # e.g. a rebalance under way. Outputs and states are on the broker already;
            # whoever owns the partition next redoes these events and the offsets stored
            # in the states mark them as applied.
            log.warning("offset commit failed (%s); events will be re-read", exc)

    def forget(self, partition: int) -> None:
        """A lost partition: nothing of it is committed by this worker any more."""
        if self.in_flight is not None:
            self.in_flight.offsets.pop(partition, None)
        self.committed.pop(partition, None)
