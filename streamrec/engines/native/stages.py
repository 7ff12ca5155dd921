"""The native worker's three-stage pipeline. Batches go in order through:

1. apply: :func:`streamrec.serving.pipeline.process_batch` without the scoring, in a state
   thread; its state writes go into the partitions' pending writes;
2. score: :func:`streamrec.serving.pipeline.score_batch` (one matmul + top-k for the batch)
   in a scoring thread;
3. publish: recommendations and dead letters handed to the C producer (asynchronous), in
   the caller's (the poll loop's) thread, once the broker has acknowledged the batch's state
   writes on the changelog (sent when its apply finished: ``checkpoint.ChangelogTicket``), so
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
from streamrec.engines.native.checkpoint import ChangelogTicket
from streamrec.metrics import Metrics
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.input_topic import InputTopic
from streamrec.serving.pipeline import process_batch, score_batch
from streamrec.serving.records import BatchResult, Record
from streamrec.serving.served_model import ModelHolder, ServingModel
from streamrec.serving.state_store import StateStore

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
    model: ServingModel  # the weights that advanced the states score them too
    future: Future[BatchResult]


@dataclass
class _Scoring:
    """A batch applied, its state writes on their way to the changelog, its scoring under way."""

    n_records: int
    future: Future[BatchResult]
    changelog: ChangelogTicket


class Stages:
    """The batches in flight through apply -> score -> publish, and the input offsets they
    have passed (what the next checkpoint commits)."""

    def __init__(
        self,
        store: StateStore,
        holder: ModelHolder,
        config: CoreConfig,
        clock: StreamClock,
        outputs: Outputs,
        metrics: Metrics,
        send_changelog: Callable[[], ChangelogTicket],
        topic: InputTopic,
    ) -> None:
        self.store = store
        self.send_changelog = send_changelog
        self.topic = topic
        self.holder = holder
        self.config = config
        self.clock = clock
        self.outputs = outputs
        self.metrics = metrics
        self.apply_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-apply")
        self.score_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-score")
        self._applying: _InFlight | None = None
        self._scoring: deque[_Scoring] = deque()
        self._next_offsets: dict[int, int] = {}  # input partition -> offset to commit

    @property
    def busy(self) -> bool:
        return self._applying is not None or bool(self._scoring)

    def start(self, records: list[Record]) -> None:
        """Stage 1 in the state thread: apply the batch to the states (the core without the
        scoring)."""
        assert self._applying is None
        model = self.holder.current
        future = self.apply_thread.submit(
            process_batch,
            records,
            self.store,
            model,
            self.config,
            clock=self.clock,
            score=False,
            topic=self.topic,
        )
        self._applying = _InFlight(records, model, future)

    def finish_apply(self) -> None:
        """Wait for stage 1, send its state writes to the changelog, note the offsets, and
        queue stage 2 (scoring)."""
        batch, self._applying = self._applying, None
        if batch is None:
            return
        res = batch.future.result()
        ticket = self.send_changelog()
        for r in batch.records:  # records are in offset order per partition
            self._next_offsets[r.partition] = r.offset + 1
        scored = self.score_thread.submit(score_batch, res, batch.model, self.config)
        self._scoring.append(_Scoring(len(batch.records), scored, ticket))

    def publish_scored(self, block: bool) -> None:
        """Stage 3: hand scored batches to the producer, oldest first (asynchronous; delivered
        before the offsets are committed, at the checkpoint), each once its changelog writes
        are acknowledged. Waits for the oldest if ``block`` or if two are queued (bounds the
        pipeline)."""
        while self._scoring:
            oldest = self._scoring[0]
            ready = oldest.future.done() and oldest.changelog.done
            if not (ready or block or len(self._scoring) > 1):
                return
            self._scoring.popleft()
            res = oldest.future.result()
            self._await_changelog(oldest.changelog)
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
