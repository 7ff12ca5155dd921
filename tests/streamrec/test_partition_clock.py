"""A partition's clock: the median skew of its window and of its last n events."""

from __future__ import annotations

import pytest

from streamrec.serving.clock import PartitionClock, StreamClock
from streamrec.serving.config import CoreConfig


@pytest.mark.parametrize(
    ("skews", "n", "median"),
    [
        ([5.0, 1.0, 3.0], 3, 3.0),  # odd: the middle one
        ([1.0, 2.0, 3.0, 10.0], 4, 2.5),  # even: the mean of the two middle ones
        ([1.0, 3.0], 2, 2.0),
        ([7.0, 1.0, 2.0, 3.0, 10.0, 20.0, 30.0], 6, 6.5),  # only the last n count
        ([100.0, 1.0, 2.0, 3.0, 10.0], 4, 2.5),
    ],
)
def test_recent_median_is_the_median_of_the_last_n_skews(
    skews: list[float], n: int, median: float
) -> None:
    clock = PartitionClock(window=101)
    for s in skews:
        clock.push(s)
    assert clock.recent_median(n) == median


def test_median_skew_of_an_even_window_is_the_mean_of_its_two_middle_skews() -> None:
    clock = PartitionClock(window=4)
    for s in [50.0, 1.0, 2.0, 3.0, 10.0]:  # the first one falls out of the window
        clock.push(s)
    assert clock.median_skew() == 2.5


def test_each_partition_clock_of_a_stream_clock_keeps_the_stream_clocks_window() -> None:
    clock = StreamClock(window=5, min_events=100)  # never trusted: every event is observed
    for i in range(8):
        assert clock.check(partition=3, t=1000.0 + i, arrival=1000.0) is None
    assert list(clock.partitions[3].skews) == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_a_stream_clock_from_config_takes_each_knob() -> None:
    config = CoreConfig(
        clock_window=7, clock_min_events=3, max_ahead_seconds=60.0, max_skew_seconds=120.0
    )
    clock = StreamClock.from_config(config)
    assert (clock.window, clock.min_events, clock.max_ahead, clock.max_skew) == (7, 3, 60.0, 120.0)


def test_an_event_far_from_its_partitions_clock_says_how_far() -> None:
    clock = StreamClock(min_events=3, max_skew_seconds=1000.0)
    for _ in range(3):
        assert clock.check(partition=2, t=1100.0, arrival=1000.0) is None  # skew +100 s
    why = clock.check(partition=2, t=1000.0 - 5000.0, arrival=1000.0)  # skew -5000 s
    assert why == "event time -4000.000 is -5100 s away from partition 2's clock"
