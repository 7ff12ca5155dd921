"""``trainer retrain --every``: when cycles start (a new deployment's archive fills later)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from trainer.cli import retrain as cli
from trainer.retrain import RetrainError


class _Stop(BaseException):
    """Ends the endless loop (an Exception would be caught as a failed cycle)."""


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Metrics:
    def __init__(self) -> None:
        self.health = SimpleNamespace(busy=_ignore, done=_ignore, beat=_ignore)
        self.skipped = 0

    def observe_cycle(self, rec: dict[str, Any], metric: str) -> None:
        pass

    def observe_skipped(self) -> None:
        self.skipped += 1

    def observe_failed(self) -> None:
        pass


def _ignore(*args: object) -> None:
    pass


def test_next_wait_retries_sooner_only_until_a_cycle_has_run() -> None:
    hour = 3600.0
    assert cli.next_wait(hour, ran_once=False, skips_in_a_row=0) == hour
    assert [cli.next_wait(hour, False, n) for n in (1, 2, 3)] == [30.0, 60.0, 120.0]
    assert cli.next_wait(hour, False, 20) == hour  # never longer than the period
    assert cli.next_wait(hour, ran_once=True, skips_in_a_row=3) == hour
    assert cli.next_wait(10.0, False, 1) == 10.0  # a period shorter than the first retry


def test_an_empty_archive_at_start_is_read_again_soon_not_a_period_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock, starts = _FakeClock(), []
    todo = iter(["skip", "skip", "run", "skip"])

    def cycle(cfg: object, echo: object) -> dict[str, Any]:
        starts.append(clock.now)
        what = next(todo, None)
        if what is None:
            raise _Stop
        if what == "skip":
            raise RetrainError("archive/: the archive holds no files")
        return {"event": "retrain"}

    monkeypatch.setattr(cli, "time", clock)
    monkeypatch.setattr(cli, "run_cycle", cycle)
    metrics = _Metrics()
    with pytest.raises(_Stop):
        cli._run_every(SimpleNamespace(metric="mrr@20"), 3600.0, metrics)  # type: ignore[arg-type]  # a stand-in config and metrics
    # skipped at 0 and 30 s, ran at 90 s; from then on every period, skipped or not
    assert starts == [0.0, 30.0, 90.0, 3690.0, 7290.0]
    assert metrics.skipped == 3
