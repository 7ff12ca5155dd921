"""Kafka plumbing shared by the commands, the benchmarks and the tests (confluent-kafka)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streamrec.kafka import tansu
from streamrec.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int = 1
    config: tuple[tuple[str, str], ...] = ()


def ensure_topics(
    client_config: dict[str, Any], topics: Iterable[TopicSpec], timeout: float = 30
) -> None:
    """Create the topics that do not exist yet, with their final partition counts.

    Partitions are never added afterwards (Tansu cannot, and adding them would move keys).
    """
    admin = AdminClient({**client_config, "log_level": 0})
    existing = admin.list_topics(timeout=timeout).topics
    wanted = [
        NewTopic(t.name, t.partitions, t.replication_factor, config=dict(t.config))
        for t in topics
        if t.name not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        _wait_for_topic(admin, name, timeout)


def ensure_service_topics(settings: Settings) -> None:
    """Create the clicks, recommendations and dead-letter topics with their partition counts."""
    t = settings.topics
    ensure_topics(
        settings.kafka.confluent_config(),
        [
            TopicSpec(name, t.partitions, t.replication_factor)
            for name in (t.clicks, t.recommendations, t.dead_letter)
        ],
    )


def _wait_for_topic(admin: AdminClient, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic=name, timeout=timeout).topics.get(name)
        if meta is not None and meta.error is None and meta.partitions:
            return
        time.sleep(0.05)
    raise TimeoutError(f"topic {name} did not appear within {timeout} s")


def partition_count(client_config: dict[str, Any], topic: str, timeout: float = 10) -> int:
    admin = AdminClient({**client_config, "log_level": 0})
    meta = admin.list_topics(topic=topic, timeout=timeout).topics[topic]
    return len(meta.partitions)


def committed_offsets(
    client_config: dict[str, Any], group: str, topic: str, timeout: float = 10
) -> list[int]:
    """The offsets ``group`` has committed on each partition of ``topic`` (negative: none)."""
    consumer = Consumer({**client_config, "group.id": group, "log_level": 0})
    try:
        parts = [TopicPartition(topic, p) for p in range(partition_count(client_config, topic))]
        return [tp.offset for tp in consumer.committed(parts, timeout=timeout)]
    finally:
        consumer.close()


def read_topic(
    client_config: dict[str, Any],
    topic: str,
    *,
    idle_timeout: float = 3.0,
    max_wait: float = 60.0,
) -> list[Any]:
    """Every record of ``topic`` from offset 0, read by a fresh consumer (no group commits).

    Reading from the start once the producers are idle is the reliable way to verify a
    topic's content on Tansu, whose tailing consumers can skip records under concurrent writes.
    Returns confluent-kafka ``Message`` objects in (partition, offset) order.
    """
    consumer = Consumer(
        {
            **client_config,
            "group.id": f"streamrec-reader-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 10,
            "log_level": 0,
        }
    )
    try:
        n = partition_count(client_config, topic)
        consumer.assign([TopicPartition(topic, p, 0) for p in range(n)])
        records: list[Any] = []
        start = last = time.monotonic()
        while time.monotonic() - last < idle_timeout and time.monotonic() - start < max_wait:
            batch = consumer.consume(num_messages=10_000, timeout=0.2)
            for msg in batch:
                if msg.error() is None:
                    records.append(msg)
            if batch:
                last = time.monotonic()
        records.sort(key=lambda m: (m.partition(), m.offset()))
        return records
    finally:
        consumer.close()


def tail(
    client_config: dict[str, Any],
    topic: str,
    *,
    from_beginning: bool = False,
    stopped: Callable[[], bool] = lambda: False,
) -> Iterator[Any]:
    """Records of ``topic`` as they arrive (confluent-kafka ``Message``s), until ``stopped()``.

    For display: a tailing consumer can skip records on the embedded broker, so figures come
    from :func:`read_topic`. Joins no group (see :func:`streamrec.kafka.tansu.assign_all`).
    """
    consumer = Consumer(
        {
            **client_config,
            "group.id": f"streamrec-tail-{time.time_ns()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "log_level": 0,
        }
    )
    try:
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        tansu.assign_all(consumer, topic, partition_count(client_config, topic), start)
        while not stopped():
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                yield msg
    finally:
        consumer.close()
