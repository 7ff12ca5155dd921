"""The native worker's three-stage pipeline. Batches go in order through:

1. apply: :func:`streamrec.serving.pipeline.apply_batch` (decode, advance the states, encode
   the changed ones) in a state thread;
2. score: :func:`streamrec.serving.pipeline.finish_batch` (one matmul + top-k per arm, the
   live metrics, the state writes, answers included, into the partitions' pending writes)
   in a scoring thread. Until a batch's states are stored, the next batch's apply step reads
   them from :class:`~streamrec.serving.writes.InFlightStates`;
3. publish: recommendations and dead letters handed to the C producer (asynchronous), in
   the caller's (the poll loop's) thread, once the broker has acknowledged the batch's state
   writes on the changelog (sent when it is scored and stored: ``checkpoint.ChangelogTicket``), so
   no answer is ever published for a state change that a crash could lose: a redelivered
   click finds it and is answered with ``duplicate: true``.

The stages overlap across batches: torch releases the GIL, so batch N's scoring runs on one
core while batch N+1 is applied and batch N-1 published on the other. Batch N+1 is applied
only after batch N's apply has finished, so a key's events apply in offset order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from streamrec.engines.common import DeliveryError, Outputs
from streamrec.engines.live import LiveMetrics
from streamrec.engines.native.checkpoint import ChangelogTicket
from streamrec.metrics import Metrics
from streamrec.serving.arms import ArmModels, Arms
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.input_topic import InputTopic
from streamrec.serving.pipeline import AppliedBatch, apply_batch, finish_batch
from streamrec.serving.records import BatchResult, Record
from streamrec.serving.state_store import StateStore
from streamrec.serving.writes import InFlightStates

log = logging.getLogger(__name__)


def to_records(messages: list[Any]) -> list[Record]:
    """confluent-kafka messages as the pipeline's records (errors logged and left out)."""
    received = time.time()
    records = []
    for m in messages:
        err = m.error()
        if err is not None:
            log.warning("consumer: %s", err)
            continue
        ts_type, ts_ms = m.timestamp()
        records.append(
            Record(
                m.value(),
                m.key(),
                m.topic(),
                m.partition(),
                m.offset(),
                ts_ms / 1000.0 if ts_type else None,  # 0: TIMESTAMP_NOT_AVAILABLE
                received,
            )
        )
    return records


@dataclass
class _InFlight:
    """A batch whose core runs in the state thread."""

    records: list[Record]
    future: Future[AppliedBatch]  # the weights that advanced the states score them too
    seq: int


@dataclass
class _Scoring:
    """A batch applied and being scored; the scoring stores its states and sends them to the
    changelog (the future's ticket)."""

    n_records: int
    future: Future[tuple[BatchResult, ChangelogTicket]]


