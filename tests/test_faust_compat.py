"""The Faust recovery patch without a broker: the call order that closes the race."""

from __future__ import annotations

import asyncio
from unittest.mock import AsyncMock, MagicMock

from faust.tables.recovery import Recovery

from streamrec import faust_compat


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

    async def wait(coro: object, timeout: float | None = None) -> object:
        return await coro  # type: ignore[misc]

    rec._wait = wait
    return rec


def test_stream_partitions_are_seeked_before_they_are_resumed() -> None:
    faust_compat.install({"bootstrap.servers": "127.0.0.1:1"})  # patches classes only
    calls: list[str] = []
    rec = _fake_recovery(calls)
    asyncio.run(Recovery.on_recovery_completed(rec, generation_id=7))
    assert calls == ["seek", "resume ['clicks-0', 'clicks-1']", "flow"]
    rec.completed.set.assert_called_once()
    rec.app.on_rebalance_end.assert_called_once()


def test_a_newer_generation_leaves_partitions_paused() -> None:
    faust_compat.install({"bootstrap.servers": "127.0.0.1:1"})
    calls: list[str] = []
    rec = _fake_recovery(calls)
    asyncio.run(Recovery.on_recovery_completed(rec, generation_id=6))
    assert calls == []
    rec.completed.set.assert_not_called()
