"""Event time, one clock per input partition (:class:`StreamClock`), and the event-time
checks that make an event ``timestamp_out_of_range``.

A click's time is its body time, else its CreateTime, else its arrival; each partition's
clock reads arrival-now plus the median skew (event time - arrival) of its recent events, so
live traffic reads about the wall clock and a replay reads the log's own time. The idle sweep
judges each state against the clock of the partition it was last written from.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import islice

from streamrec.serving.config import CoreConfig


class PartitionClock:
    """Event time of one partition, robust to outliers.

    It keeps the *skew* (event time minus arrival wall time) of the partition's last
    ``window`` events; its time is the wall clock plus the median skew. So live traffic reads
    about the wall clock, a replay of an old log reads the log's own time (its skew is years,
    and steady), a partition that lags behind others keeps its own time, and no single
    message (nor any minority of the window) moves it. Between events it advances with the
    wall clock, so idle sessions still expire when traffic stops.
    """

    #: the median is recomputed after this many new events (a sort of <= window floats):
    #: one stale by a few events is as robust, and per event it costs ~0.2 µs, not ~10
    RECOMPUTE_EVERY = 16

    def __init__(self, window: int = 101) -> None:
        self.skews: deque[float] = deque(maxlen=window)
        self._median: float | None = None
        self._since = 0

    def median_skew(self) -> float | None:
        if self.skews and (self._median is None or self._since >= self.RECOMPUTE_EVERY):
            s = sorted(self.skews)
            n = len(s)
            self._median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
            self._since = 0
        return self._median

    def push(self, skew: float) -> None:
        self.skews.append(skew)
        self._since += 1

    def recent_median(self, n: int) -> float:
        """Median skew of the last ``n`` events (fresh, not cached: ``n`` is small)."""
        s = sorted(islice(reversed(self.skews), n))
        k = len(s)
        return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


class StreamClock:
    """One :class:`PartitionClock` per input partition, and the event-time checks.

    :meth:`check` decides whether an event time is in range for its partition: not more than
    ``max_ahead_seconds`` ahead of its arrival (a client clock hours fast, a CreateTime in
    2286), and, once the partition has seen ``min_events`` events, with a skew within
    ``max_skew_seconds`` of the partition's median skew, or of the median of the last
    ``min_events`` events before it. The second reference follows a fast replay of a sparse
    log, whose skew drifts by days per event (the window's median lags half a window behind
    it); a single odd event, or any minority of the last ``min_events``, moves neither.
    Every event checked (in range or not) enters the window, so a real, lasting change of
    skew (a new log replayed into the same partition) re-centres the clock; until then such
    events are dead-lettered with their bytes, to be replayed if wanted.
    """

    def __init__(
        self,
        window: int = 101,
        min_events: int = 8,
        max_ahead_seconds: float = 3600.0,
        max_skew_seconds: float = 30 * 24 * 3600.0,
    ) -> None:
        self.window = window
        self.min_events = min_events
        self.max_ahead = max_ahead_seconds
        self.max_skew = max_skew_seconds
        self.partitions: dict[int, PartitionClock] = {}

    @classmethod
    def from_config(cls, config: CoreConfig) -> StreamClock:
        return cls(
            config.clock_window,
            config.clock_min_events,
            config.max_ahead_seconds,
            config.max_skew_seconds,
        )

    def _clock(self, partition: int) -> PartitionClock:
        c = self.partitions.get(partition)
        if c is None:
            c = self.partitions[partition] = PartitionClock(self.window)
        return c

    def check(self, partition: int, t: float, arrival: float) -> str | None:
        """None if ``t`` is in range for ``partition`` (then observed), else why not."""
        c = self._clock(partition)
        skew = t - arrival
        trusted = len(c.skews) >= self.min_events
        median = c.median_skew() if trusted else None
        far = (
            median is not None
            and abs(skew - median) > self.max_skew
            and abs(skew - c.recent_median(self.min_events)) > self.max_skew
        )
        c.push(skew)
        if skew > self.max_ahead:
            return f"event time {t:.3f} is {skew:.0f} s ahead of its arrival"
        if far:
            assert median is not None
            return (
                f"event time {t:.3f} is {skew - median:+.0f} s away from partition "
                f"{partition}'s clock"
            )
        return None

    def observe(self, t: float, partition: int = 0, arrival: float | None = None) -> None:
        """Record an event time without checking it."""
        self._clock(partition).push(t - (time.time() if arrival is None else arrival))

    def now(self, partition: int = 0, wall: float | None = None) -> float | None:
        """The partition's event time now; None until it has seen ``min_events`` events
        (the sweep leaves such a partition alone: after a restart, the first few messages
        alone never decide what expires)."""
        c = self.partitions.get(partition)
        if c is None or len(c.skews) < self.min_events:
            return None
        median = c.median_skew()
        assert median is not None
        return (time.time() if wall is None else wall) + median
