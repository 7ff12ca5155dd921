"""Session-parallel mini-batches (GRU4Rec, ICLR 2016), computed once as index arrays.

B slots each read one session, one event per step.  When a slot's session runs out, the next
session (sessions ordered by first event time, then SessionId) takes the slot and the slot's
hidden state is reset; slots that finish at the same step are refilled in slot order, as in the
official iterator.  The schedule is a pure function of the session lengths, so it is computed
once (``O(S log B)`` over sessions, no per-event Python loop) and every training step only slices
the resulting ``[T, B]`` arrays.  Unlike the official iterator the batch never shrinks at the end:
slots without a session are marked invalid instead (fixed shapes, no host sync in the loop).

:func:`training_order` (the order of sessions and events) and :func:`schedule_sessions` (which
slot takes which session when) are the one copy of both rules: GRU4Rec's plan here, HRNN's
time-ordered session-parallel batches and the user-parallel batches (``trainer.hier.batches``)
are built from them.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from streamrec.data.clicklog import ITEM, SESSION, TIME


def training_order(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of a click frame in training order: ``(row order, offsets, session ids)``.

    Sessions are ordered by first event time, then SessionId (as strings); events by Time
    (stable). Session ``j`` is ``df.iloc[order[offsets[j]:offsets[j + 1]]]``.
    """
    sess = df[SESSION].astype(str).to_numpy()
    time = df[TIME].to_numpy(dtype=np.float64)
    codes, uniques = pd.factorize(sess)
    first = np.full(len(uniques), np.inf)
    np.minimum.at(first, codes, time)
    # rank sessions by (first time, SessionId)
    sess_rank = np.empty(len(uniques), dtype=np.int64)
    sess_rank[np.lexsort((uniques.astype(str), first))] = np.arange(len(uniques))
    order = np.lexsort((np.arange(len(df)), time, sess_rank[codes]))
    counts = np.bincount(sess_rank[codes], minlength=len(uniques))
    offsets = np.zeros(len(uniques) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    ids = np.empty(len(uniques), dtype=object)
    ids[sess_rank] = uniques
    return order, offsets, ids


def session_arrays(
    df: pd.DataFrame, item_index: Mapping[str, int] | pd.Series
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode a click frame as ``(item_rows, offsets, session_ids)``.

    Sessions are ordered by first event time, then SessionId; events by Time (stable).
    Session ``j`` is ``item_rows[offsets[j]:offsets[j + 1]]``. Raises ValueError if an item is
    not in ``item_index`` (test data must be restricted to the training items).
    """
    missing_cols = [c for c in (SESSION, ITEM, TIME) if c not in df.columns]
    if missing_cols:
        raise ValueError(f"test frame lacks column(s) {missing_cols}")
    if len(df) == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, object)
    rows = df[ITEM].astype(str).map(item_index)
    if rows.isna().any():
        unknown = pd.unique(df.loc[rows.isna(), ITEM])
        raise ValueError(
            f"{len(unknown)} test item(s) are not in the item index (restrict the test set to "
            f"training items first), e.g. {list(unknown[:5])}"
        )
    order, offsets, ids = training_order(df)
    return rows.to_numpy(dtype=np.int64)[order], offsets, ids


@dataclass
class SessionArrays:
    """Sessions in training order: ``items[offsets[s]:offsets[s+1]]`` are session s's rows."""

    items: np.ndarray  # int64 item rows, sessions contiguous, events in time order
    offsets: np.ndarray  # int64 [S + 1]
    session_ids: np.ndarray  # [S] the SessionId of each session


def order_sessions(df: pd.DataFrame, item_index: dict[str, int] | pd.Series) -> SessionArrays:
    """Sort sessions by (first event time, SessionId) and events by Time (stable).

    The same order as the evaluation's (both use :func:`session_arrays`).
    """
    items, offsets, ids = session_arrays(df, item_index)
    return SessionArrays(items, offsets, ids)


#: the array type of a plan: numpy arrays as planned, device tensors after ``BatchPlan.to``
A = TypeVar("A", np.ndarray, Tensor)


@dataclass
class BatchPlan(Generic[A]):
    """Per-step index arrays, ``[T, B]`` each (numpy or device tensors)."""

    inputs: A  # item row fed at this step (0 in empty slots)
    targets: A  # item row to predict (0 in empty slots)
    reset: A  # True: the slot starts a new session here (zero its state first)
    valid: A  # True: the slot holds a session at this step
    n_events: int  # number of (input, target) pairs = valid.sum()

    @property
    def n_steps(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str) -> BatchPlan[Tensor]:
        def t(a: np.ndarray | Tensor) -> Tensor:
            return torch.as_tensor(a).to(device)

        return BatchPlan(
            t(self.inputs), t(self.targets), t(self.reset), t(self.valid), self.n_events
        )


def session_parallel_plan(sessions: SessionArrays, batch_size: int) -> BatchPlan[np.ndarray]:
    """Assign sessions to slots and lay out every step's inputs, targets, resets, valid mask."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.diff(sessions.offsets)
    use = np.flatnonzero(lengths >= 2)  # a session of one event has nothing to predict
    n_steps_each = lengths[use] - 1
    start, slot = schedule_sessions(n_steps_each, batch_size)
    n_total = int(n_steps_each.sum())
    n_steps = int((start + n_steps_each).max()) if len(use) else 0
    # vectorised fill: one entry per (input, target) pair
    within = np.arange(n_total) - np.repeat(np.cumsum(n_steps_each) - n_steps_each, n_steps_each)
    step = np.repeat(start, n_steps_each) + within
    col = np.repeat(slot, n_steps_each)
    src = np.repeat(sessions.offsets[use], n_steps_each) + within
    inputs = np.zeros((n_steps, batch_size), dtype=np.int64)
    targets = np.zeros((n_steps, batch_size), dtype=np.int64)
    valid = np.zeros((n_steps, batch_size), dtype=bool)
    reset = np.zeros((n_steps, batch_size), dtype=bool)
    inputs[step, col] = sessions.items[src]
    targets[step, col] = sessions.items[src + 1]
    valid[step, col] = True
    reset[start, slot] = True
    return BatchPlan(inputs, targets, reset, valid, n_total)


def schedule_sessions(
    n_steps_each: np.ndarray,
    batch_size: int,
    users: np.ndarray | None = None,
    lookahead: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Start step and slot of every session (given in order; session ``j`` takes
    ``n_steps_each[j]`` steps): greedy list scheduling, the slot that frees up first (ties: the
    lowest slot) takes the next session, i.e. exactly the official iterator's refill order.

    With ``users`` (each session's user) a session starts only after its user's previous
    session has ended: a free slot takes the first of the next ``lookahead`` (default
    ``4 * batch_size``) unscheduled sessions whose user is free and whose earlier sessions are
    all scheduled; if none is, the slot idles until the earliest such user is free. Without
    ``users`` every session is free at once, so this is the plain schedule.
    """
    n = len(n_steps_each)
    start = np.full(n, -1, dtype=np.int64)
    slot = np.full(n, -1, dtype=np.int64)
    steps = n_steps_each.tolist()
    heap = [(0, s) for s in range(batch_size)]
    window = 1 if users is None else lookahead or 4 * batch_size
    free_at: dict[int, int] = {}  # user -> first step after their last scheduled session
    pending: list[int] = []  # unscheduled sessions, in order
    nxt = 0
    while nxt < n or pending:
        t, s = heapq.heappop(heap)
        while nxt < n and len(pending) < window:
            pending.append(nxt)
            nxt += 1
        pick, wait = _first_ready(pending, users, free_at, t)
        if pick < 0:  # nobody free among the candidates: the slot idles
            heapq.heappush(heap, (wait, s))
            continue
        j = pending.pop(pick)
        start[j], slot[j] = t, s
        heapq.heappush(heap, (t + steps[j], s))
        if users is not None:
            free_at[int(users[j])] = t + steps[j]
    return start, slot


def _first_ready(
    pending: list[int], users: np.ndarray | None, free_at: dict[int, int], t: int
) -> tuple[int, int]:
    """``(position in pending of the first session that may start at step t, t)``, or
    ``(-1, the first step at which one may)``."""
    if users is None:
        return 0, t
    seen: set[int] = set()
    wait: int | None = None
    for k, j in enumerate(pending):
        u = int(users[j])
        if u in seen:  # an earlier session of this user is still unscheduled
            continue
        seen.add(u)
        ready = free_at.get(u, 0)
        if ready <= t:
            return k, t
        wait = ready if wait is None else min(wait, ready)
    return -1, wait if wait is not None else t + 1
