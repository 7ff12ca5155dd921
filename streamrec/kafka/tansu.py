"""Every workaround for the embedded broker (Tansu 0.6, see ../shared/docs/kafka-broker.md).

Production runs on Apache Kafka; the demo and the tests run on Tansu, which speaks the Kafka
protocol with a few gaps. Each workaround here names the broker behaviour it works around;
on Apache Kafka each one is harmless (it changes nothing, or only shortens a wait).
``tests/streamrec/test_tansu.py`` shows each quirk on the embedded broker.

* Group joins wait about ``session.timeout.ms / 2``: :data:`GROUP_TIMEOUTS` (consumers) and
  :data:`FAUST_APP_SETTINGS` (Faust's 60 s default made a worker take ~35 s to be ready).
* An empty fetch is held for the whole ``fetch.wait.max.ms`` even when data arrives, and Faust
  hard-codes 1500 ms: :func:`faust_fast_fetch_transport`.
* ListOffsets(LATEST) is the base offset of the last batch + 1, not the log end:
  :func:`true_end_offsets` (native recovery) and :func:`patch_faust_highwaters` (Faust).
  High watermarks and lag are wrong there, so Faust's recovery consistency check is off.
* aiokafka cannot init an idempotent producer on it (InitProducerId v0 only), and tailing
  consumers can skip records while several producers write: producers here are not
  idempotent (:data:`PRODUCER_SETTINGS`), and outputs are checked by a fresh read from
  offset 0 (``streamrec.kafka.clients.read_topic``).
* A group join costs seconds: read-only tools assign partitions instead of subscribing
  (:func:`assign_all`).
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
import functools
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from confluent_kafka import Consumer, TopicPartition

if TYPE_CHECKING:  # faust is imported only where a Faust app is made
    from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport

#: consumer group timeouts: a join completes in about half the session timeout
GROUP_TIMEOUTS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
#: the same for Faust, plus no recovery consistency check (it compares against the wrong
#: high watermark and raises ConsistencyError on restart)
FAUST_APP_SETTINGS: dict[str, Any] = {
    "broker_session_timeout": 6,
    "broker_heartbeat_interval": 1,
    "recovery_consistency_check": False,
}
#: output producers: acks from all replicas, not idempotent (see the module docstring)
PRODUCER_SETTINGS: dict[str, Any] = {"enable.idempotence": False}

_faust_client_config: dict[str, Any] | None = None


def true_end_offsets(
    client_config: dict[str, Any],
    reported: Mapping[tuple[str, int], int],
    idle_timeout: float = 1.0,
    max_wait: float = 30.0,
) -> dict[tuple[str, int], int]:
    """End offsets found by reading past the reported ones; (topic, partition) -> offset.

    On Apache Kafka the read finds nothing and the reported offsets come back unchanged.
    """
    result = dict(reported)
    if not reported:
        return result
    consumer = Consumer(
        {
            **client_config,
            "group.id": f"streamrec-endcheck-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "log_level": 0,
        }
    )
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


def patch_faust_highwaters(client_config: dict[str, Any]) -> None:
    """Quirk: ListOffsets(LATEST) answers the base offset of the last record batch + 1.

    Faust reads a changelog only up to that "highwater" when it rebuilds a table, so on the
    embedded broker it silently dropped the last batch of every changelog partition (tables
    came back stale after a lost data directory). Patched, Faust's highwaters are the
    :func:`true_end_offsets`; on Apache Kafka they are unchanged. Idempotent.
    """
    global _faust_client_config
    _faust_client_config = dict(client_config)
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread, "_streamrec_patched", False):
        return
    original = AIOKafkaConsumerThread._highwaters

    async def _highwaters(self: Any, partitions: Any) -> Mapping[Any, int]:
        reported = await original(self, partitions)
        if _faust_client_config is None or self.consumer.in_transaction:
            return reported
        by_key = {(tp.topic, tp.partition): int(o) for tp, o in reported.items() if o is not None}
        corrected = await asyncio.to_thread(true_end_offsets, _faust_client_config, by_key)
        return {tp: corrected.get((tp.topic, tp.partition), o) for tp, o in reported.items()}

    monkeypatch(AIOKafkaConsumerThread, _highwaters=_highwaters, _streamrec_patched=True)


def assign_all(consumer: Consumer, topic: str, partitions: int, start: int) -> None:
    """Read the ``partitions`` of ``topic`` from ``start`` without joining a group (a join
    waits for half the session timeout here); for tools that only read."""
    consumer.assign([TopicPartition(topic, p, start) for p in range(partitions)])


class _FastFetchApp(Protocol):
    fetch_max_wait_ms: int


@functools.cache
def faust_fast_fetch_transport() -> type[AIOKafkaTransport]:
    """A Faust aiokafka transport whose consumer waits at most ``app.fetch_max_wait_ms`` on an
    empty fetch (Faust hard-codes 1500 ms, which the embedded broker holds in full: one click
    took ~700 ms end to end; with ~10 ms it took ~12 ms)."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    class FastFetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # read by AIOKafkaConsumer.start() when it builds its Fetcher
            # the app is a StreamrecApp (streamrec.engines.faust.app, a layer above this one)
            app = cast(_FastFetchApp, self.app)
            consumer._fetch_max_wait_ms = int(app.fetch_max_wait_ms)
            return consumer

    class FastFetchConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return FastFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class FastFetchTransport(faust_aiokafka.Transport):
        Consumer = FastFetchConsumer

    return FastFetchTransport
