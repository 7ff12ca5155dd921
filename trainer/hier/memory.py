"""The session-memory head of HRNN and p-RNN in training (``session_memory`` > 0).

As GRU4Rec's (``trainer.train.MemoryHeadSchedule``): a seeded share of the training sessions
(``memory_holdout``) is left out of every epoch of the schedule's plan but the last; then the
head is fitted on them (``trainer.memory_head.fit_head``) and the last epoch trains on every
session. With one epoch in the plan the head is fitted after it, then the held-out sessions are
trained on once.

The held-out predictions are the ones the live service and the per-user evaluation make: a
held-out session starts from the user state made from *all* of its user's earlier sessions
(held out or not, in time order, as ``end_session`` folds them in), not from an empty one, so
the offsets are fitted where HRNN's user path already says what it can about the user. The
users' histories run in user-parallel batches (``trainer.hier.batches``); only the held-out
sessions' next items are predictions. p-RNN, without a user state, starts every session from
its initial state, as GRU4Rec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from streamrec.model.api import TrainableModule
from trainer.hier.batches import advance_at_boundaries, user_parallel_batches
from trainer.memory_head import (
    MAX_EVENTS,
    TOP,
    HeadCollector,
    HeadData,
    HeadFit,
    fit_head,
)

#: users stepped together while collecting the held-out predictions (inference only)
COLLECT_BATCH = 256


def held_out_sessions(df: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """One flag per row of ``df``: its session is held out (each session with probability
    ``fraction``, seeded, in the order sessions first appear)."""
    codes, uniques = pd.factorize(df["SessionId"].astype(str))
    held = np.random.default_rng(seed).random(len(uniques)) < fraction
    return held[codes]


@torch.no_grad()
def collect_held_out(
    model: TrainableModule,
    df: pd.DataFrame,
    held: np.ndarray,
    item_index: Mapping[str, int],
    top: int = TOP,
    max_events: int = MAX_EVENTS,
) -> HeadData:
    """The held-out predictions of ``model`` (in eval mode, as it is): every next item of a
    held-out session (``held``: one flag per row of ``df``), each user's sessions stepped in
    time order from the empty user state. At most about ``max_events`` predictions."""
    users = df.loc[held, "UserId"].unique()
    keep = df["UserId"].isin(users).to_numpy()
    dev = next(iter(model.parameters())).device
    b = user_parallel_batches(df[keep], item_index, COLLECT_BATCH, mark=held[keep])
    scored = (b.targets >= 0) & b.flag
    any_scored = scored.any(axis=1)
    inputs = torch.from_numpy(b.inputs).to(dev)
    targets = torch.from_numpy(b.targets).to(dev)
    sstart = torch.from_numpy(b.session_start).to(dev)
    ustart = torch.from_numpy(b.user_start).to(dev)
    bs = b.inputs.shape[1]
    user = model.initial_user_state(bs)
    state = model.initial_state(user, bs)
    acc = HeadCollector(top)
    for t in range(b.n_steps):
        if acc.n >= max_events:
            break
        if b.any_start[t]:
            rows = torch.from_numpy(np.flatnonzero(b.session_start[t])).to(dev)
            state, user = advance_at_boundaries(model, state, user, sstart[t], ustart[t], rows)
        state, _ = model.forward_step(inputs[t], state, user)
        if any_scored[t]:
            idx = torch.from_numpy(np.flatnonzero(scored[t])).to(dev)
            us = None if user is None else user.index_select(0, idx)
            out, mem, raw = model.memory_head_inputs(state.index_select(0, idx), us)
            acc.add(out, mem, raw, targets[t].index_select(0, idx))
    return acc.data()


@dataclass
class HierMemoryHead:
    """When the head is fitted in ``train_hier`` (see the module docstring): ``frame(epoch)``
    is the click log epoch ``epoch`` of the plan trains on, ``before_epoch`` fits the head
    before the last one."""

    full: pd.DataFrame
    kept: pd.DataFrame | None = None  # None: no head to fit, every epoch on every session
    held: np.ndarray | None = None
    n_epochs: int = 0
    fit: HeadFit | None = None

    @classmethod
    def build(
        cls, model: TrainableModule, df: pd.DataFrame, fraction: float, seed: int, n_epochs: int
    ) -> HierMemoryHead:
        if model.session_memory() is None or fraction <= 0:
            return cls(df)
        held = held_out_sessions(df, fraction, seed)
        sizes = df.loc[held, "SessionId"].value_counts()
        if held.all() or not (sizes >= 2).any():
            # too little data to hold any out: the offsets stay 0 (the papers' scores)
            return cls(df)
        return cls(df, df[~held], held, n_epochs)

    def frame(self, epoch: int) -> pd.DataFrame:
        """The click log of epoch ``epoch``: the kept sessions but in the last epoch."""
        if self.kept is None or (epoch == self.n_epochs - 1 and self.n_epochs > 1):
            return self.full
        return self.kept

    def due(self, epoch: int) -> bool:
        """The head is fitted before epoch ``epoch`` (the last of two or more)."""
        return self.kept is not None and self.n_epochs > 1 and epoch == self.n_epochs - 1

    def fit_now(self, model: TrainableModule, item_index: Mapping[str, int]) -> None:
        """Fit the head on the held-out sessions, the whole model on and in eval mode."""
        assert self.held is not None
        was = model.training
        model.set_active(None)
        model.eval()
        try:
            self.fit = fit_head(model, collect_held_out(model, self.full, self.held, item_index))
        finally:
            model.train(was)

    def after_training(
        self, model: TrainableModule, item_index: Mapping[str, int]
    ) -> pd.DataFrame | None:
        """With one epoch in the plan, the head is fitted after it, and the held-out sessions
        are returned: the loop trains on them once (a one-epoch warm-start retrain still
        learns every session; a user's held-out sessions then run as their own history).
        Otherwise None."""
        if self.kept is None or self.fit is not None:
            return None
        self.fit_now(model, item_index)
        assert self.held is not None
        return self.full[self.held]
