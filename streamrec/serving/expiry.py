"""The idle sweep: sessions idle for longer than the gap end (advancing their user states)
and are deleted; user states idle for longer than ``user_ttl_seconds`` are deleted.

One copy of each rule, run by both engines and by the tests:

* :func:`end_idle_sessions` and :func:`expire_idle_users` decide and act on given candidate
  keys of one partition. The engines take candidates from their last-activity indexes
  (oldest first, in bounded steps: ``streamrec.engines.native.sweep``,
  ``streamrec.engines.faust.app``); :func:`sweep_idle` takes every key of every partition
  (the tests, small stores) and calls the same two functions.
* Idle is judged against the clock of the partition each state was last written from
  (``clock.now(state.partition)``); a partition whose clock is not yet trusted is left alone.
  Without a clock, a fixed ``now`` (default: the wall clock) is every partition's time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

from streamrec.serving.arms import Models, as_arms
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import DEFAULT_CONFIG, CoreConfig
from streamrec.serving.pipeline import KeyStates, end_sessions, migrate_states
from streamrec.serving.records import SweepResult
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state import SessionState, StateDecodeError, UserState
from streamrec.serving.state_store import SESSIONS, USERS, StateStore

#: partition -> its event time now (None: its clock is not trusted yet)
Now = Callable[[int], float | None]


def clock_reader(clock: StreamClock | None, now: float | None = None) -> Now:
    """What the sweep asks for a partition's time: its clock's (read at wall time ``now``
    when given, else at the current time), else the fixed ``now``."""
    if clock is not None:
        if now is None:
            return clock.now
        return lambda partition: clock.now(partition, wall=now)
    fixed = time.time() if now is None else now
    return lambda _partition: fixed


def end_idle_sessions(
    store: StateStore,
    partition: int,
    keys: Iterable[str],
    models: Models,
    config: CoreConfig,
    now_of: Now,
    batch_size: int = 256,
) -> int:
    """End the sessions among ``keys`` (of ``partition``) idle for longer than the gap:
    advance (and store) their user states, each with the model of the key's arm, delete
    them. Returns how many ended."""
    arms = as_arms(models)
    by_model: dict[int, tuple[ServingModel, list[tuple[str, SessionState]]]] = {}
    for key in keys:
        s = store.get_session(key, partition)
        if s is None:
            continue
        t = now_of(s.partition)
        if t is not None and t - s.last_time > config.session_gap_seconds:
            model = arms.model_of_state_key(key)
            by_model.setdefault(id(model), (model, []))[1].append((key, s))
    for model, idle in by_model.values():
        _end_idle(store, partition, idle, model, config, batch_size)
    return sum(len(idle) for _, idle in by_model.values())


def _end_idle(
    store: StateStore,
    partition: int,
    idle: list[tuple[str, SessionState]],
    model: ServingModel,
    config: CoreConfig,
    batch_size: int,
) -> None:
    stats: Counter[str] = Counter()
    for i in range(0, len(idle), batch_size):
        chunk = idle[i : i + batch_size]
        work = []
        positions = []
        for key, s in chunk:
            user = store.get_user(key, partition) if s.user_id is not None else None
            k = KeyStates(s, user)
            migrate_states([k], model, stats)  # re-encodes s in place
            work.append((key, k))
            positions.append((s.partition, s.offset, s.incarnation))
        end_sessions(work, model, config, positions, stats)
        for key, k in work:
            store.delete_session(key, partition)
            if k.user is not None and k.user_dirty:
                store.put_user(key, k.user, partition, config.max_state_bytes)


def expire_idle_users(
    store: StateStore, partition: int, keys: Iterable[str], config: CoreConfig, now_of: Now
) -> int:
    """Delete the user states among ``keys`` (of ``partition``) idle for longer than
    ``user_ttl_seconds``; a user with an open session is kept (the session's end rewrites it).
    Returns how many were deleted."""
    ttl = config.user_ttl_seconds
    if ttl is None:
        return 0
    expired = 0
    for key in keys:
        u = store.get_user(key, partition)
        if u is None:
            continue
        t = now_of(u.partition)
        if t is None or t - u.last_time <= ttl:
            continue
        if store.has_session(key, partition):
            continue  # its session's end rewrites (and re-indexes) it
        store.delete_user(key, partition)
        expired += 1
    return expired


def sweep_idle(
    store: StateStore,
    model: Models,
    config: CoreConfig = DEFAULT_CONFIG,
    *,
    now: float | None = None,
    clock: StreamClock | None = None,
    batch_size: int = 256,
) -> SweepResult:
    """The whole sweep at once, every state of every partition a candidate (the engines sweep
    in bounded steps from their indexes instead); counts the states left."""
    now_of = clock_reader(clock, now)
    res = SweepResult()
    for p, part in store.partitions():
        sessions = list(part.keys(SESSIONS))
        res.sessions_ended += end_idle_sessions(
            store, p, sessions, model, config, now_of, batch_size
        )
        # after the session ends, which may have written users
        res.users_expired += expire_idle_users(store, p, list(part.keys(USERS)), config, now_of)
        res.sessions_left += sum(1 for _ in part.keys(SESSIONS))
        res.users_left += sum(1 for key in part.keys(USERS) if _decodes(part.get(USERS, key)))
    return res


def _decodes(raw: bytes | None) -> bool:
    if raw is None:
        return False
    try:
        UserState.from_bytes(raw)
    except StateDecodeError:
        return False
    return True
