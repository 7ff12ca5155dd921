"""The training loop of the user-aware models (HRNN, p-RNN): ``train_hier``.

Every epoch of the schedule's plan (``trainer.hier.schedules``) runs one pass over the
batches (``trainer.hier.batches``): user-parallel (:func:`run_user_epoch`) or time-ordered
session-parallel with the user chain (:func:`run_session_epoch`, ``trainer.hier.chain``).
With a session memory (``session_memory`` > 0) a share of the sessions is held out of every
epoch but the last and the memory's offsets are fitted on them (``trainer.hier.memory``; with
one epoch, the held-out sessions are trained on once after the fit); the
loop's optimiser never trains them. Each step is :meth:`StepTrainer.step`: advance the slots
by one event, score the targets and sampled negatives, one optimiser step. Truncated BPTT of one
step, as GRU4Rec: states are detached after every step. Reused from the GRU4Rec trainer: losses
(``trainer.losses``), popularity^alpha negative samples (``trainer.sampling``), Adagrad
(+momentum) with row-sparse item tables (``trainer.optim``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from streamrec.model.api import TrainableModule
from streamrec.model.device import resolve_device
from trainer.hier.batches import (
    SessionParallelBatches,
    UserParallelBatches,
    advance_at_boundaries,
    session_parallel_batches,
    user_parallel_batches,
)
from trainer.hier.chain import UserChain
from trainer.hier.memory import HierMemoryHead
from trainer.hier.params import HierParams
from trainer.hier.schedules import Stage, schedule_plan, set_trainable, start_stage
from trainer.losses import get_loss, logq_correction
from trainer.optim import IndexedAdagradM
from trainer.sampling import SampleBuffer


def train_hier(
    model: TrainableModule,
    train_df: pd.DataFrame,
    item_index: Mapping[str, int],
    params: HierParams | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int, TrainableModule], None] | None = None,
    init_optimizer: dict[str, torch.Tensor] | None = None,
    keep_optimizer: bool = False,
) -> dict[str, Any]:
    """Train ``model`` (HRNN, p-RNN: a ``TrainableStepModel``) in place; returns training
    statistics.

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
    opt, named = _optimizer(model, p, init_optimizer)
    counts = _item_counts(train_df, item_index, int(model.n_items))
    plan = schedule_plan(model, p.schedule, p.n_epochs)
    head = HierMemoryHead.build(model, train_df, p.memory_holdout, p.seed, len(plan))
    batches = _batches(head.frame(0), item_index, p, epoch=0)
    trainer = StepTrainer(
        opt, loss_fn, _sampler(counts, p, dev, batches.n_steps), counts.clamp(min=1.0).to(dev), p
    )
    groups = list(model.param_groups())
    if log and len(plan) != p.n_epochs:  # n_epochs per stage or subnet: say why there are more
        log(f"schedule {p.schedule}: n_epochs={p.n_epochs} per stage or subnet, {len(plan)} in all")
    t_start = time.perf_counter()
    n_trained = 0
    epoch_losses: list[float] = []
    chain = None
    if isinstance(batches, SessionParallelBatches) and int(model.user_state_dim) > 0:
        chain = UserChain.make(model, batches, dev)

    def run_epoch(stage: Stage) -> tuple[float, int]:
        model.set_active(stage.active)
        trainer.interleave = groups if stage.interleave else None
        if not stage.interleave:
            trainer.grad_masks = start_stage(model, stage.train, opt)
        if isinstance(batches, UserParallelBatches):
            return run_user_epoch(model, batches, trainer, dev)
        return run_session_epoch(model, batches, trainer, dev, chain)

    for epoch, stage in enumerate(plan):
        if head.due(epoch):  # the head, then the last epoch on every session
            head.fit_now(model, item_index)
            batches = _batches(head.frame(epoch), item_index, p, epoch)
            chain = _rechain(chain, model, batches, dev)
        elif p.shuffle_users and epoch > 0:  # a new order of users every epoch
            batches = _batches(head.frame(epoch), item_index, p, epoch)
        loss_sum, n_ev = run_epoch(stage)
        n_trained += n_ev
        epoch_losses.append(loss_sum / max(n_ev, 1))
        if log:
            log(f"{stage.label} loss {epoch_losses[-1]:.4f} events {n_ev}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    held = head.after_training(model, item_index)
    if held is not None:  # a one-epoch plan: the held-out sessions, once, after the head's fit
        batches = _batches(held, item_index, p, len(plan))
        chain = _rechain(chain, model, batches, dev)
        loss_sum, n_ev = run_epoch(plan[-1])
        n_trained += n_ev
        if log:
            log(f"{plan[-1].label} (held-out sessions) loss {loss_sum / max(n_ev, 1):.4f} "
                f"events {n_ev}")  # fmt: skip
    set_trainable(model, None)
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
    if head.fit is not None:
        stats["memory_head"] = asdict(head.fit)
    if keep_optimizer:
        stats["optimizer_state"] = opt.export_state(named)
    return stats


def _rechain(
    chain: UserChain | None, model: TrainableModule, batches: object, dev: torch.device
) -> UserChain | None:
    """The user chain of new session-parallel ``batches`` (None: the loop runs without one)."""
    if chain is None or not isinstance(batches, SessionParallelBatches):
        return chain
    return UserChain.make(model, batches, dev)


def _optimizer(
    model: TrainableModule, p: HierParams, init_optimizer: dict[str, Tensor] | None
) -> tuple[IndexedAdagradM, dict[str, nn.Parameter]]:
    """Adagrad(+momentum), item tables row-sparse where the model has them (HRNN: only the
    touched rows are updated), continuing ``init_optimizer`` when given. The session memory's
    offsets are not in it: they are fitted apart (``trainer.hier.memory``)."""
    sparse = model.sparse_tables()
    apart = {id(t) for t in sparse} | {id(t) for t in model.session_memory_parameters()}
    dense = [q for q in model.parameters() if id(q) not in apart]
    opt = IndexedAdagradM(dense, sparse, lr=p.learning_rate, momentum=p.momentum)
    named = dict(model.named_parameters())
    if init_optimizer is not None:
        opt.import_state(named, init_optimizer)
    return opt, named


def _item_counts(train_df: pd.DataFrame, item_index: Mapping[str, int], n_items: int) -> Tensor:
    """Training events per item row (the negative samples' popularity and logQ)."""
    rows = train_df["ItemId"].astype(str).map(item_index).dropna().astype(np.int64)
    return torch.bincount(torch.from_numpy(rows.to_numpy().copy()), minlength=n_items).float()


def _batches(
    train_df: pd.DataFrame, item_index: Mapping[str, int], p: HierParams, epoch: int
) -> UserParallelBatches | SessionParallelBatches:
    """The batches of ``epoch``: the same every epoch but with ``shuffle_users`` (from the
    second epoch on, users in a new order)."""
    if p.shuffle_users and p.batching != "user":
        raise ValueError("shuffle_users needs batching=user (session batches follow time order)")
    if p.batching == "session":
        return session_parallel_batches(
            train_df, item_index, p.batch_size, wait_for_user=p.wait_for_user
        )
    shuffled = p.shuffle_users and epoch > 0
    return user_parallel_batches(train_df, item_index, p.batch_size, shuffled, p.seed + epoch)


def _sampler(counts: Tensor, p: HierParams, dev: torch.device, n_steps: int) -> SampleBuffer | None:
    """Negative samples (popularity^alpha), one epoch's worth per refill (at most the official
    10M); None without sampling."""
    if p.n_sample <= 0:
        return None
    cache = min(10_000_000, max(1, p.n_sample) * (n_steps + 1))
    return SampleBuffer(counts, p.n_sample, p.sample_alpha, dev, seed=p.seed, max_size=cache)


@dataclass
class StepTrainer:
    """What one training step needs besides the model and the batch (shared by both loops)."""

    opt: IndexedAdagradM
    loss_fn: Callable[..., Tensor]
    sampler: SampleBuffer | None
    counts: Tensor
    p: HierParams
    interleave: list[str] | None = None
    interleaved: int = 0  # mini-batches interleaved so far: the cycle never restarts
    grad_masks: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def step(
        self,
        model: TrainableModule,
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
            self.grad_masks = start_stage(
                model, [self.interleave[self.interleaved % len(self.interleave)]], self.opt
            )
            self.interleaved += 1
        p = self.p
        bs = int(inputs.shape[0])
        valid = targets >= 0
        out_rows = targets.clamp(min=0)
        if self.sampler is not None:
            out_rows = torch.cat([out_rows, self.sampler.get()])
        state, scores, leaves = model.train_step(inputs, state, user, out_rows)
        if p.loss in ("cross-entropy", "xe") and p.logq > 0:
            corr = logq_correction(self.counts, out_rows, bs, p.sample_alpha, p.logq)
            loss = self.loss_fn(scores, valid, corr)
        else:
            loss = self.loss_fn(scores, valid)
        loss = loss / bs
        for q in model.parameters():
            q.grad = None
        loss.backward()
        for masked, mask in self.grad_masks:
            if masked.grad is not None:
                masked.grad.mul_(mask)
        sparse_grads = []
        for tab, rows, leaf in leaves:
            if tab.requires_grad:  # an item table frozen by the schedule is not updated
                assert leaf.grad is not None  # every gathered row is in the loss
                sparse_grads.append((tab, rows, leaf.grad))
        self.opt.step(sparse_grads)
        return state.detach(), None if user is None else user.detach(), loss.detach() * bs


def run_user_epoch(
    model: TrainableModule, b: UserParallelBatches, tr: StepTrainer, dev: torch.device
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


def run_session_epoch(
    model: TrainableModule,
    b: SessionParallelBatches,
    tr: StepTrainer,
    dev: torch.device,
    chain: UserChain | None,
) -> tuple[float, int]:
    """One epoch of time-ordered session-parallel training (see the module docstring and
    :class:`UserChain`; ``chain`` is None for models without a user state)."""
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
