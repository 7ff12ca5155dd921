"""Live metrics out of a worker: Prometheus counters, and the live metrics topic.

The pipeline scores each click that continues a session against the previous answer
(:mod:`streamrec.serving.live`) and returns the evaluations with its batch. This module counts
them by (arm, model version):

* ``/metrics``: ``streamrec_live_predictions_total{arm, model_version}``,
  ``streamrec_live_hits_total{arm, model_version, k}``,
  ``streamrec_live_reciprocal_rank_total{arm, model_version, k}`` (this process's counts);
* the live metrics topic (``topics.live_metrics``, default ``<app_id>-live-metrics``, one
  partition per clicks partition): one :class:`~streamrec.serving.live.LiveRecord` per input
  partition that has come further, at every checkpoint of the native worker and after every batch of
  the Faust worker. Any tool adds them up over workers (``streamrec live-report``, the
  rollback guard).

Each click is counted once on the topic, across crashes, restarts and rebalances:

* a record of partition ``p`` covers every click of ``p`` up to its ``through`` offset, and a
  partition's records are written in order (one request in flight), so the last record of
  metrics partition ``p`` says up to where ``p`` is counted;
* a worker that is assigned ``p`` reads that offset (:meth:`LiveMetrics.load_watermarks`) and
  counts no click at or below it again: a click redelivered after a crash is either a
  duplicate (its state survived: never scored again) or applied again (its state was lost),
  and scored again against the same stored answer, which was counted already;
* the counts of the clicks a state has applied are on the topic before that state can reach
  the changelog: the native worker publishes and flushes them at the start of each checkpoint,
  before it sends the state writes; the Faust worker flushes them with each batch's outputs,
  before the batch's table writes. So a click whose state survives a crash is counted, and
  a click counted after ``through`` was never counted before.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Info

from streamrec.errors import StreamrecError
from streamrec.kafka import clients
from streamrec.kafka.clients import TopicSpec, ensure_topics
from streamrec.serving.arms import ArmModels
from streamrec.serving.live import KS, LiveCounts, LiveRecord
from streamrec.serving.records import BatchResult
from streamrec.settings import Settings

log = logging.getLogger(__name__)

#: records read back from the end of a metrics partition to find where it is counted up to
TAIL_RECORDS = 64


class LiveDeliveryError(StreamrecError, RuntimeError):
    """The broker refused a live metrics record: stop without committing (the clicks are
    consumed again and counted then)."""


def live_metrics_topic(settings: Settings) -> str:
    """The live metrics topic of a worker group: ``topics.live_metrics``, else
    ``<app_id>-live-metrics`` (one group per topic: each reads back its own records)."""
    return settings.topics.live_metrics or default_live_metrics_topic(settings.worker.app_id)


def default_live_metrics_topic(app_id: str) -> str:
    return f"{app_id}-live-metrics"


@dataclass
class _Unpublished:
    """Counts of one input partition not yet on the topic."""

    after: int
    through: int
    counts: dict[tuple[str, str], LiveCounts] = field(default_factory=dict)


class LiveMetrics:
    """A worker's live metrics: counters in ``registry``, records to the topic."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        conf: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        #: the client configuration (streamrec.kafka.clients builds every client from it)
        self.conf = dict(settings.kafka.confluent_config() if conf is None else conf)
        self.topic = live_metrics_topic(settings)
        self.app_id = settings.worker.app_id
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        #: input partition -> the last offset whose clicks are counted on the topic
        self.watermarks: dict[int, int] = {}
        self._unpublished: dict[int, _Unpublished] = {}
        self._partitions = settings.topics.partitions
        self._producer: Producer | None = None
        self._errors: list[str] = []
        labels = ["arm", "model_version"]
        self.predictions = Counter(
            "streamrec_live_predictions",
            "Clicks scored against the answer to their session's previous click",
            labels,
            registry=registry,
        )
        self.hits = Counter(
            "streamrec_live_hits",
            "Scored clicks whose item was in the previous answer's top k (conservative ties)",
            [*labels, "k"],
            registry=registry,
        )
        self.arms = Info(
            "streamrec_arms",
            "The models served: champion and challenger versions, the challenger's share of "
            "the keys, shadow serving",
            registry=registry,
        )
        self.reciprocal_rank = Counter(
            "streamrec_live_reciprocal_rank",
            "Sum of 1/rank over scored clicks with rank <= k (MRR@k = this / predictions)",
            [*labels, "k"],
            registry=registry,
        )

    def set_arms(self, models: ArmModels) -> None:
        challenger = models.challenger
        self.arms.info(
            {
                "champion": models.champion.version,
                "challenger": challenger.version if challenger is not None else "",
                "challenger_share": str(models.share),
                "shadow": str(models.shadow).lower(),
            }
        )

    # ---- the topic ----------------------------------------------------------------------
    def ensure_topic(self) -> None:
        t = self.settings.topics
        ensure_topics(self.conf, [TopicSpec(self.topic, t.partitions, t.replication_factor)])

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = clients.producer(
                self.conf,
                site={
                    "acks": "all",
                    # a partition's records in order, also when one is retried
                    "max.in.flight.requests.per.connection": 1,
                    "linger.ms": 2,
                    "message.timeout.ms": 600_000,
                    "log_level": 3,
                },
            )
        return self._producer

    def load_watermarks(self, partitions: Iterable[int]) -> None:
        """Read, for each of ``partitions`` (newly assigned), up to where its clicks are
        counted on the topic: the ``through`` of this group's last record there."""
        wanted = sorted(set(partitions))
        if not wanted:
            return
        found = read_watermarks(self.conf, self.topic, self.app_id, wanted, self._partitions)
        for p in wanted:
            self.watermarks[p] = found.get(p, -1)
            self._unpublished.pop(p, None)
        log.info("live metrics counted up to %s", {p: self.watermarks[p] for p in wanted})

    def forget(self, partition: int) -> None:
        """A partition lost to another worker: what was not published is not ours to publish."""
        self.watermarks.pop(partition, None)
        self._unpublished.pop(partition, None)

    def reset(self) -> None:
        """Forget every partition (a new assignment whose partitions are not known)."""
        self.watermarks.clear()
        self._unpublished.clear()

    def known(self, partition: int) -> bool:
        return partition in self.watermarks

    # ---- counting ------------------------------------------------------------------------
    def add(self, res: BatchResult) -> None:
        """Count a published batch's evaluations (those at or below a partition's watermark
        were counted before: skipped) and note how far each partition has come."""
        # the ranks by (partition, arm, version) and by (arm, version), each in the batch's
        # order: the counts get them one list at a time, and their sums are those of adding
        # them one by one
        by_partition: dict[tuple[int, str, str], list[float]] = {}
        by_key: dict[tuple[str, str], list[float]] = {}
        watermarks = self.watermarks
        for partition, offset, arm, version, rank in res.evaluations:
            if offset <= watermarks.get(partition, -1):
                continue
            ranks = by_partition.get((partition, arm, version))
            if ranks is None:
                ranks = by_partition[(partition, arm, version)] = []
            ranks.append(rank)
            ranks = by_key.get((arm, version))
            if ranks is None:
                ranks = by_key[(arm, version)] = []
            ranks.append(rank)
        for (partition, arm, version), ranks in by_partition.items():
            u = self._unpublished_of(partition)
            c = u.counts.get((arm, version))
            if c is None:
                c = u.counts[(arm, version)] = LiveCounts()
            c.add_ranks(ranks)
        for p, offset in res.last_offsets.items():
            u = self._unpublished_of(p)
            u.through = max(u.through, offset)
        per_key: dict[tuple[str, str], LiveCounts] = {}
        for key, ranks in by_key.items():
            per_key[key] = LiveCounts()
            per_key[key].add_ranks(ranks)
        for (arm, version), c in per_key.items():
            self.predictions.labels(arm, version).inc(c.n)
            for i, k in enumerate(KS):
                self.hits.labels(arm, version, str(k)).inc(c.hits[i])
                self.reciprocal_rank.labels(arm, version, str(k)).inc(c.rr[i])

    def _unpublished_of(self, partition: int) -> _Unpublished:
        u = self._unpublished.get(partition)
        if u is None:
            mark = self.watermarks.get(partition, -1)
            u = self._unpublished[partition] = _Unpublished(mark, mark)
        return u

    def publish(self, flush: bool = True) -> int:
        """Send one record per partition with new counts; with ``flush``, wait until the
        broker has them all (a broker away: keep waiting). Returns the records sent. Raises
        :class:`LiveDeliveryError` if the broker refused one (nothing after it may be
        committed)."""
        sent = 0
        now = time.time()
        for p, u in list(self._unpublished.items()):
            if u.through <= u.after:  # (a record without counts still says how far p is)
                continue
            rec = LiveRecord(self.app_id, p, u.after, u.through, now, self.worker, u.counts)
            self._produce(p, rec.to_json())
            self.watermarks[p] = u.through
            self._unpublished[p] = _Unpublished(u.through, u.through)
            sent += 1
        if flush and self._producer is not None:
            while (left := self._producer.flush(30)) > 0:
                log.warning("%d live metrics records not yet delivered; retrying", left)
            if self._errors:
                errors, self._errors = self._errors, []
                raise LiveDeliveryError(f"could not deliver live metrics: {errors[:3]}")
        return sent

    def _produce(self, partition: int, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    value,
                    str(partition).encode(),
                    partition=partition % self._partitions,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                self.producer.poll(0.05)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)


