"""Training and per-user evaluation of the user-aware models: HRNN and p-RNN.

Two batchings (``HierParams.batching``):

``session`` (HRNN's default): GRU4Rec's session-parallel mini-batches in time order (sessions
by first event), so training sees the log as GRU4Rec does and its last updates are about the
latest sessions (the test sessions are each user's latest). A session starts from its user's
state made from the user's previous session (``_UserChain``: the user state that session started
from and its final state, stored when it ends; the user GRU is applied, with gradient, at the
first step of the next session, so it learns from that session's first prediction, as in the
authors' code). By default (``wait_for_user=False``) the schedule is exactly GRU4Rec's: a
session whose predecessor still runs in another slot starts from the pair stored in the
previous epoch (complete in content, one epoch old in weights). ``wait_for_user=True`` instead
schedules a user's next session only after the previous one has ended, which pushes heavy
users' sessions towards the end of the epoch (measured in bench/results/hrnn-time-ordered.md).
Every event is an input (the last one of a session with no target), so the state handed to
``end_session`` is the state after the whole session, as in the live service.
User-parallel batches spend the end of every epoch on the few users with the longest histories
(on a 228-user MovieLens-1M sample the last 20 % of the steps had at most 7 live slots).

HRNN's default schedule is ``residual`` (staged): its session network (GRU4Rec's) trains alone
for ``n_epochs`` with the user path off, exactly as ``train_gru4rec``; then the user path (user
GRU, ``W_init``, the item memory's offset, in ``all`` the user columns of the first layer) trains
for ``n_epochs`` on top of it, frozen. The user path can then only add to GRU4Rec what it learns
(bench/results/hrnn-staged-memory.md); ``joint`` trains everything at once, as the paper.

``user`` (p-RNN's default) -- user-parallel mini-batches: each of the B slots follows one user
through all of their sessions in time order. At the first event of a session the slot's user state
is advanced with the previous session's final state (``end_session``) and the session state
re-initialised from it (``initial_state``); at the first event of a new user both are reset (empty
user state, then the initialisation from it). Every event of a session is an input (the last one
with no target), so the state handed to ``end_session`` is the state after the whole session, as
in the live service. Truncated BPTT of one step, as GRU4Rec: states are detached after every step;
the user GRU and ``W_init`` get their gradient from the first prediction of the new session (and,
in the ``all`` variant / with ``user_to_output``, from every prediction that reads the user
state).

p-RNN trains on the same batches (its user state is empty; its session state resets at every
session start) with one of four schedules over its subnets:
``joint`` (all subnets at once), ``residual`` (the id subnet alone for ``n_epochs``, then the
feature subnets for ``n_epochs`` on top of the frozen id subnet), ``alternating`` (one subnet
per epoch, the others frozen; ``n_epochs`` per subnet) and ``interleaving`` (one subnet per
mini-batch, cycling; ``n_epochs`` per subnet).

Reused from the GRU4Rec trainer: losses (``trainer.losses``), popularity^alpha negative samples
(``trainer.sampling``), Adagrad(+momentum) (``trainer.optim``), ranks and metrics
(``trainer.metrics``), checkpoints (``streamrec.model.checkpoint``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from streamrec.model.device import resolve_device
from streamrec.model.items import build_item_index
from trainer.evaluate import model_device
from trainer.jobs import TrainOutcome
from trainer.losses import get_loss, logq_correction
from trainer.metrics import MetricAccumulator, ranks
from trainer.optim import IndexedAdagradM
from trainer.presets import PRESETS as GRU4REC_PRESETS
from trainer.presets import BaseParams
from trainer.sampling import SampleBuffer

SCHEDULES = ("joint", "residual", "alternating", "interleaving")
_EVAL = "_eval"  # internal column: True for the events of a test session

# HRNN, p-RNN, GRU4Rec or any nn.Module with the step API (docs/architecture.md); optional
# methods (forward_step, train_step, sparse_tables, param_groups, set_active) are looked up
# with hasattr, so the models are duck-typed here.
StepModel = Any


# ----------------------------------------------------------------------------- batching


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


def _ordered_events(df: pd.DataFrame) -> pd.DataFrame:
    """Events sorted user by user (users by first event time, then id), sessions by their
    first event time then SessionId (test sessions of ``_eval`` last), events by Time (stable)."""
    d = df[["UserId", "SessionId", "ItemId", "Time"]].copy()
    d["_flag"] = df[_EVAL].to_numpy(dtype=bool) if _EVAL in df.columns else False
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
) -> UserParallelBatches:
    """User-parallel mini-batch index arrays (see :class:`UserParallelBatches`).

    A slot that finishes its user takes the next user in order (by first event time, or
    shuffled with ``seed``); when no user is left the slot idles until the longest one ends.
    """
    if "UserId" not in df.columns:
        raise ValueError("user-parallel batches need a UserId column")
    if len(df) == 0:
        raise ValueError("no events")
    d = _ordered_events(df)
    user = d["UserId"].astype(str).to_numpy()
    sess = d["SessionId"].astype(str).to_numpy()
    rows = np.fromiter((item_index.get(str(i), -1) for i in d["ItemId"]), np.int64, len(d))
    flag = d["_flag"].to_numpy(dtype=bool)
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
    heap = [(0, s) for s in range(b)]
    offset = np.zeros(len(ustarts), dtype=np.int64)
    slot = np.zeros(len(ustarts), dtype=np.int64)
    for u in order:  # the slot that frees up first takes the next user
        t0, s = heapq.heappop(heap)
        offset[u], slot[u] = t0, s
        heapq.heappush(heap, (t0 + int(lengths[u]), s))
    n_steps = max(t for t, _ in heap)
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
        advanced = model.end_session(us, state.index_select(0, rows))
        new_user = user_start.index_select(0, rows).unsqueeze(1)
        us = torch.where(new_user, model.initial_user_state(n), advanced)
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


def _schedule_sessions(
    n_steps_each: np.ndarray,
    user: np.ndarray,
    batch_size: int,
    lookahead: int,
    wait_for_user: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Start step and slot of every session (given in time order), GRU4Rec-style list
    scheduling (the slot that frees up first takes the next session) with one constraint
    (``wait_for_user``): a session starts only after its user's previous session has ended. A
    free slot takes the first of the next ``lookahead`` unscheduled sessions whose user is free
    (and whose earlier sessions are all scheduled); if none is, it idles until the earliest such
    user is free. Without the constraint this is exactly GRU4Rec's schedule."""
    n = len(n_steps_each)
    start = np.full(n, -1, dtype=np.int64)
    slot = np.full(n, -1, dtype=np.int64)
    free_at: dict[int, int] = {}  # user -> first step after their last scheduled session
    heap = [(0, s) for s in range(batch_size)]
    pending: list[int] = []  # unscheduled sessions, in time order
    nxt = 0
    while nxt < n or pending:
        t, s = heapq.heappop(heap)
        while nxt < n and len(pending) < lookahead:
            pending.append(nxt)
            nxt += 1
        seen: set[int] = set()
        pick, wait = -1, None
        for k, j in enumerate(pending):
            u = int(user[j])
            if not wait_for_user:
                pick = k
                break
            if u in seen:  # an earlier session of this user is still unscheduled
                continue
            seen.add(u)
            ready = free_at.get(u, 0)
            if ready <= t:
                pick = k
                break
            wait = ready if wait is None else min(wait, ready)
        if pick < 0:  # nobody free among the candidates: the slot idles
            heapq.heappush(heap, (int(wait if wait is not None else t + 1), s))
            continue
        j = pending.pop(pick)
        start[j], slot[j] = t, s
        free_at[int(user[j])] = t + int(n_steps_each[j])
        heapq.heappush(heap, (t + int(n_steps_each[j]), s))
    return start, slot


