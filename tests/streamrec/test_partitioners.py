"""Our copies of librdkafka's partitioners give every key the partition librdkafka gives it:
records produced with each ``partitioner`` setting are read back with their partitions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from streamrec.kafka.clients import TopicSpec, ensure_topics
from streamrec.kafka.partitioners import PARTITIONERS, partition_function

pytestmark = pytest.mark.broker

KEYS = [f"user-{i}".encode() for i in range(300)] + [
    b"a",
    b"ab",
    b"abc",
    b"abcd",
    "é\U0001f600".encode(),
    b"\xff\x00\x80",
    b"x" * 257,
]


@pytest.mark.parametrize("partitions", [7, 12])
def test_each_partitioner_matches_librdkafka(
    kafka_bootstrap: str, unique_name: Callable[[str], str], partitions: int
) -> None:
    conf = {"bootstrap.servers": kafka_bootstrap}
    topic = unique_name("partitioners")
    ensure_topics(conf, [TopicSpec(topic, partitions)])
    for name in PARTITIONERS:
        placed: dict[bytes, int] = {}
        producer = Producer({**conf, "partitioner": name, "log_level": 0})

        def delivered(err: object, msg: object, placed: dict[bytes, int] = placed) -> None:
            assert err is None, err
            placed[msg.key()] = msg.partition()  # type: ignore[attr-defined]  # a Message

        for key in KEYS:
            producer.produce(topic, b"v", key, on_delivery=delivered)
        assert producer.flush(30) == 0
        ours = partition_function(name)
        assert {k: ours(k, partitions) for k in KEYS} == placed, name
        assert len(set(placed.values())) == partitions  # the keys spread over every partition
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition_function("random")