def read_watermarks(
    conf: Mapping[str, Any],
    topic: str,
    app_id: str,
    partitions: Iterable[int],
    n_partitions: int,
    idle_timeout: float = 0.5,
    max_wait: float = 30.0,
) -> dict[int, int]:
    """For each input partition, the largest ``through`` among the last records of ``app_id``
    on its metrics partition (absent: nothing counted). Reads from a little before the
    reported end (the embedded broker reports the start of the last record batch) to the
    true end."""
    wanted = set(partitions)
    consumer = clients.consumer(
        conf,
        f"streamrec-live-tail-{time.monotonic_ns()}",
        fixed={"enable.auto.commit": False},
        site={"fetch.wait.max.ms": 10, "log_level": 0},
    )
    found: dict[int, int] = {}
    try:
        consumer.list_topics(topic, timeout=max_wait)  # connect before timing anything
        ends: dict[int, int] = {}  # metrics partition -> the end the broker reports
        assign = []
        for mp in sorted({p % n_partitions for p in wanted}):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, mp), timeout=30)
            if high > low:
                ends[mp] = high
                assign.append(TopicPartition(topic, mp, max(low, high - TAIL_RECORDS)))
        if not assign:
            return found
        consumer.assign(assign)
        start = last = time.monotonic()
        # up to the reported ends at least (a first fetch can be slow), then until idle
        while ends or time.monotonic() - last < idle_timeout:
            if time.monotonic() - start > max_wait:
                raise TimeoutError(f"could not read the end of {topic} within {max_wait} s")
            for msg in consumer.consume(num_messages=1000, timeout=0.1):
                if msg.error() is not None:
                    continue
                last = time.monotonic()
                at, offset, value = msg.partition(), msg.offset(), msg.value()
                assert at is not None and offset is not None  # set on every record consumed
                if offset + 1 >= ends.get(at, 0):
                    ends.pop(at, None)
                try:
                    rec = LiveRecord.from_json(value or b"")
                except ValueError:
                    continue
                if rec.app_id == app_id and rec.partition in wanted:
                    found[rec.partition] = max(found.get(rec.partition, -1), rec.through)
    finally:
        consumer.close()
    return found