def session_parallel_batches(
    df: pd.DataFrame,
    item_index: Mapping[str, int],
    batch_size: int,
    lookahead: int = 0,
    wait_for_user: bool = True,
) -> SessionParallelBatches:
    """Time-ordered session-parallel batches for user-aware models (see the module docstring).

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
    d = df[["UserId", "SessionId", "ItemId", "Time"]].copy()
    d["_pos"] = np.arange(len(d))
    d["_sstart"] = d.groupby("SessionId", sort=False)["Time"].transform("min")
    d = d.sort_values(["_sstart", "SessionId", "Time", "_pos"], kind="stable")
    rows = np.fromiter((item_index.get(str(i), -1) for i in d["ItemId"]), np.int64, len(d))
    sess = d["SessionId"].astype(str).to_numpy()
    n = len(d)
    new_sess = np.ones(n, dtype=bool)
    new_sess[1:] = sess[1:] != sess[:-1]
    first = np.flatnonzero(new_sess)
    lengths = np.diff(np.r_[first, n])
    user_codes, _ = pd.factorize(d["UserId"].astype(str).to_numpy()[first])
    n_steps_each = np.maximum(lengths - 1, 1)
    start, slot = _schedule_sessions(
        n_steps_each, user_codes, batch_size, lookahead or 4 * batch_size, wait_for_user
    )
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


# ----------------------------------------------------------------------------- training


@dataclass
class HierParams(BaseParams):
    """Training parameters of the user-parallel loop (HRNN, p-RNN): the shared
    :class:`~trainer.presets.BaseParams` (same names and defaults as GRU4Rec's) plus the loop's
    own options. The models' options are in the subclasses :class:`HRNNParams` and
    :class:`PRNNParams`."""

    schedule: str = "joint"
    shuffle_users: bool = False
    # "user": user-parallel mini-batches; "session": time-ordered session-parallel ones with a
    # per-user state table (see the module docstring)
    batching: str = "user"
    # session batching only: a user's next session waits until their previous one has ended
    # (False: GRU4Rec's schedule exactly, sessions of one user may overlap in training)
    wait_for_user: bool = True

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **BaseParams.CHOICES,
        "schedule": SCHEDULES,
        "batching": ("session", "user"),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = GRU4REC_PRESETS
    MIN_EPOCHS: ClassVar[int] = 0

    def __post_init__(self) -> None:
        self.validate()


@dataclass
class HRNNParams(HierParams):
    """HRNN: training parameters plus the model's options (``--param key=value``).

    Defaults: GRU4Rec's for everything the two share (so that ``--model hrnn`` and ``--model
    gru4rec`` at their defaults differ only by the user path), a user GRU as wide as the session
    GRU, and dropout 0.5 on the user state and on the session initialisation made from it: the
    user path otherwise memorises each user's training items over the epochs (lower training
    loss, worse held-out last sessions). ``user_to_output`` (on in the authors' training
    script) is off: it memorised even more. Chosen on sessionised MovieLens-1M and a synthetic
    log with planted user tastes; see bench/results/hrnn-losses-defaults.md. Batches are GRU4Rec's
    time-ordered session-parallel ones with GRU4Rec's own schedule (``batching="session"``,
    ``wait_for_user=False``), and the schedule is staged (``schedule="residual"``): the session
    network trains first exactly as GRU4Rec, then the user path on top of it. The user path
    includes an item memory of the user's last 200 distinct items of earlier sessions
    (``memory``; 800 bytes in each user and session state) with a learnt score offset, which
    a 100-number user state cannot replace (bench/results/hrnn-staged-memory.md). The preset
    ``hrnn_paper_small`` is the paper's model and training: no memory, joint schedule,
    user-parallel batches.
    """

    batching: str = "session"
    wait_for_user: bool = False
    schedule: str = "residual"
    layers: list[int] = field(default_factory=lambda: [100])
    user_layers: list[int] = field(default_factory=lambda: [100])
    embedding: int = 0
    constrained_embedding: bool = True
    user_to_output: bool = False
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.0
    dropout_p_user: float = 0.5
    dropout_p_init: float = 0.5
    # the user's last `memory` distinct items of earlier sessions and a learnt score offset
    # for them (streamrec.model.hrnn); 0: the paper's HRNN
    memory: int = 200

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        **GRU4REC_PRESETS,
        # Quadrana et al. 2017, small networks: 100 units per layer, TOP1, Adagrad lr 0.1,
        # batch 50, session dropout 0.1, 10 epochs, no extra samples; the authors' code
        # (mquad/hgru4rec) applies tanh to the scores for TOP1 when no final activation is given
        "hrnn_paper_small": dict(
            loss="top1", final_act="tanh", layers=[100], user_layers=[100], embedding=0,
            constrained_embedding=False, batch_size=50, learning_rate=0.1, momentum=0.0,
            n_epochs=10, n_sample=0, dropout_p_hidden=0.1, dropout_p_user=0.0,
            dropout_p_init=0.0, dropout_p_embed=0.0, user_to_output=False,
            memory=0, schedule="joint", batching="user",
        ),
    }  # fmt: skip

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`streamrec.model.hrnn.HRNN` (besides n_items, variant)."""
        return {
            "layers": self.layers,
            "user_layers": self.user_layers,
            "embedding": self.embedding,
            "constrained_embedding": self.constrained_embedding,
            "user_to_output": self.user_to_output,
            "final_act": self.resolved_final_act(),
            "elu_param": self.resolved_elu_param(),
            "dropout_p_embed": self.dropout_p_embed,
            "dropout_p_hidden": self.dropout_p_hidden,
            "dropout_p_user": self.dropout_p_user,
            "dropout_p_init": self.dropout_p_init,
            "memory": self.memory,
        }


