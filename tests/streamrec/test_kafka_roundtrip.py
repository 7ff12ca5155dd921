"""Round trip through the broker with confluent-kafka: 4 partitions, 10,000 JSON messages."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streamrec.kafka.clients import TopicSpec, ensure_topics, partition_count

pytestmark = pytest.mark.broker

N_MESSAGES = 10_000
FIRST_CONSUMER_TAKES = 6_000


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 10,
            "log_level": 0,
        }
    )


def _take(consumer: Consumer, n: int, timeout: float = 60) -> list:
    taken: list = []
    idle = 0
    while len(taken) < n and idle < timeout / 0.5:
        msg = consumer.poll(0.5)
        if msg is None:
            idle += 1
            continue
        assert msg.error() is None, msg.error()
        taken.append(msg)
    return taken


def test_produce_consume_commit_and_resume(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("roundtrip"), unique_name("group")
    conf = {"bootstrap.servers": kafka_bootstrap}
    ensure_topics(conf, [TopicSpec(topic, 4)])
    assert partition_count(conf, topic) == 4

    producer = Producer({**conf, "enable.idempotence": True, "linger.ms": 5, "log_level": 0})
    for i in range(N_MESSAGES):
        value = json.dumps({"i": i, "session_id": f"s{i % 97}", "item_id": str(i % 13)})
        producer.produce(topic, key=f"s{i % 97}", value=value)
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0

    first = _consumer(kafka_bootstrap, group)
    first.subscribe([topic])
    taken_first = _take(first, FIRST_CONSUMER_TAKES)
    assert len(taken_first) == FIRST_CONSUMER_TAKES
    # Commit exactly what was processed: the next offset of the last message per partition.
    next_offsets: dict[int, int] = {}
    for msg in taken_first:
        next_offsets[msg.partition()] = msg.offset() + 1
    first.commit(
        offsets=[TopicPartition(topic, p, o) for p, o in next_offsets.items()], asynchronous=False
    )
    first.close()

    second = _consumer(kafka_bootstrap, group)
    second.subscribe([topic])
    taken_second = _take(second, N_MESSAGES - FIRST_CONSUMER_TAKES)
    extra = second.poll(2.0)
    second.close()

    assert extra is None, "the restarted consumer read past the end"
    # It resumed exactly at the committed positions ...
    first_seen: dict[int, int] = {}
    for msg in taken_second:
        first_seen.setdefault(msg.partition(), msg.offset())
    for partition, offset in first_seen.items():
        assert offset == next_offsets.get(partition, 0)
    # ... and together the two consumers saw every message once.
    seen = [json.loads(m.value())["i"] for m in taken_first + taken_second]
    assert sorted(seen) == list(range(N_MESSAGES))
    # Keys kept their partition: all messages of a key are in one partition.
    partitions_of_key: dict[bytes, set[int]] = {}
    for msg in taken_first + taken_second:
        partitions_of_key.setdefault(msg.key(), set()).add(msg.partition())
    assert all(len(ps) == 1 for ps in partitions_of_key.values())
