"""Correct end offsets for Faust's changelog recovery on brokers that under-report them.

Tansu answers ListOffsets(LATEST) with the base offset of the last record batch + 1, not the
end of the log. Faust reads a changelog only up to that "highwater" when it rebuilds a table,
so on Tansu it silently drops the last batch of every changelog partition (tables recovered
after a lost data directory come back stale). The fix: after asking for end offsets, read
forward from each reported end with a short-lived consumer and return the true end.
On Apache Kafka the read finds nothing and the offsets are returned unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition

_installed_config: dict[str, Any] | None = None


def true_end_offsets(
    client_config: dict[str, Any],
    reported: Mapping[tuple[str, int], int],
    idle_timeout: float = 1.0,
    max_wait: float = 30.0,
) -> dict[tuple[str, int], int]:
    """End offsets found by reading past the reported ones; (topic, partition) -> offset."""
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
                key = (msg.topic(), msg.partition())
                result[key] = max(result[key], msg.offset() + 1)
                last = time.monotonic()
    finally:
        consumer.close()
    return result


def install(client_config: dict[str, Any]) -> None:
    """Patch Faust's aiokafka consumer thread so recovery sees the true end offsets."""
    global _installed_config
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    _installed_config = dict(client_config)
    if getattr(AIOKafkaConsumerThread, "_streamrec_patched", False):
        return
    original = AIOKafkaConsumerThread._highwaters

    async def _highwaters(self: Any, partitions: Any) -> Mapping[Any, int]:
        reported = await original(self, partitions)
        if _installed_config is None or self.consumer.in_transaction:
            return reported
        by_key = {(tp.topic, tp.partition): int(o) for tp, o in reported.items() if o is not None}
        corrected = await asyncio.to_thread(true_end_offsets, _installed_config, by_key)
        return {tp: corrected.get((tp.topic, tp.partition), o) for tp, o in reported.items()}

    AIOKafkaConsumerThread._highwaters = _highwaters
    AIOKafkaConsumerThread._streamrec_patched = True