@dataclass
class PRNNParams(HierParams):
    """p-RNN: training parameters plus the model and item-feature options."""

    arch: str = "parallel"
    id_hidden: int = 100
    feature_hidden: list[int] = field(default_factory=lambda: [100])
    embedding: int = 0
    subnet_weights: list[float] = field(default_factory=list)
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.0
    category_columns: list[str] = field(default_factory=lambda: ["Genres"])
    text_columns: list[str] = field(default_factory=lambda: ["Title"])
    tfidf_dim: int = 256
    missing_flag: bool = True

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **HierParams.CHOICES,
        "arch": ("parallel", "id", "feature", "concat"),
    }


def schedule_plan(model: StepModel, schedule: str, n_epochs: int) -> list[dict[str, Any]]:
    """Per-epoch plan: ``{"train": [group names] | None (all), "active": [...] | None,
    "interleave": bool}``. Models without subnets (HRNN, GRU4Rec) always train everything."""
    groups = list(model.param_groups()) if hasattr(model, "param_groups") else []
    if schedule == "joint" or len(groups) <= 1:
        return [{"train": None, "active": None, "interleave": False} for _ in range(n_epochs)]
    if schedule == "residual":
        first, rest = groups[:1], groups[1:]
        return [{"train": first, "active": first, "interleave": False}] * n_epochs + [
            {"train": rest, "active": None, "interleave": False}
        ] * n_epochs
    if schedule == "alternating":
        return [
            {"train": [groups[e % len(groups)]], "active": None, "interleave": False}
            for e in range(n_epochs * len(groups))
        ]
    if schedule == "interleaving":
        return [{"train": groups, "active": None, "interleave": True}] * (n_epochs * len(groups))
    raise ValueError(f"unknown schedule {schedule!r}")


def _set_trainable(model: StepModel, names: Sequence[str] | None) -> list[tuple[Tensor, Tensor]]:
    """Train only the parameter groups ``names`` (None: all); returns the gradient masks of
    parameters the model trains in part for them (``grad_masks``: HRNN-all's first layer)."""
    if not hasattr(model, "param_groups"):
        return []
    groups = model.param_groups()
    on = set(groups) if names is None else set(names)
    for k, ps in groups.items():
        for p in ps:
            p.requires_grad_(k in on)
    masks: list[tuple[Tensor, Tensor]] = []
    if names is not None and hasattr(model, "grad_masks"):
        masks = model.grad_masks(list(names))
        for p, _ in masks:
            p.requires_grad_(True)
    return masks


