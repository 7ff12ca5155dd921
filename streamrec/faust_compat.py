"""Three fixes every Faust app here installs (``install``) before its worker starts.

1. Seek before resume (a Faust race, any broker). After a table was rebuilt from its changelog,
   faust-streaming 0.15.3's ``Recovery.on_recovery_completed`` resumes the stream partitions
   and only then seeks them to their committed offsets, while the fetcher (started for the
   changelog read) is running and the flow is on. Records fetched in between are handed to
   the agents and then the seek moves the position under them: some inputs are never
   processed, and Faust's commit either stalls at the hole or steps over it (upstream issue
   faust-streaming/faust#596, open). Seen in ``tests/test_faust_minimal.py``: about half of
   the restarts with a wiped data directory lost inputs. The patched method seeks first and
   resumes the stream partitions after, so nothing is fetched from one before it sits at its
   committed offset.

2. Fetch only active partitions (a Faust race, any broker). Faust hands its live set of active
   partitions to aiokafka's ``fetched_records`` from another thread. While a table recovery
   ends every partition is paused and that set is empty, and aiokafka reads an empty set as
   "all partitions": it returned the records it had buffered for a paused input partition,
   Faust's own filter dropped them, and the position had moved past them. In an aiokafka debug
   log of a wiped-disk restart: partition 2 seeked to 79, 79..109 fetched and buffered, the
   next fetch at 110, none of 79..109 processed. The patch passes a snapshot and never an
   empty one.

3. True end offsets (a Tansu gap). Tansu answers ListOffsets(LATEST) with the base offset of
   the last record batch + 1, not the end of the log. Faust reads a changelog only up to that
   "highwater" when it rebuilds a table, so on Tansu it silently drops the last batch of every
   changelog partition (tables recovered after a lost data directory come back stale). The
   patch reads forward from each reported end with a short-lived consumer and returns the
   true end. On Apache Kafka the read finds nothing and the offsets are returned unchanged.
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
    """Install the fixes (idempotent); ``client_config`` is a confluent-kafka config."""
    global _installed_config
    _installed_config = dict(client_config)
    _patch_recovery_seek_before_resume()
    _patch_fetch_only_active_partitions()
    _patch_true_highwaters()


def _patch_fetch_only_active_partitions() -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread._fetch_records, "_streamrec_patched", False):
        return
    original = AIOKafkaConsumerThread._fetch_records

    async def _fetch_records(
        self: Any,
        consumer: Any,
        active_partitions: Any,
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        if active_partitions is None:  # a client-only app: every partition
            return await original(self, consumer, None, timeout=timeout, max_records=max_records)
        # A snapshot: the set is Faust's live one, changed by the event loop while this runs in
        # the consumer thread. And never an empty one, which aiokafka reads as "all partitions".
        partitions = frozenset(active_partitions)
        if not partitions:
            return {}
        return await original(self, consumer, partitions, timeout=timeout, max_records=max_records)

    _fetch_records._streamrec_patched = True  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._fetch_records = _fetch_records


def _patch_true_highwaters() -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

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


def _patch_recovery_seek_before_resume() -> None:
    import faust
    from faust.tables.recovery import Recovery

    if getattr(Recovery, "_streamrec_patched", False):
        return
    if faust.__version__ != "0.15.3":
        # The method below is faust-streaming 0.15.3's with two lines swapped; another version
        # must be checked against its own source before this is allowed to replace it.
        raise RuntimeError(
            f"faust_compat was written for faust-streaming 0.15.3, not {faust.__version__}"
        )

    async def on_recovery_completed(self: Any, generation_id: int = 0) -> None:
        consumer = self.app.consumer
        self.log.info("Restore complete!")
        await self.app.on_rebalance_complete.send()
        self._set_recovery_ended()
        callbacks = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)
        assignment = consumer.assignment()
        if self.app.consumer_generation_id != generation_id:
            self.log.warning(
                f"Recovery rebalancing again app id {self.app.consumer_generation_id} "
                f"param {generation_id}"
            )
            return
        if assignment:
            # The fix: stream partitions are still paused here, so nothing is fetched from them
            # until they sit at their committed offsets.
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(), timeout=self.app.conf.broker_request_timeout)
        consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
        self.completed.set()
        self.app.flow_control.resume()
        consumer.resume_flow()
        await self.app._fetcher.maybe_start()
        self.tables.on_actives_ready()
        if not self.app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        self.app.on_rebalance_end()
        self.log.info("Worker ready")

    Recovery.on_recovery_completed = on_recovery_completed
    Recovery._streamrec_patched = True
