"""The native worker's idle sweep, in bounded steps.

Candidates come from each partition's last-activity index (oldest first,
:meth:`RocksDBPartition.idle_candidates`), so the work is what expires, not what is stored;
what ends or expires is decided by :mod:`streamrec.serving.expiry` (the rules the Faust
engine and the tests run too). A step takes chunks of candidates until its time budget is
spent; each chunk is sized to the budget left at the measured cost per key, and partitions
take turns at being first, so one partition with much to expire does not starve the rest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from streamrec.engines.native.store import INDEX_SESSIONS, INDEX_USERS, RocksDBPartition
from streamrec.serving.arms import Models
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.expiry import end_idle_sessions, expire_idle_users
from streamrec.serving.records import SweepResult
from streamrec.serving.state_store import StateStore

#: the idle sweep's work per loop turn: chunks of candidate keys until this many seconds have
#: passed (then the loop polls again). A chunk is sized to what is left of the budget at the
#: measured cost per key (an HRNN session end advances a user state: ~0.1-1 ms a key), between
#: SWEEP_MIN_KEYS (progress even with no budget left) and SWEEP_STEP_KEYS, so a step overruns
#: its budget by at most about SWEEP_MIN_KEYS keys' work.
SWEEP_STEP_KEYS = 128
SWEEP_MIN_KEYS = 4
SWEEP_STEP_S = 0.03
#: the cost per key assumed before any is measured (pessimistic: the first chunk is small)
SWEEP_KEY_COST_S = 0.002


@dataclass
class _Step:
    """One step under way: its start, budget and what it has done so far."""

    store: StateStore
    model: Models
    config: CoreConfig
    clock: StreamClock
    budget_s: float
    t0: float
    chunks: int = 0
    ended: int = 0
    expired: int = 0

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)


class Sweeper:
    """The sweep's memory between steps: the cost per key and whose turn it is."""

    def __init__(self) -> None:
        self.key_cost = SWEEP_KEY_COST_S  # seconds per swept key, a moving average
        self.first = 0  # the partition the next step starts with (round robin)

    def step(
        self,
        store: StateStore,
        partitions: Mapping[int, RocksDBPartition],
        model: Models,
        config: CoreConfig,
        clock: StreamClock,
        budget_s: float = SWEEP_STEP_S,
    ) -> tuple[SweepResult, bool]:
        """One bounded step: close idle sessions (advancing HRNN user states) and expire idle
        users. Returns what it did and whether more may remain (the loop calls again)."""
        step = _Step(store, model, config, clock, budget_s, time.monotonic())
        more = False
        order = sorted(partitions)
        first = self.first % len(order) if order else 0
        for i in range(len(order)):
            at = (first + i) % len(order)
            p = order[at]
            now = clock.now(p)
            if now is None:
                continue  # this partition's clock has not seen enough events yet
            worked, done = self._partition(step, partitions[p], p, now)
            if not done:
                more = True
                # round robin: the next step begins after a partition that got work done
                # (one with much to expire does not hold up the others), else with this one
                self.first = (at + 1) % len(order) if worked else at
                break
        result = SweepResult(sessions_ended=step.ended, users_expired=step.expired, counted=False)
        return result, more

    def _partition(
        self, step: _Step, state: RocksDBPartition, p: int, now: float
    ) -> tuple[bool, bool]:
        """Chunks of partition ``p`` until it has nothing idle or the budget is spent (every
        step gets through at least one chunk). Returns (worked, done)."""
        cfg, ttl = step.config, step.config.user_ttl_seconds
        worked = False
        while True:
            left = step.left()
            if left <= 0 and step.chunks:
                return worked, False  # spent
            n = min(SWEEP_STEP_KEYS, max(SWEEP_MIN_KEYS, int(left / self.key_cost)))
            t_chunk = time.monotonic()
            keys, m1 = state.idle_candidates(INDEX_SESSIONS, now - cfg.session_gap_seconds, n)
            if keys:
                step.ended += end_idle_sessions(
                    step.store, p, keys, step.model, cfg, step.clock.now
                )
            m2 = False
            ukeys: list[str] = []
            if ttl is not None:
                ukeys, m2 = state.idle_candidates(INDEX_USERS, now - ttl, n)
                step.expired += expire_idle_users(step.store, p, ukeys, cfg, step.clock.now)
            step.chunks += 1
            worked = True
            if keys or ukeys:
                per_key = (time.monotonic() - t_chunk) / (len(keys) + len(ukeys))
                self.key_cost = max(1e-6, 0.7 * self.key_cost + 0.3 * per_key)
            if not (m1 or m2):
                return worked, True