def _stage(
    model: StepModel, names: Sequence[str] | None, opt: IndexedAdagradM
) -> list[tuple[Tensor, Tensor]]:
    """Train only the groups ``names`` from now on; returns the gradient masks. The frozen
    entries of a partly trained parameter also lose their momentum, or it would move them."""
    masks = _set_trainable(model, names)
    for q, mask in masks:
        if q in opt.mom:
            opt.mom[q].mul_(mask)
    return masks


def train_hier(
    model: StepModel,
    train_df: pd.DataFrame,
    item_index: Mapping[str, int],
    params: HierParams | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    init_optimizer: dict[str, torch.Tensor] | None = None,
    keep_optimizer: bool = False,
) -> dict[str, Any]:
    """Train ``model`` (HRNN, p-RNN, or any model with ``forward_step``/``score_items``) in place
    on user-parallel mini-batches. Returns training statistics.

    ``on_epoch_end(epoch, model)`` is called after every epoch of the schedule's plan.
    ``init_optimizer`` continues the Adagrad state of an earlier run (a warm start's; as
    ``train_gru4rec``), ``keep_optimizer`` returns this run's as ``stats["optimizer_state"]``.
    """
    p = params or HierParams()
    dev = resolve_device(p.device)
    torch.manual_seed(p.seed)
    model.to(dev)
    model.train()
    loss_fn = get_loss(p.loss, p.bpreg)
    # item matrices row-sparse where the model can (HRNN): only touched rows are updated
    sparse = list(model.sparse_tables()) if hasattr(model, "train_step") else []
    sparse_ids = {id(t) for t in sparse}
    dense = [q for q in model.parameters() if id(q) not in sparse_ids]
    opt = IndexedAdagradM(dense, sparse, lr=p.learning_rate, momentum=p.momentum)
    named = dict(model.named_parameters())
    if init_optimizer is not None:
        opt.import_state(named, init_optimizer)
    n_items = int(model.n_items)
    rows_all = train_df["ItemId"].astype(str).map(item_index).dropna().astype(np.int64)
    counts = torch.bincount(torch.from_numpy(rows_all.to_numpy().copy()), minlength=n_items).float()
    batches: UserParallelBatches | SessionParallelBatches
    if p.shuffle_users and p.batching != "user":
        raise ValueError("shuffle_users needs batching=user (session batches follow time order)")
    if p.batching == "session":
        batches = session_parallel_batches(
            train_df, item_index, p.batch_size, wait_for_user=p.wait_for_user
        )
    else:
        batches = user_parallel_batches(train_df, item_index, p.batch_size, False, p.seed)
    # one epoch's worth of samples per refill (at most the official 10M)
    cache = min(10_000_000, max(1, p.n_sample) * (batches.n_steps + 1))
    sampler = (
        SampleBuffer(counts, p.n_sample, p.sample_alpha, dev, seed=p.seed, max_size=cache)
        if p.n_sample > 0
        else None
    )
    counts_dev = counts.clamp(min=1.0).to(dev)
    plan = schedule_plan(model, p.schedule, p.n_epochs)
    groups = list(model.param_groups()) if hasattr(model, "param_groups") else []
    t_start = time.perf_counter()
    n_trained = 0
    epoch_losses: list[float] = []
    trainer = _Trainer(opt, loss_fn, sampler, counts_dev, p, None, [0])
    chain = None
    if isinstance(batches, SessionParallelBatches) and int(model.user_state_dim) > 0:
        chain = _UserChain.make(model, batches, dev)
    for epoch, step_plan in enumerate(plan):
        if p.shuffle_users and epoch > 0 and p.batching == "user":
            batches = user_parallel_batches(
                train_df, item_index, p.batch_size, True, p.seed + epoch
            )
        if hasattr(model, "set_active"):
            model.set_active(step_plan["active"])
        trainer.interleave = groups if step_plan["interleave"] else None
        if not step_plan["interleave"]:
            trainer.grad_masks = _stage(model, step_plan["train"], opt)
        if isinstance(batches, UserParallelBatches):
            loss_sum, n_ev = _run_epoch(model, batches, trainer, dev)
        else:
            loss_sum, n_ev = _run_epoch_sessions(model, batches, trainer, dev, chain)
        n_trained += n_ev
        epoch_losses.append(loss_sum / max(n_ev, 1))
        if log:
            log(f"epoch {epoch + 1}/{len(plan)} loss {epoch_losses[-1]:.4f} events {n_ev}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    _set_trainable(model, None)
    if hasattr(model, "set_active"):
        model.set_active(None)
    secs = time.perf_counter() - t_start
    model.eval()
    stats: dict[str, Any] = {
        "train_seconds": secs,
        "train_events": n_trained,
        "train_events_per_s": n_trained / secs if secs > 0 else 0.0,
        "epochs": len(plan),
        "epoch_losses": epoch_losses,
        "params": asdict(p),
        "n_steps_per_epoch": batches.n_steps,
    }
    if keep_optimizer:
        stats["optimizer_state"] = opt.export_state(named)
    return stats


@dataclass
class _Trainer:
    """What one training step needs besides the model and the batch (shared by both loops)."""

    opt: IndexedAdagradM
    loss_fn: Callable[..., Tensor]
    sampler: SampleBuffer | None
    counts: Tensor
    p: HierParams
    interleave: list[str] | None
    counter: list[int]  # carried across epochs: the interleaving cycle never restarts
    grad_masks: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def step(
        self,
        model: StepModel,
        inputs: Tensor,
        targets: Tensor,
        state: Tensor,
        user: Tensor | None,
        train: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Advance the slots by one event, with an optimiser step on their next-item
        predictions when ``train`` (some slot has a target); returns the detached (state,
        user state) and the step's loss sum (0 without training)."""
        if not train:  # no prediction to train at this step: only advance the states
            with torch.no_grad():
                state, _ = model.forward_step(inputs, state, user)
            return state, user, torch.zeros((), device=state.device)
        if self.interleave is not None:
            self.grad_masks = _stage(
                model, [self.interleave[self.counter[0] % len(self.interleave)]], self.opt
            )
            self.counter[0] += 1
        p = self.p
        bs = int(inputs.shape[0])
        valid = targets >= 0
        out_rows = targets.clamp(min=0)
        if self.sampler is not None:
            out_rows = torch.cat([out_rows, self.sampler.get()])
        leaves: list[Any] = []
        if hasattr(model, "train_step"):
            state, scores, leaves = model.train_step(inputs, state, user, out_rows)
        else:
            state, out = model.forward_step(inputs, state, user)
            scores = model.score_items(out, user, out_rows)
        if p.loss in ("cross-entropy", "xe") and p.logq > 0:
            corr = logq_correction(self.counts, out_rows, bs, p.sample_alpha, p.logq)
            loss = self.loss_fn(scores, valid, corr)
        else:
            loss = self.loss_fn(scores, valid)
        loss = loss / bs
        for q in model.parameters():
            q.grad = None
        loss.backward()
        for q, mask in self.grad_masks:
            if q.grad is not None:
                q.grad.mul_(mask)
        # an item table frozen by the schedule (requires_grad off) is not updated
        self.opt.step([(tab, rows, leaf.grad) for tab, rows, leaf in leaves if tab.requires_grad])
        return state.detach(), None if user is None else user.detach(), loss.detach() * bs


def _run_epoch(
    model: StepModel, b: UserParallelBatches, tr: _Trainer, dev: torch.device
) -> tuple[float, int]:
    """One epoch of user-parallel training (see the module docstring)."""
    bs = b.inputs.shape[1]
    inputs = torch.from_numpy(b.inputs).to(dev)
    targets = torch.from_numpy(b.targets).to(dev)
    sstart = torch.from_numpy(b.session_start).to(dev)
    ustart = torch.from_numpy(b.user_start).to(dev)
    has_target = np.asarray((b.targets >= 0).any(axis=1))
    any_start = b.any_start
    user = model.initial_user_state(bs)
    state = model.initial_state(user, bs)
    total = torch.zeros((), device=dev)
    for t in range(b.n_steps):
        if any_start[t]:
            rows = torch.from_numpy(np.flatnonzero(b.session_start[t])).to(dev)
            state, user = advance_at_boundaries(model, state, user, sstart[t], ustart[t], rows)
        state, user, loss = tr.step(model, inputs[t], targets[t], state, user, has_target[t])
        total += loss
    return float(total), int((b.targets >= 0).sum())


@dataclass
class _UserChain:
    """How each session's user state is made in session-parallel training: from the pair of
    the user's previous session, ``end_session(user_in, final)`` (the user state that session
    started from and its final state), stored when that session ends and applied, with
    gradient, when the next one starts (the user GRU learns from the next session's first
    prediction, as in the authors' code).

    A session that starts after its predecessor has ended (every one with ``wait_for_user``)
    finds the pair in a per-user table: sessions start in time order, so a user has at most one
    such pair waiting. A session that starts while its predecessor still runs in another slot
    (only without ``wait_for_user``; fixed by the schedule, so the same ones every epoch) uses
    the pair stored for it in the previous epoch, complete in content and one epoch old in
    weights; in the first epoch, the state its user's latest session started from."""

    user_pair_in: Tensor  # [n_users, user_dim]: the pair waiting for the user's next session
    user_pair_final: Tensor  # [n_users, state_dim]
    last_start: Tensor  # [n_users, user_dim]: the user state of the user's latest session start
    ov_in: Tensor  # [n_overlapping, user_dim]: the pairs of the overlapping sessions
    ov_final: Tensor  # [n_overlapping, state_dim]
    ov_ready: np.ndarray  # [n_overlapping] (host): stored (from the second epoch on)
    ov_id: np.ndarray  # [n_sessions]: index into ov_* of an overlapping session, else -1
    next_ov: np.ndarray  # [n_sessions]: ov_id of the user's next session (-1: none or waits)
    next_waits: np.ndarray  # [n_sessions]: the user's next session starts after this one ends
    user: np.ndarray  # [n_sessions]: the session's user (SessionParallelBatches.user)
    has_prev: np.ndarray  # [n_sessions]: the user had an earlier session

    @classmethod
    def make(cls, model: StepModel, b: SessionParallelBatches, dev: torch.device) -> _UserChain:
        n = len(b.prev)
        nxt = np.full(n, -1, dtype=np.int64)
        has = b.prev >= 0
        nxt[b.prev[has]] = np.flatnonzero(has)
        start, end = np.zeros(n, np.int64), np.zeros(n, np.int64)
        t, s = np.nonzero(b.start)
        start[b.session[t, s]] = t
        t, s = np.nonzero(b.end)
        end[b.session[t, s]] = t
        overlap = has & (start <= end[np.where(has, b.prev, 0)])
        ov_id = np.where(overlap, np.cumsum(overlap) - 1, -1)
        n_ov = int(overlap.sum())
        nxt_ov = np.where(nxt >= 0, ov_id[np.maximum(nxt, 0)], -1)
        return cls(
            user_pair_in=model.initial_user_state(b.n_users),
            user_pair_final=torch.zeros(b.n_users, int(model.state_dim), device=dev),
            last_start=model.initial_user_state(b.n_users),
            ov_in=model.initial_user_state(n_ov),
            ov_final=torch.zeros(n_ov, int(model.state_dim), device=dev),
            ov_ready=np.zeros(n_ov, dtype=bool),
            ov_id=ov_id,
            next_ov=nxt_ov,
            next_waits=(nxt >= 0) & (nxt_ov < 0),
            user=b.user,
            has_prev=has,
        )

    def store(self, sess: np.ndarray, user_in: Tensor, final: Tensor) -> None:
        """Sessions ``sess`` ended with these starting user states and final states."""
        dev = final.device
        k_all = self.next_ov[sess]
        ov = np.flatnonzero(k_all >= 0)
        if ov.size:
            k = k_all[ov]
            sel = torch.from_numpy(ov).to(dev)
            self.ov_in.index_copy_(0, torch.from_numpy(k).to(dev), user_in.index_select(0, sel))
            self.ov_final.index_copy_(0, torch.from_numpy(k).to(dev), final.index_select(0, sel))
            self.ov_ready[k] = True
        wait = np.flatnonzero(self.next_waits[sess])
        if wait.size:  # at most one per user (see the class docstring)
            u = torch.from_numpy(self.user[sess[wait]]).to(dev)
            sel = torch.from_numpy(wait).to(dev)
            self.user_pair_in.index_copy_(0, u, user_in.index_select(0, sel))
            self.user_pair_final.index_copy_(0, u, final.index_select(0, sel))

    def start(self, model: StepModel, sess: np.ndarray) -> Tensor:
        """The user states sessions ``sess`` start from (with gradient through the user GRU)."""
        dev = self.user_pair_final.device
        users, has_prev = self.user[sess], self.has_prev[sess]
        k = self.ov_id[sess]
        ov = np.flatnonzero(k >= 0)
        u = torch.from_numpy(users).to(dev)
        pair_in = self.user_pair_in.index_select(0, u)
        pair_final = self.user_pair_final.index_select(0, u)
        if ov.size:
            sel, kk = torch.from_numpy(ov).to(dev), torch.from_numpy(k[ov]).to(dev)
            pair_in = pair_in.index_copy(0, sel, self.ov_in.index_select(0, kk))
            pair_final = pair_final.index_copy(0, sel, self.ov_final.index_select(0, kk))
        # end_session for every starting slot (so that the dropout draws are those of the
        # user-parallel loop), kept where the session has a stored pair
        advanced = model.end_session(pair_in, pair_final)
        ov_ready = np.zeros(len(sess), dtype=bool)
        ov_ready[ov] = self.ov_ready[k[ov]]
        ready = has_prev & ((k < 0) | ov_ready)
        us = torch.where(
            torch.from_numpy(ready).to(dev).unsqueeze(1),
            advanced,
            model.initial_user_state(len(sess)),
        )
        stale = np.flatnonzero(has_prev & ~ready)
        if stale.size:  # first epoch, the predecessor still running
            sel = torch.from_numpy(stale).to(dev)
            last = self.last_start.index_select(0, torch.from_numpy(users[stale]).to(dev))
            us = us.index_copy(0, sel, last)
        # the latest session of each user (two may start at once without wait_for_user)
        order = np.argsort(sess, kind="stable")[::-1]
        uniq, first = np.unique(users[order], return_index=True)
        latest = torch.from_numpy(order[first].copy()).to(dev)
        self.last_start.index_copy_(
            0, torch.from_numpy(uniq).to(dev), us.detach().index_select(0, latest)
        )
        return us


def _run_epoch_sessions(
    model: StepModel,
    b: SessionParallelBatches,
    tr: _Trainer,
    dev: torch.device,
    chain: _UserChain | None,
) -> tuple[float, int]:
    """One epoch of time-ordered session-parallel training (see the module docstring and
    :class:`_UserChain`; ``chain`` is None for models without a user state)."""
    bs = b.inputs.shape[1]
    inputs = torch.from_numpy(b.inputs).to(dev)
    targets = torch.from_numpy(b.targets).to(dev)
    tails_dev = torch.from_numpy(b.tail).to(dev)
    has_target = np.asarray((b.targets >= 0).any(axis=1))
    any_start = np.asarray(b.start.any(axis=1))
    any_end = np.asarray(b.end.any(axis=1))
    user = model.initial_user_state(bs)
    state = model.initial_state(user, bs)
    total = torch.zeros((), device=dev)
    for t in range(b.n_steps):
        if t > 0 and any_end[t - 1] and chain is not None and user is not None:
            slots = np.flatnonzero(b.end[t - 1])
            sess = b.session[t - 1, slots]
            rows = torch.from_numpy(slots).to(dev)
            user_in = user.index_select(0, rows)  # what the session started from
            with torch.no_grad():  # the tail input (no target): the state after the session
                fin, _ = model.forward_step(
                    tails_dev.index_select(0, torch.from_numpy(sess).to(dev)),
                    state.index_select(0, rows),
                    user_in,
                )
            chain.store(sess, user_in, fin)
        if any_start[t]:
            slots = np.flatnonzero(b.start[t])
            rows = torch.from_numpy(slots).to(dev)
            us = None
            if chain is not None and user is not None:
                sess = b.session[t, slots]
                us = chain.start(model, sess)
                user = user.index_copy(0, rows, us)
            state = state.index_copy(0, rows, model.initial_state(us, len(slots)))
        state, user, loss = tr.step(model, inputs[t], targets[t], state, user, has_target[t])
        total += loss
    return float(total), int((b.targets >= 0).sum())


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate_users(
    model: StepModel,
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    item_index: Mapping[str, int],
    ks: Iterable[int] = (5, 20),
    ties: str = "conservative",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    first_n: int | None = None,
) -> dict[str, float]:
    """Per-user next-item evaluation of each user's test session(s).

    The user's training sessions warm the user state in time order (no learning; skipped for
    models without a user state), then every next item of the test session is ranked among all
    items (``trainer.metrics.ranks`` with ``ties``). Test items outside ``item_index`` are
    neither ranked nor fed (an unknown input keeps the state, as in the live service).
    ``first_n`` ranks only the first ``first_n`` predictions of each test session (where the
    user state matters most).
    """
    dev = torch.device(device) if device is not None else model_device(model)
    model.to(dev)
    was_training = model.training
    model.eval()
    test = test_df.copy()
    test[_EVAL] = True
    users = set(test["UserId"].astype(str))
    parts = [test]
    if int(getattr(model, "user_state_dim", 0)) > 0:
        hist = train_df[train_df["UserId"].astype(str).isin(users)].copy()
        hist[_EVAL] = False
        parts.insert(0, hist)
    data = pd.concat(parts, ignore_index=True)
    b = user_parallel_batches(data, item_index, batch_size)
    acc = MetricAccumulator(ks)
    bs = b.inputs.shape[1]
    inputs = torch.from_numpy(b.inputs).to(dev)
    targets = torch.from_numpy(b.targets).to(dev)
    sstart = torch.from_numpy(b.session_start).to(dev)
    ustart = torch.from_numpy(b.user_start).to(dev)
    scored = (b.targets >= 0) & b.flag
    if first_n is not None:
        scored &= b.position < first_n
    any_scored = np.asarray(scored.any(axis=1))
    scored_t = torch.from_numpy(scored).to(dev)
    user = model.initial_user_state(bs)
    state = model.initial_state(user, bs)
    for t in range(b.n_steps):
        if b.any_start[t]:
            rows = torch.from_numpy(np.flatnonzero(b.session_start[t])).to(dev)
            state, user = advance_at_boundaries(model, state, user, sstart[t], ustart[t], rows)
        if any_scored[t]:
            state, scores = model.step(inputs[t], state, user)
            sel = scored_t[t].nonzero().squeeze(1)
            acc.add_ranks(ranks(scores.index_select(0, sel), targets[t].index_select(0, sel), ties))
        elif hasattr(model, "forward_step"):
            state, _ = model.forward_step(inputs[t], state, user)
        else:
            state, _ = model.step(inputs[t], state, user)
    if was_training:
        model.train()
    res = acc.result()
    res["n_users"] = len(users)
    return res


class PopStepModel(nn.Module):
    """POP in the step API (every step scores items by their training count): the baseline
    that :func:`evaluate_users` compares the user-aware models with."""

    user_state_dim = 0
    counts: Tensor

    def __init__(self, counts: Tensor) -> None:
        super().__init__()
        self.register_buffer("counts", counts.float())
        self.n_items = len(counts)

    @classmethod
    def from_log(cls, train_df: pd.DataFrame, item_index: Mapping[str, int]) -> PopStepModel:
        rows = np.array(train_df["ItemId"].astype(str).map(item_index).dropna(), dtype=np.int64)
        return cls(torch.bincount(torch.from_numpy(rows), minlength=len(item_index)))

    def initial_user_state(self, batch_size: int) -> None:
        return None

    def initial_state(self, user_state: Tensor | None, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, 1, device=self.counts.device)

    def end_session(self, user_state: Tensor | None, final_state: Tensor) -> None:
        return None

    def step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        return state, self.counts.expand(len(item_rows), -1)


def split_stats(train_df: pd.DataFrame, test_df: pd.DataFrame) -> dict[str, float]:
    """Sizes of a last-session-out split (for reports and checkpoints)."""

    def one(d: pd.DataFrame) -> dict[str, float]:
        n_s = d["SessionId"].nunique()
        return {
            "events": len(d),
            "sessions": n_s,
            "users": d["UserId"].nunique(),
            "items": d["ItemId"].nunique(),
            "mean_session_length": len(d) / n_s if n_s else math.nan,
        }

    tr, te = one(train_df), one(test_df)
    out = {f"train_{k}": v for k, v in tr.items()} | {f"test_{k}": v for k, v in te.items()}
    out["train_sessions_per_user"] = tr["sessions"] / tr["users"] if tr["users"] else math.nan
    return out


# ----------------------------------------------------------------------------- CLI wiring


_P = TypeVar("_P", bound=HierParams)


def parse_hier_params(pairs: Iterable[str], cls: type[_P], preset: str | None = None) -> _P:
    """``key=value`` strings (and an optional preset) -> ``cls`` parameters.

    Unknown keys and invalid values raise :class:`~trainer.presets.ParamError` (a ValueError)
    naming them."""
    return cls.make(preset, list(pairs))


def _job_common(job: Any, cls: type[_P], allowed: set[str]) -> _P:
    import click

    bad = [k for k, v in job.options.items() if v not in (None, (), []) and k not in allowed]
    if bad:
        raise click.UsageError(f"this model does not take {', '.join(bad)}")
    try:
        p = parse_hier_params(job.params, cls, job.preset)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--param") from None
    if "UserId" not in job.train_df.columns:
        raise click.UsageError("HRNN/p-RNN training needs a UserId column in --train")
    return p


def train_hrnn_job(job: Any) -> Any:
    """``trainer train --model hrnn``: TrainJob -> TrainOutcome (see trainer.cli)."""
    from streamrec.model.hrnn import HRNN

    p = _job_common(job, HRNNParams, {"--variant"})
    variant = job.options.get("--variant") or "init"
    if variant not in ("init", "all"):
        import click

        raise click.BadParameter("--variant must be init or all", param_hint="--variant")
    item_ids, index = build_item_index(job.train_df["ItemId"])
    torch.manual_seed(p.seed)
    model = HRNN(len(item_ids), variant=variant, **p.model_options())
    log = (lambda s: print(s, flush=True)) if job.progress else None
    stats = train_hier(model, job.train_df, index, p, log=log)
    return TrainOutcome(model, "hrnn", item_ids, stats, {**asdict(p), "variant": variant})


def train_prnn_job(job: Any) -> Any:
    """``trainer train --model prnn``: features from ``--features`` and/or ``--item-meta``."""
    import click

    from streamrec.model.prnn import PRNN
    from trainer.features import build_item_features

    p = _job_common(job, PRNNParams, {"--features", "--item-meta", "--schedule"})
    mopts = asdict(p)
    p.schedule = job.options.get("--schedule") or "joint"
    if p.schedule not in SCHEDULES:
        raise click.BadParameter(f"one of {', '.join(SCHEDULES)}", param_hint="--schedule")
    item_ids, index = build_item_index(job.train_df["ItemId"])
    feats = []
    if mopts["arch"] != "id":
        try:
            feats = build_item_features(
                index,
                len(item_ids),
                features_path=job.options.get("--features"),
                item_meta_path=job.options.get("--item-meta"),
                category_columns=mopts["category_columns"],
                text_columns=mopts["text_columns"],
                tfidf_dim=mopts["tfidf_dim"],
                missing_flag=mopts["missing_flag"],
            )
        except (OSError, ValueError) as e:
            raise click.ClickException(f"item features: {e}") from None
    fh = mopts["feature_hidden"]
    fh = fh * len(feats) if len(fh) == 1 else fh
    torch.manual_seed(p.seed)
    model = PRNN(
        len(item_ids),
        [f.dim for f in feats],
        arch=mopts["arch"],
        id_hidden=mopts["id_hidden"],
        feature_hidden=fh,
        embedding=mopts["embedding"],
        subnet_weights=mopts["subnet_weights"] or None,
        feature_names=[f.name for f in feats],
        dropout_p_embed=mopts["dropout_p_embed"],
        dropout_p_hidden=mopts["dropout_p_hidden"],
        feature_values=[torch.from_numpy(f.values) for f in feats],
        final_act=p.resolved_final_act(),
        elu_param=p.resolved_elu_param(),
    )
    log = (lambda s: print(s, flush=True)) if job.progress else None
    stats = train_hier(model, job.train_df, index, p, log=log)
    stats["feature_coverage"] = {f.name: f.coverage for f in feats}
    return TrainOutcome(model, "prnn", item_ids, stats, asdict(p))


def evaluate_users_job(
    model: StepModel,
    test_df: pd.DataFrame,
    item_index: Mapping[str, int],
    ks: Sequence[int],
    ties: str,
    device: Any = None,
    train_df: pd.DataFrame | None = None,
) -> dict[str, float]:
    """The ``trainer`` evaluator for hrnn/prnn: per user, training sessions warm the state."""
    if "UserId" not in test_df.columns:
        raise ValueError("per-user evaluation needs a UserId column in --test")
    if train_df is None:
        train_df = test_df.iloc[:0]
    return evaluate_users(model, train_df, test_df, item_index, ks, ties, device=device)
