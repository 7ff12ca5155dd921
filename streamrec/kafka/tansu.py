"""Every workaround for the embedded broker (Tansu 0.6, see ../shared/docs/kafka-broker.md).

Production runs on Apache Kafka; the demo and the tests run on Tansu, which speaks the Kafka
protocol with a few gaps. Each workaround here names the broker behaviour it works around,
and applies only to the embedded broker: :mod:`streamrec.kafka.clients` decides which broker
a configuration is for (``kafka.broker``, else the cluster id the broker answers with:
:data:`EMBEDDED_CLUSTER_IDS`) and adds these settings only there.
``tests/streamrec/test_tansu.py`` shows each quirk on the embedded broker.

* Group joins wait about ``session.timeout.ms / 2``: :data:`GROUP_TIMEOUTS` (consumers that
  join a group) and :data:`FAUST_APP_SETTINGS` (Faust's 60 s default made a worker take
  ~35 s to be ready).
* An empty fetch is held for the whole ``fetch.wait.max.ms`` even when data arrives:
  :data:`FETCH_MAX_WAIT_MS` (and Faust's hard-coded 1500 ms is replaced by the engine's
  transport, :mod:`streamrec.engines.faust.transport`).
* ListOffsets(LATEST) is the base offset of the last batch + 1, not the log end:
  :func:`true_end_offsets` (native recovery) and :func:`patch_faust_highwaters` (Faust).
  High watermarks and lag are wrong there, so Faust's recovery consistency check is off,
  and the lag the workers export is raised to what they have read
  (:func:`streamrec.kafka.clients.lag_by_partition`).
* aiokafka cannot init an idempotent producer on it (InitProducerId v0 only), and tailing
  consumers can skip records while several producers write: producers here are not
  idempotent (:data:`PRODUCER_SETTINGS`), and outputs are checked by a fresh read from
  offset 0 (``streamrec.kafka.clients.read_topic``).
* Transactions are accepted but not isolated: a ``read_committed`` consumer (every consumer
  here is one) still reads the records of aborted transactions. Not worked around; on Kafka
  they are never served.
* A group join costs seconds: read-only tools assign partitions instead of subscribing
  (:func:`assign_all`; harmless on Kafka).
* Not worked around, only measured: every record batch is one object of its in-memory store,
  and every fetch that has data to return first lists every batch object of the partition,
  with no retention (DeleteRecords is unimplemented). A consumer tailing a log at a steady
  rate costs the broker in proportion to the batches written so far: at 100 records/s it
  used 6% of a core with 1k batches in the log and 92% with 43k
  (``bench/results/tansu-tail-cost.md``), and long soaks saturate it
  (``bench/results/soak.md``). Benchmarks on it stay short, or low-rate, or batch their
  producers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition

#: cluster ids of the embedded broker: the one :class:`streamrec.kafka.embedded.EmbeddedBroker`
#: gives it, and Tansu's default (any Tansu has the quirks below)
EMBEDDED_CLUSTER_IDS = ("streamrec-embedded", "tansu_cluster")
#: consumer group timeouts: a join completes in about half the session timeout
GROUP_TIMEOUTS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
#: the longest wait of an empty fetch, which the embedded broker holds in full
FETCH_MAX_WAIT_MS = 10
#: the same for Faust, plus no recovery consistency check (it compares against the wrong
#: high watermark and raises ConsistencyError on restart)
FAUST_APP_SETTINGS: dict[str, Any] = {
    "broker_session_timeout": 6,
    "broker_heartbeat_interval": 1,
    "recovery_consistency_check": False,
}
#: producers: not idempotent (see the module docstring)
PRODUCER_SETTINGS: dict[str, Any] = {"enable.idempotence": False}

#: a fresh consumer of no group, for reading past the reported ends
ReaderFactory = Callable[[], Consumer]
_faust_reader: ReaderFactory | None = None


def true_end_offsets(
    reader: ReaderFactory,
    reported: Mapping[tuple[str, int], int],
    idle_timeout: float = 1.0,
    max_wait: float = 30.0,
) -> dict[tuple[str, int], int]:
    """End offsets found by reading past the reported ones; (topic, partition) -> offset.

    ``reader`` makes the consumer that reads (built by the caller, with the configuration's
    properties). Only for the embedded broker: on Kafka the reported ends are right.
    """
    result = dict(reported)
    if not reported:
        return result
    consumer = reader()
    try:
        # Connect first: a fresh client's first fetch can take longer than the idle timeout on
        # a busy machine, and stopping then would silently keep the under-reported offsets.
        consumer.list_topics(timeout=max_wait)
        consumer.assign([TopicPartition(t, p, max(o, 0)) for (t, p), o in reported.items()])
        start = last = time.monotonic()
        while time.monotonic() - last < idle_timeout and time.monotonic() - start < max_wait:
            for msg in consumer.consume(num_messages=10_000, timeout=0.1):
                if msg.error() is not None:
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                # set on every record consume() returns without an error
                assert topic is not None and partition is not None and offset is not None
                key = (topic, partition)
                result[key] = max(result[key], offset + 1)
                last = time.monotonic()
    finally:
        consumer.close()
    return result


def monkeypatch(target: object, **attributes: Any) -> None:
    """Set ``attributes`` on a third-party class or function: the Faust patches here and in
    :mod:`streamrec.engines.faust.compat`. Dynamic on purpose: assigning to a method of a
    class is what a type checker rightly refuses everywhere else."""
    for name, value in attributes.items():
        setattr(target, name, value)


def patch_faust_highwaters(reader: ReaderFactory) -> None:
    """Quirk: ListOffsets(LATEST) answers the base offset of the last record batch + 1.

    Faust reads a changelog only up to that "highwater" when it rebuilds a table, so on the
    embedded broker it silently dropped the last batch of every changelog partition (tables
    came back stale after a lost data directory). Patched, Faust's highwaters are the
    :func:`true_end_offsets` read by ``reader``'s consumers. Idempotent; for the embedded
    broker only.
    """
    global _faust_reader
    _faust_reader = reader
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread, "_streamrec_patched", False):
        return
    original = AIOKafkaConsumerThread._highwaters

    async def _highwaters(self: Any, partitions: Any) -> Mapping[Any, int]:
        reported = await original(self, partitions)
        if _faust_reader is None or self.consumer.in_transaction:
            return reported
        by_key = {(tp.topic, tp.partition): int(o) for tp, o in reported.items() if o is not None}
        corrected = await asyncio.to_thread(true_end_offsets, _faust_reader, by_key)
        return {tp: corrected.get((tp.topic, tp.partition), o) for tp, o in reported.items()}

    monkeypatch(AIOKafkaConsumerThread, _highwaters=_highwaters, _streamrec_patched=True)


def assign_all(consumer: Consumer, topic: str, partitions: int, start: int) -> None:
    """Read the ``partitions`` of ``topic`` from ``start`` without joining a group (a join
    waits for half the session timeout here); for tools that only read."""
    consumer.assign([TopicPartition(topic, p, start) for p in range(partitions)])
