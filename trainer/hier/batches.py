"""The two batchings of the user-aware models, as precomputed ``[T, B]`` index arrays.

``user_parallel_batches``: each of the B slots follows one user through all of their sessions
in time order (p-RNN's default, the HRNN paper's, and the per-user evaluation's).
``session_parallel_batches``: GRU4Rec's time-ordered session-parallel batches, with what
HRNN needs to chain each session's user state to the user's previous session.
Both take the order of sessions and events and the slot schedule from ``trainer.batching``
(one copy of each rule for every model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from streamrec.data.clicklog import ITEM, USER
from streamrec.model.api import StepModel
from trainer.batching import schedule_sessions, training_order

#: internal column: True for the events of a test session (per-user evaluation)
EVAL = "_eval"


@dataclass
class UserParallelBatches:
    """Precomputed index arrays ``[T, B]`` of a user-parallel pass over a click log.

    ``inputs``: item row fed at step t in slot b (-1: idle slot, or an item outside the index);
    ``targets``: the next item of the same session (-1: none, i.e. last event of a session,
    unknown item or idle); ``session_start``: a session starts at this step (the user state
    advances first unless ``user_start``); ``user_start``: a new user takes the slot (both
    states reset); ``flag``: the event belongs to an evaluated (test) session; ``position``:
    0-based position of the event in its session (-1 where idle).
    """

    inputs: np.ndarray
    targets: np.ndarray
    session_start: np.ndarray
    user_start: np.ndarray
    flag: np.ndarray
    position: np.ndarray
    slot_of_user: dict[str, int]
    n_events: int

    @property
    def n_steps(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def any_start(self) -> np.ndarray:
        return np.asarray(self.session_start.any(axis=1))


def _ordered_events(df: pd.DataFrame, mark: np.ndarray | None = None) -> pd.DataFrame:
    """Events sorted user by user (users by first event time, then id), sessions by their
    first event time then SessionId (test sessions of ``_eval`` last), events by Time (stable).
    ``_mark``: ``mark`` (one flag per row of ``df``, no effect on the order), else ``_flag``."""
    d = df[["UserId", "SessionId", "ItemId", "Time"]].copy()
    d["_flag"] = df[EVAL].to_numpy(dtype=bool) if EVAL in df.columns else False
    d["_mark"] = d["_flag"] if mark is None else np.asarray(mark, dtype=bool)
    d["_pos"] = np.arange(len(d))
    d["_sstart"] = d.groupby("SessionId", sort=False)["Time"].transform("min")
    d["_ustart"] = d.groupby("UserId", sort=False)["Time"].transform("min")
    return d.sort_values(
        ["_ustart", "UserId", "_flag", "_sstart", "SessionId", "Time", "_pos"], kind="stable"
    )


def user_parallel_batches(
    df: pd.DataFrame,
    item_index: Mapping[str, int],
    batch_size: int,
    shuffle_users: bool = False,
    seed: int = 0,
    mark: np.ndarray | None = None,
) -> UserParallelBatches:
    """User-parallel mini-batch index arrays (see :class:`UserParallelBatches`).

    ``flag`` marks the events of ``_eval`` sessions (ordered last in each user's history), or,
    with ``mark`` (one flag per row of ``df``), those events in their place in time.

    A slot that finishes its user takes the next user in order (by first event time, or
    shuffled with ``seed``); when no user is left the slot idles until the longest one ends.
    """
    if "UserId" not in df.columns:
        raise ValueError("user-parallel batches need a UserId column")
    if len(df) == 0:
        raise ValueError("no events")
    d = _ordered_events(df, mark)
    user = d["UserId"].astype(str).to_numpy()
    sess = d["SessionId"].astype(str).to_numpy()
    rows = np.fromiter((item_index.get(str(i), -1) for i in d["ItemId"]), np.int64, len(d))
    flag = d["_mark"].to_numpy(dtype=bool)
    n = len(d)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    new_sess = new_user.copy()
    new_sess[1:] |= sess[1:] != sess[:-1]
    last_of_sess = np.ones(n, dtype=bool)
    last_of_sess[:-1] = new_sess[1:]
    tgt = np.full(n, -1, dtype=np.int64)
    tgt[:-1] = np.where(last_of_sess[:-1], -1, rows[1:])
    tgt[rows < 0] = -1  # an unknown input keeps the state: its prediction is not trained
    sstarts = np.flatnonzero(new_sess)
    pos_in_sess = np.arange(n) - sstarts[np.cumsum(new_sess) - 1]
    ustarts = np.flatnonzero(new_user)
    lengths = np.diff(np.r_[ustarts, n])
    order = np.arange(len(ustarts))
    if shuffle_users:
        order = np.random.default_rng(seed).permutation(len(ustarts))
    b = min(batch_size, len(ustarts))
    # the slot that frees up first takes the next user
    offset = np.empty(len(ustarts), dtype=np.int64)
    slot = np.empty(len(ustarts), dtype=np.int64)
    offset[order], slot[order] = schedule_sessions(lengths[order], b)
    n_steps = int((offset + lengths).max())
    user_of_event = np.repeat(np.arange(len(ustarts)), lengths)
    pos_in_user = np.arange(n) - ustarts[user_of_event]
    t_idx = offset[user_of_event] + pos_in_user
    s_idx = slot[user_of_event]

    def grid(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        g = np.full((n_steps, batch_size), fill, dtype=dtype)
        g[t_idx, s_idx] = values
        return g

    return UserParallelBatches(
        inputs=grid(rows, -1, np.int64),
        targets=grid(tgt, -1, np.int64),
        session_start=grid(new_sess, False, bool),
        user_start=grid(new_user, False, bool),
        flag=grid(flag, False, bool),
        position=grid(pos_in_sess, -1, np.int64),
        slot_of_user={str(user[ustarts[u]]): int(slot[u]) for u in range(len(ustarts))},
        n_events=n,
    )


def user_states(states: Tensor | None) -> Tensor:
    """The user states a model with a user level returns (``initial_user_state``,
    ``end_session``): never None there."""
    if states is None:
        raise TypeError("a model with a user state returned no user states")
    return states


def advance_at_boundaries(
    model: StepModel,
    state: Tensor,
    user_state: Tensor | None,
    session_start: Tensor,
    user_start: Tensor,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Apply session/user boundaries of one step to the slots' states.

    ``session_start`` rows (not ``user_start``): user state <- end_session(user, state);
    ``user_start`` rows: user state <- initial (empty); both: session state <- initial_state.
    Only the starting slots are computed (``rows``: their indices, from the host where the
    caller has them; default: found on the device), so the user GRU costs per session, not
    per slot and step.
    """
    if rows is None:
        rows = session_start.nonzero().squeeze(1)
    n = int(rows.shape[0])
    if n == 0:
        return state, user_state
    us = None
    if user_state is not None:
        us = user_state.index_select(0, rows)
        advanced = user_states(model.end_session(us, state.index_select(0, rows)))
        new_user = user_start.index_select(0, rows).unsqueeze(1)
        us = torch.where(new_user, user_states(model.initial_user_state(n)), advanced)
        user_state = user_state.index_copy(0, rows, us)
    return state.index_copy(0, rows, model.initial_state(us, n)), user_state


@dataclass
class SessionParallelBatches:
    """Precomputed ``[T, B]`` index arrays of a time-ordered, session-parallel pass.

    ``inputs``/``targets`` as in :class:`UserParallelBatches`; ``session``: the session (index
    into the per-session arrays) in the slot at step t (-1: idle); ``start``/``end``: the
    session starts / has its last step here. Per session: ``user`` (0..n_users-1), ``tail``
    (its last item, fed after its last step so that ``end_session`` sees the whole session;
    -1 when the session has a single event, which is its only step) and ``prev`` (the user's
    previous session, -1 for their first).
    """

    inputs: np.ndarray
    targets: np.ndarray
    session: np.ndarray
    start: np.ndarray
    end: np.ndarray
    user: np.ndarray
    tail: np.ndarray
    prev: np.ndarray
    n_users: int
    n_events: int

    @property
    def n_steps(self) -> int:
        return int(self.inputs.shape[0])


def session_parallel_batches(
    df: pd.DataFrame,
    item_index: Mapping[str, int],
    batch_size: int,
    lookahead: int = 0,
    wait_for_user: bool = True,
) -> SessionParallelBatches:
    """Time-ordered session-parallel batches for user-aware models (see ``trainer.hier``).

    ``lookahead`` (default ``4 * batch_size``) bounds how far past a busy user's session the
    scheduler looks for a free one. ``wait_for_user=False`` keeps GRU4Rec's schedule exactly:
    a session may then start while its user's previous one still runs in another slot, and
    starts from the user state of the sessions finished by then (training only; evaluation and
    serving always see every earlier session)."""
    if "UserId" not in df.columns:
        raise ValueError("session-parallel user batches need a UserId column")
    if len(df) == 0:
        raise ValueError("no events")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order, offsets, _ = training_order(df)
    n = len(df)
    rows = np.fromiter(
        (item_index.get(str(i), -1) for i in df[ITEM].to_numpy()[order]), np.int64, n
    )
    first = offsets[:-1]
    lengths = np.diff(offsets)
    new_sess = np.zeros(n, dtype=bool)
    new_sess[first] = True
    user_codes, _ = pd.factorize(df[USER].astype(str).to_numpy()[order][first])
    n_steps_each = np.maximum(lengths - 1, 1)
    users = user_codes if wait_for_user else None
    start, slot = schedule_sessions(n_steps_each, batch_size, users, lookahead)
    n_steps = int((start + n_steps_each).max())
    inputs = np.full((n_steps, batch_size), -1, dtype=np.int64)
    targets = np.full((n_steps, batch_size), -1, dtype=np.int64)
    session = np.full((n_steps, batch_size), -1, dtype=np.int64)
    st = np.zeros((n_steps, batch_size), dtype=bool)
    en = np.zeros((n_steps, batch_size), dtype=bool)
    # event e of session j sits at step start[j] + (e - first[j]); the last event of a session
    # of 2+ events is not a step of its own (it is the last target, then the tail input)
    sid = np.repeat(np.arange(len(first)), lengths)
    k = np.arange(n) - first[sid]
    step_ev = k < n_steps_each[sid]
    t_idx, s_idx = start[sid][step_ev] + k[step_ev], slot[sid][step_ev]
    inputs[t_idx, s_idx] = rows[step_ev]
    nxt = np.full(n, -1, dtype=np.int64)
    nxt[:-1] = np.where(new_sess[1:], -1, rows[1:])
    nxt[rows < 0] = -1  # an unknown input keeps the state: its prediction is not trained
    targets[t_idx, s_idx] = nxt[step_ev]
    session[t_idx, s_idx] = sid[step_ev]
    st[start, slot] = True
    en[start + n_steps_each - 1, slot] = True
    tail = np.where(lengths >= 2, rows[first + lengths - 1], -1)
    prev = pd.Series(np.arange(len(first))).groupby(user_codes).shift(1).fillna(-1)
    return SessionParallelBatches(
        inputs=inputs,
        targets=targets,
        session=session,
        start=st,
        end=en,
        user=user_codes.astype(np.int64),
        tail=tail,
        prev=prev.to_numpy(dtype=np.int64),
        n_users=int(user_codes.max()) + 1,
        n_events=n,
    )
