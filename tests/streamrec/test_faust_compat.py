"""The Faust recovery patch without a broker: the call order that closes the race."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from unittest.mock import AsyncMock, MagicMock

from faust.tables.recovery import Recovery
from faust.types import TP

from streamrec.engines.faust import compat as faust_compat


def _fake_recovery(calls: list[str]) -> MagicMock:
    """Just enough of a Recovery service for on_recovery_completed, logging consumer calls."""
    rec = MagicMock()
    consumer = rec.app.consumer
    consumer.assignment.return_value = {"clicks-0", "clicks-1", "app-state-changelog-0"}
    consumer.perform_seek = AsyncMock(side_effect=lambda: calls.append("seek"))
    consumer.resume_partitions.side_effect = lambda tps: calls.append(f"resume {sorted(tps)}")
    consumer.resume_flow.side_effect = lambda: calls.append("flow")
    rec.app.consumer_generation_id = 7
    rec.app.on_rebalance_complete.send = AsyncMock()
    rec.app._fetcher.maybe_start = AsyncMock()
    rec.tables.values.return_value = []
    rec._is_changelog_tp = lambda tp: "changelog" in tp

    async def wait(coro: Awaitable[object], timeout: float | None = None) -> object:
        return await coro

    rec._wait = wait
    return rec


def test_stream_partitions_are_seeked_before_they_are_resumed() -> None:
    faust_compat.install(None)  # patches classes only
    calls: list[str] = []
    rec = _fake_recovery(calls)
    asyncio.run(Recovery.on_recovery_completed(rec, generation_id=7))
    assert calls == ["seek", "resume ['clicks-0', 'clicks-1']", "flow"]
    rec.completed.set.assert_called_once()
    rec.app.on_rebalance_end.assert_called_once()


def test_a_newer_generation_leaves_partitions_paused() -> None:
    faust_compat.install(None)
    calls: list[str] = []
    rec = _fake_recovery(calls)
    asyncio.run(Recovery.on_recovery_completed(rec, generation_id=6))
    assert calls == []
    rec.completed.set.assert_not_called()


def _fake_consumer_thread(buffered: dict[TP, list[int]]) -> tuple[MagicMock, MagicMock]:
    """A Faust consumer thread and an aiokafka consumer whose fetcher behaves like aiokafka's
    ``fetched_records``: an empty (falsy) partition set returns every buffered partition."""
    thread, consumer = MagicMock(), MagicMock()
    thread.consumer.flow_active = True
    consumer._closed = consumer._fetcher._closed = False

    async def fetched_records(
        partitions: set[TP], timeout: float = 0, max_records: int | None = None
    ) -> dict[TP, list[int]]:
        return {tp: r for tp, r in buffered.items() if not partitions or tp in partitions}

    consumer._fetcher.fetched_records = AsyncMock(side_effect=fetched_records)
    return thread, consumer


def test_no_records_of_paused_partitions_while_every_partition_is_paused() -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    faust_compat.install(None)
    thread, consumer = _fake_consumer_thread({TP("clicks", 2): [79, 80, 81]})
    active: set[TP] = set()  # Faust's live set, empty between recovery and resume
    got = asyncio.run(AIOKafkaConsumerThread._fetch_records(thread, consumer, active, timeout=1))
    assert got == {}
    consumer._fetcher.fetched_records.assert_not_awaited()


def test_fetch_gets_a_snapshot_of_the_active_partitions() -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    faust_compat.install(None)
    thread, consumer = _fake_consumer_thread({TP("clicks", 0): [1], TP("clicks", 2): [79]})
    active = {TP("clicks", 0)}
    got = asyncio.run(AIOKafkaConsumerThread._fetch_records(thread, consumer, active, timeout=1))
    assert got == {TP("clicks", 0): [1]}
    passed = consumer._fetcher.fetched_records.await_args.args[0]
    assert passed == {TP("clicks", 0)} and passed is not active
