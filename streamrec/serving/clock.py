"""Event time, one clock per input partition (:class:`StreamClock`), and the event-time
checks that make an event ``timestamp_out_of_range``.

A click's time is its body time, else its CreateTime, else its arrival; each partition's
clock reads arrival-now plus the median skew (event time - arrival) over the partition's
recently active *keys*, so live traffic reads about the wall clock and a replay reads the
log's own time. The idle sweep judges each state against the clock of the partition it was
last written from.

Who moves a clock (docs/architecture.md, "Trust"): each key has one vote, the skew of its
latest accepted event, however many messages it sends; a dead letter does not vote. So keys
fewer than half of a partition's voting keys cannot move its clock out of the range of the
other keys' skews (the clock is the *lower* median: with an even count a tie cannot pull it
ahead either). A real, lasting change of skew (a new log replayed into the partition) is
carried by a majority of the keys: once the keys whose latest event was refused as far from
the clock, and that agree among themselves, are more than half of the window's keys, they
become the clock.
"""

from __future__ import annotations

import time
from itertools import islice

import numpy as np

from streamrec.serving.config import CoreConfig


class PartitionClock:
    """Event time of one partition: one vote per key among its last ``window`` active keys.

    Each key in the window holds its latest skew (event time minus arrival wall time) and
    whether that event was accepted (a *vote*) or refused as far from the clock (a
    *dissent*). The clock's skew is the lower median of the votes; between events it
    advances with the wall clock, so idle sessions still expire when traffic stops. The
    window is the ``window`` keys most recently heard (a key's new event moves it to the
    front; the key heard longest ago leaves when a new key comes).
    """

    #: the median is recomputed once this many votes have changed, or an eighth of them if
    #: fewer (a partial sort of at most ``window`` floats, O(1) a change): a median stale by a
    #: few votes is as robust (a minority cannot move it either), and per event it costs a
    #: fraction of a microsecond
    RECOMPUTE_EVERY = 32
    #: a key's vote is rewritten only when its skew moved by more than this (s): live traffic
    #: jitters by milliseconds, and the clock is used at the scale of minutes
    RESOLUTION_S = 1.0

    def __init__(
        self, window: int = 1001, min_keys: int = 8, max_skew: float = 30 * 24 * 3600.0
    ) -> None:
        self.window = max(1, window)
        self.min_keys = min_keys
        self.max_skew = max_skew
        self._agree = 0  # votes within max_skew of the median (as of its last computation)
        self.slots: dict[str, int] = {}  # key -> slot; insertion order = least recent first
        self.skews = np.zeros(self.window, dtype=np.float64)
        self.accepted = np.zeros(self.window, dtype=bool)
        self.votes = 0  # accepted slots in use
        self._median: float | None = None
        self._changed = 0

    @property
    def keys(self) -> int:
        return len(self.slots)

    def reading(self) -> float | None:
        """The clock's skew if it is trusted, else None. Trusted: ``min_keys`` keys vote and
        more than two thirds of the votes agree with the median (within ``max_skew``): after
        a restart, a few keys that came first (a burst dated 2001 from five keys) do not
        make the clock refuse the many that follow."""
        median = self.median_skew()
        if median is None or self.votes < self.min_keys or 3 * self._agree <= 2 * self.votes:
            return None
        return median

    def median_skew(self) -> float | None:
        """The lower median of the votes (None: no vote)."""
        if self.votes == 0:
            return None
        if self._median is None or self._changed >= min(self.RECOMPUTE_EVERY, self.votes // 8 + 1):
            n = len(self.slots)
            v = self.skews[:n][self.accepted[:n]]
            k = (v.size - 1) // 2
            median = float(np.partition(v, k)[k])
            self._agree = int(np.count_nonzero(np.abs(v - median) <= self.max_skew))
            self._median = median
            self._changed = 0
        return self._median

    def recent_median(self, n: int) -> float | None:
        """Lower median of the votes of the ``n`` keys that voted most recently (fresh, not
        cached: ``n`` is small). None if none voted."""
        skews, accepted = self.skews, self.accepted
        recent = islice((skews[s] for s in reversed(self.slots.values()) if accepted[s]), n)
        s = sorted(recent)
        return s[(len(s) - 1) // 2] if s else None

    def _slot(self, key: str) -> int:
        """``key``'s slot, now the most recent; a new key takes a free slot or that of the
        key heard longest ago."""
        slot = self.slots.pop(key, None)
        if slot is None:
            n = len(self.slots)
            if n < self.window:
                slot = n
                self.accepted[slot] = False
            else:
                oldest = next(iter(self.slots))
                slot = self.slots.pop(oldest)
                if self.accepted[slot]:
                    self.votes -= 1
                    self._changed += 1
                    self.accepted[slot] = False
            self.skews[slot] = np.nan
        self.slots[key] = slot
        return slot

    def vote(self, key: str, skew: float) -> None:
        """``key``'s latest event, accepted: its skew is the key's vote."""
        slot = self._slot(key)
        if self.accepted[slot]:
            if abs(self.skews[slot] - skew) <= self.RESOLUTION_S:
                return  # the same vote
        else:
            self.accepted[slot] = True
            self.votes += 1
            if self.votes <= 4 * self.min_keys:
                self._median = None  # on the way to trust: a fresh median every vote
        self.skews[slot] = skew
        self._changed += 1

    def dissent(self, key: str, skew: float) -> bool:
        """``key``'s latest event, refused as far from the clock: the key no longer votes.
        If the dissenting keys that agree among themselves are now more than half of the
        window's keys, they become the votes (the clock re-centres on them); returns True if
        ``key`` is one of them (its event is in range after all)."""
        slot = self._slot(key)
        if self.accepted[slot]:
            self.accepted[slot] = False
            self.votes -= 1
            self._changed += 1
        self.skews[slot] = skew
        n = len(self.slots)
        if 2 * (n - self.votes) <= n:
            return False
        dissenting = ~self.accepted[:n]
        d = self.skews[:n][dissenting]
        centre = float(np.partition(d, (d.size - 1) // 2)[(d.size - 1) // 2])
        agree = dissenting & (np.abs(self.skews[:n] - centre) <= self.max_skew)
        if 2 * int(agree.sum()) <= n:
            return False
        self.accepted[:n] |= agree
        self.votes += int(agree.sum())
        self._median = None
        return bool(agree[slot])


class StreamClock:
    """One :class:`PartitionClock` per input partition, and the event-time checks.

    :meth:`check` decides whether an event time is in range for its partition: not more than
    ``max_ahead_seconds`` ahead of its reference (its arrival, or its record's CreateTime if
    that is earlier: a client clock hours fast, a CreateTime in 2286), and, once the
    partition's clock is trusted (``min_keys`` keys vote), not more than ``max_skew_seconds``
    *behind* the clock's skew, or behind the lower median of the ``min_keys`` keys that
    voted last (which follows a fast replay of a sparse log, whose skew drifts by days per
    event). An event ahead of the clock but not of its record is in range: it is one vote
    and cannot move the clock, and in a replay the keys still active run weeks or months
    ahead of the median key, last heard long ago (a live stream's clock reads about the wall
    clock, so there ahead of the clock is ahead of the record). An event
    refused as far from the clock is its key's dissent (see :class:`PartitionClock`); one
    refused as ahead of its arrival neither votes nor dissents.
    """

    def __init__(
        self,
        window: int = 1001,
        min_keys: int = 8,
        max_ahead_seconds: float = 3600.0,
        max_skew_seconds: float = 30 * 24 * 3600.0,
    ) -> None:
        self.window = window
        self.min_keys = min_keys
        self.max_ahead = max_ahead_seconds
        self.max_skew = max_skew_seconds
        self.partitions: dict[int, PartitionClock] = {}

    @classmethod
    def from_config(cls, config: CoreConfig) -> StreamClock:
        return cls(
            config.clock_window,
            config.clock_min_keys,
            config.max_ahead_seconds,
            config.max_skew_seconds,
        )

    def _clock(self, partition: int) -> PartitionClock:
        c = self.partitions.get(partition)
        if c is None:
            c = self.partitions[partition] = PartitionClock(
                self.window, self.min_keys, self.max_skew
            )
        return c

    def check(
        self, partition: int, key: str, t: float, arrival: float, reference: float | None = None
    ) -> str | None:
        """None if ``t`` is in range for ``partition`` (then ``key`` votes with its skew),
        else why not. ``reference`` is the earliest time the record is known to have
        existed by (default: ``arrival``); the ahead check measures from it."""
        ref = arrival if reference is None else min(reference, arrival)
        if t - ref > self.max_ahead:
            return f"event time {t:.3f} is {t - ref:.0f} s ahead of its record's time"
        c = self._clock(partition)
        skew = t - arrival
        median = c.reading()
        # ahead of the clock is in range (its record's time bounds it, above): in a replay the
        # few keys still active run weeks ahead of keys last heard long ago
        if median is None or skew - median >= -self.max_skew:
            c.vote(key, skew)
            return None
        recent = c.recent_median(self.min_keys)
        if recent is not None and skew - recent >= -self.max_skew:
            c.vote(key, skew)
            return None
        if c.dissent(key, skew):
            return None  # the clock re-centred on the keys this event agrees with
        return (
            f"event time {t:.3f} is {skew - median:+.0f} s away from partition {partition}'s clock"
        )

    def observe(
        self, t: float, partition: int = 0, arrival: float | None = None, key: str = ""
    ) -> None:
        """Record ``key``'s event time as its vote, without checking it."""
        self._clock(partition).vote(key, t - (time.time() if arrival is None else arrival))

    def now(self, partition: int = 0, wall: float | None = None) -> float | None:
        """The partition's event time now; None until ``min_keys`` keys vote (the sweep
        leaves such a partition alone: after a restart, a few keys alone never decide what
        expires)."""
        c = self.partitions.get(partition)
        median = None if c is None else c.reading()
        if median is None:
            return None
        return (time.time() if wall is None else wall) + median