class Stages:
    """The batches in flight through apply -> score -> publish, and the input offsets they
    have passed (what the next checkpoint commits)."""

    def __init__(
        self,
        store: StateStore,
        arms: Arms,
        config: CoreConfig,
        clock: StreamClock,
        outputs: Outputs,
        metrics: Metrics,
        send_changelog: Callable[[], ChangelogTicket],
        topic: InputTopic,
        live: LiveMetrics | None = None,
    ) -> None:
        self.store = store
        self.live = live
        self.arms = arms
        self.send_changelog = send_changelog
        self.topic = topic
        self.config = config
        self.clock = clock
        self.outputs = outputs
        self.metrics = metrics
        self.apply_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-apply")
        self.score_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-score")
        self._applying: _InFlight | None = None
        self._scoring: deque[_Scoring] = deque()
        self._next_offsets: dict[int, int] = {}  # input partition -> offset to commit
        self.in_flight = InFlightStates()  # states applied and not yet stored
        self._seq = 0  # batches applied so far

    @property
    def busy(self) -> bool:
        return self._applying is not None or bool(self._scoring)

    def start(self, records: list[Record]) -> None:
        """Stage 1 in the state thread: apply the batch to the states (the core without the
        scoring)."""
        assert self._applying is None
        self._seq += 1
        future = self.apply_thread.submit(
            apply_batch,
            records,
            self.store,
            self.models(),
            self.config,
            clock=self.clock,
            in_flight=self.in_flight,
            seq=self._seq,
            topic=self.topic,
        )
        self._applying = _InFlight(records, future, self._seq)

    def models(self) -> ArmModels:
        """The models of the next batch."""
        return self.arms.models()

    def finish_apply(self) -> None:
        """Wait for stage 1, send its state writes to the changelog, note the offsets, and
        queue stage 2 (scoring)."""
        batch, self._applying = self._applying, None
        if batch is None:
            return
        applied = batch.future.result()
        for r in batch.records:  # records are in offset order per partition
            self._next_offsets[r.partition] = r.offset + 1
        scored = self.score_thread.submit(self._finish, applied, batch.seq)
        self._scoring.append(_Scoring(len(batch.records), scored))

    def _finish(self, applied: AppliedBatch, seq: int) -> tuple[BatchResult, ChangelogTicket]:
        """Stage 2 (scoring thread): score, measure, store, and send the batch's state writes
        to the changelog (this thread is the only one that writes the store while batches
        are in flight); then the next batches read these states from the store again."""
        res = finish_batch(applied, self.store, self.config)
        if self.live is not None:
            # the batch's live counts are durable before its states are (the changelog): a
            # click whose state survives a kill -9 is a duplicate after it, never counted
            # again, so its count must not be lost (streamrec.engines.live: counted once)
            self.live.add(res)
            self.live.publish(flush=True)
        ticket = self.send_changelog()
        self.in_flight.stored(seq)
        return res, ticket

    def publish_scored(self, block: bool) -> None:
        """Stage 3: hand scored batches to the producer, oldest first (asynchronous; delivered
        before the offsets are committed, at the checkpoint), each once its changelog writes
        are acknowledged. Waits for the oldest if ``block`` or if two are queued (bounds the
        pipeline)."""
        while self._scoring:
            oldest = self._scoring[0]
            ready = oldest.future.done() and oldest.future.result()[1].done
            if not (ready or block or len(self._scoring) > 1):
                return
            self._scoring.popleft()
            res, ticket = oldest.future.result()
            self._await_changelog(ticket)
            self.outputs.publish(res)
            self.metrics.observe_batch(
                oldest.n_records, res.stats, res.latencies(), res.model_seconds
            )

    def _await_changelog(self, ticket: ChangelogTicket) -> None:
        """Serve delivery reports until the broker has acknowledged ``ticket``; a refusal
        stops the worker before the batch's answers go out (nothing committed)."""
        producer = self.outputs.producer
        while not ticket.done:
            producer.poll(0.005)
            self.outputs.heartbeat()  # waiting for the broker is not a hung loop
        if ticket.failed is not None:
            raise DeliveryError(
                f"the changelog refused a batch's state ({ticket.failed}); stopping without "
                "publishing its answers or committing"
            )

    def drain(self) -> None:
        """Take every batch in flight through all stages (before checkpoints, rebalances and
        timers: they need every state write made and every output handed over)."""
        self.finish_apply()
        self.publish_scored(block=True)
        self.in_flight.clear()  # every batch is stored

    def take_offsets(self) -> dict[int, int]:
        """The offsets to commit for the batches applied since the last call."""
        offsets, self._next_offsets = self._next_offsets, {}
        return offsets

    def forget(self, partition: int) -> None:
        """A lost partition: its offsets are not committed by this worker."""
        self._next_offsets.pop(partition, None)

    def close(self) -> None:
        self.apply_thread.shutdown(wait=False, cancel_futures=True)
        self.score_thread.shutdown(wait=False, cancel_futures=True)
