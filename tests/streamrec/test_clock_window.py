"""The partition clock's window of keys (streamrec.serving.clock.PartitionClock): a full
window takes a new key in the slot of the key heard longest ago, and that key's vote leaves;
and a stream clock built with no arguments is the one the default configuration builds."""

from __future__ import annotations

from streamrec.serving.clock import PartitionClock, StreamClock
from streamrec.serving.config import CoreConfig


def test_a_new_key_past_a_full_window_takes_the_slot_of_the_key_heard_longest_ago() -> None:
    clock = PartitionClock(window=4, min_keys=1)
    for i, skew in enumerate([100.0, 1.0, 2.0, 3.0]):
        clock.vote(f"k{i}", skew)
    assert clock.keys == 4 and clock.votes == 4
    clock.vote("k4", 4.0)  # the window is full: k0 (heard longest ago) leaves
    assert clock.keys == 4 and clock.votes == 4
    assert "k0" not in clock.slots and "k4" in clock.slots
    # k0's outlying vote left with it: the lower median of 1, 2, 3, 4
    assert clock.median_skew() == 2.0 and clock.recent_median(10) == 2.0


def test_the_recent_median_is_the_lower_median_of_the_keys_that_voted_last() -> None:
    clock = PartitionClock(window=8, min_keys=1)
    for i, skew in enumerate([50.0, 3.0, 1.0, 2.0]):
        clock.vote(f"k{i}", skew)
    assert clock.recent_median(3) == 2.0  # k1..k3: 1, 2, 3 (k0's 50 is not among the last 3)
    assert clock.recent_median(4) == 2.0  # the lower median of 1, 2, 3, 50
    assert clock.recent_median(1) == 2.0 and PartitionClock().recent_median(3) is None


def test_a_stream_clock_with_no_arguments_is_the_default_configurations() -> None:
    bare, configured = StreamClock(), StreamClock.from_config(CoreConfig())
    assert vars(bare) == vars(configured)
