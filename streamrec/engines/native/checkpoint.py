"""The native worker's checkpoint, in the order that makes a committed offset imply durable
results:

state writes so far frozen and sent to the changelog -> everything produced until then
(outputs and changelog) acknowledged by the broker -> input offsets committed -> the frozen
state written to RocksDB with the changelog offset it reached.

In the loop the middle step does not block: processing goes on, and the checkpoint completes
on the first loop turn that finds the producer empty (or blocks after a whole interval without
one); before a revoke and at shutdown it blocks. A crash anywhere replays events from the last
committed offset; the offsets kept in each state recognise the ones already applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamrec.engines.common import Outputs
from streamrec.engines.native.store import RocksDBPartition
from streamrec.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class _Checkpoint:
    """A checkpoint begun: the input offsets it covers, and when it began (monotonic)."""

    offsets: dict[int, int]
    started: float


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
        self._changelog_end: dict[int, int] = {}  # changelog partition -> last offset delivered
        #: input partition -> the offset last committed (what the group's lag is measured from)
        self.committed: dict[int, int] = {}

    def on_delivered(self, msg: Any) -> None:
        """The producer's delivery report of any record (changelog ones are noted)."""
        if msg.topic() == self.changelog:
            p = msg.partition()
            self._changelog_end[p] = max(self._changelog_end.get(p, -1), msg.offset())

    def begin(self, offsets: dict[int, int], started: float) -> None:
        """Freeze every partition's writes so far, send them to the changelog, and note the
        input ``offsets`` they cover (the pipeline is drained: no batch is in flight)."""
        assert self.in_flight is None
        for p, state in self.partitions.items():
            for key, value in state.begin_checkpoint().items():
                self.outputs.produce(self.changelog, value, key, p)
        self.in_flight = _Checkpoint(offsets, started)

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
        for p, state in self.partitions.items():
            state.commit(self._changelog_end.pop(p, None))
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
        self._changelog_end.pop(partition, None)
        self.committed.pop(partition, None)
