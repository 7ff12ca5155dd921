"""The native worker's three-stage pipeline. Batches go in order through:

1. apply: :func:`streamrec.serving.pipeline.process_batch` without the scoring, in a state
   thread; its state writes go into the partitions' pending writes;
2. score: :func:`streamrec.serving.pipeline.score_batch` (one matmul + top-k for the batch)
   in a scoring thread;
3. publish: recommendations and dead letters handed to the C producer (asynchronous), in
   the caller's (the poll loop's) thread.

The stages overlap across batches: torch releases the GIL, so batch N's scoring runs on one
core while batch N+1 is applied and batch N-1 published on the other. Batch N+1 is applied
only after batch N's apply has finished, so a key's events apply in offset order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from streamrec.engines.common import Outputs
from streamrec.metrics import Metrics
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
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
    ) -> None:
        self.store = store
        self.holder = holder
        self.config = config
        self.clock = clock
        self.outputs = outputs
        self.metrics = metrics
        self.apply_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-apply")
        self.score_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-score")
        self._applying: _InFlight | None = None
        self._scoring: deque[tuple[int, Future[BatchResult]]] = deque()
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
        )
        self._applying = _InFlight(records, model, future)

    def finish_apply(self) -> None:
        """Wait for stage 1, note the offsets, and queue stage 2 (scoring)."""
        batch, self._applying = self._applying, None
        if batch is None:
            return
        res = batch.future.result()
        for r in batch.records:  # records are in offset order per partition
            self._next_offsets[r.partition] = r.offset + 1
        scored = self.score_thread.submit(score_batch, res, batch.model, self.config)
        self._scoring.append((len(batch.records), scored))

    def publish_scored(self, block: bool) -> None:
        """Stage 3: hand scored batches to the producer, oldest first (asynchronous; delivered
        before the offsets are committed, at the checkpoint). Waits for the oldest if
        ``block`` or if two are queued (bounds the pipeline)."""
        while self._scoring and (block or len(self._scoring) > 1 or self._scoring[0][1].done()):
            n_records, future = self._scoring.popleft()
            res = future.result()
            self.outputs.publish(res)
            self.metrics.observe_batch(n_records, res.stats, res.latencies(), res.model_seconds)

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
