"""Session-parallel mini-batches (GRU4Rec, ICLR 2016), computed once as index arrays.

B slots each read one session, one event per step.  When a slot's session runs out, the next
session (sessions ordered by first event time, then SessionId) takes the slot and the slot's
hidden state is reset; slots that finish at the same step are refilled in slot order, as in the
official iterator.  The schedule is a pure function of the session lengths, so it is computed
once (``O(S log B)`` over sessions, no per-event Python loop) and every training step only slices
the resulting ``[T, B]`` arrays.  Unlike the official iterator the batch never shrinks at the end:
slots without a session are marked invalid instead (fixed shapes, no host sync in the loop).
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
    sess = df[SESSION].astype(str).to_numpy()
    time = df[TIME].to_numpy(dtype=np.float64)
    codes, uniques = pd.factorize(sess)
    first = np.full(len(uniques), np.inf)
    np.minimum.at(first, codes, time)
    # rank sessions by (first time, SessionId)
    sess_rank = np.empty(len(uniques), dtype=np.int64)
    sess_rank[np.lexsort((uniques.astype(str), first))] = np.arange(len(uniques))
    order = np.lexsort((np.arange(len(df)), time, sess_rank[codes]))
    item_rows = rows.to_numpy(dtype=np.int64)[order]
    counts = np.bincount(sess_rank[codes], minlength=len(uniques))
    offsets = np.zeros(len(uniques) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    ids = np.empty(len(uniques), dtype=object)
    ids[sess_rank] = uniques
    return item_rows, offsets, ids


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
    # Greedy list scheduling: the next session goes to the slot that frees up first (ties: lowest
    # slot), i.e. exactly the official refill order.
    heap = [(0, s) for s in range(batch_size)]
    start = np.empty(len(use), dtype=np.int64)
    slot = np.empty(len(use), dtype=np.int64)
    for k, n in enumerate(n_steps_each.tolist()):
        t, s = heapq.heappop(heap)
        start[k], slot[k] = t, s
        heapq.heappush(heap, (t + n, s))
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
