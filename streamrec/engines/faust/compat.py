"""Fixes every Faust app here installs (``install``) before its worker starts.

Two are Faust bugs (any broker); the third is the embedded broker's, kept with the other
broker workarounds in :mod:`streamrec.kafka.tansu`.

1. Seek before resume (a Faust race, any broker). After a table was rebuilt from its changelog,
   faust-streaming 0.15.3's ``Recovery.on_recovery_completed`` resumes the stream partitions
   and only then seeks them to their committed offsets, while the fetcher (started for the
   changelog read) is running and the flow is on. Records fetched in between are handed to
   the agents and then the seek moves the position under them: some inputs are never
   processed, and Faust's commit either stalls at the hole or steps over it (upstream issue
   faust-streaming/faust#596, open). Seen in ``tests/streamrec/test_faust_minimal.py``: about
   half of the restarts with a wiped data directory lost inputs. The patched method seeks first and
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

3. True end offsets (a gap of the embedded broker):
   :func:`streamrec.kafka.tansu.patch_faust_highwaters`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from streamrec.kafka import tansu


def install(end_reader: tansu.ReaderFactory | None) -> None:
    """Install the fixes (idempotent); ``end_reader`` (the embedded broker only) makes the
    consumers that find the true end offsets (3.)."""
    _patch_recovery_seek_before_resume()
    _patch_fetch_only_active_partitions()
    if end_reader is not None:
        tansu.patch_faust_highwaters(end_reader)


def _patch_fetch_only_active_partitions() -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread._fetch_records, "_streamrec_patched", False):
        return
    # Called loosely: Faust annotates active_partitions as Set[TP], yet passes None itself
    # (AIOKafkaConsumerThread.getmany) and aiokafka only iterates it (a frozenset will do).
    original: Callable[..., Awaitable[Any]] = AIOKafkaConsumerThread._fetch_records

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

    tansu.monkeypatch(_fetch_records, _streamrec_patched=True)
    tansu.monkeypatch(AIOKafkaConsumerThread, _fetch_records=_fetch_records)


def _patch_recovery_seek_before_resume() -> None:
    import faust
    from faust.tables.recovery import Recovery

    if getattr(Recovery, "_streamrec_patched", False):
        return
    if faust.__version__ != "0.15.3":
        # The method below is faust-streaming 0.15.3's with two lines swapped; another version
        # must be checked against its own source before this is allowed to replace it.
        raise RuntimeError(
            "streamrec.engines.faust.compat was written for faust-streaming 0.15.3, "
            f"not {faust.__version__}"
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

    tansu.monkeypatch(
        Recovery, on_recovery_completed=on_recovery_completed, _streamrec_patched=True
    )
