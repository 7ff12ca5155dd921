"""GRU4Rec training loop: session-parallel mini-batches, sampled negatives, sparse Adagrad.

``train_gru4rec`` reads as its phases: the data (item index, sessions, the batch plan), the
model (fresh, or grown from a warm start's), the optimiser (continuing a saved state), the
training step on static buffers (``TrainStep``), how each step runs (``StepRunner``: eagerly,
or as a replay of a CUDA graph), then the epochs.

The hot loop only slices precomputed device tensors; it never reads a value back to the host
except for the progress bar every ``log_every`` steps, so a GPU runs it launch-bound, not
sync-bound, and every step has the same shapes (CUDA-graph friendly).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from streamrec.model.device import resolve_device
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.model.items import build_item_index
from trainer.batching import BatchPlan, SessionArrays, order_sessions, session_parallel_plan
from trainer.losses import get_loss, logq_correction
from trainer.memory_head import HeadFit, collect, fit_head, split_holdout
from trainer.optim import IndexedAdagradM
from trainer.presets import TrainParams, make_params
from trainer.sampling import SampleBuffer


def train_gru4rec(
    train_df: pd.DataFrame,
    params: TrainParams | dict[str, Any] | None = None,
    *,
    progress: bool = True,
    log_every: int = 100,
    max_steps: int | None = None,
    init: tuple[GRU4Rec, list[str]] | None = None,
    init_optimizer: dict[str, torch.Tensor] | None = None,
    keep_optimizer: bool = False,
) -> tuple[GRU4Rec, list[str], dict[str, Any]]:
    """Train GRU4Rec on a click frame; returns ``(model in eval mode, item_ids, stats)``.

    ``max_steps`` stops each epoch early (benchmarks).  Same seed + same device: same result.
    ``init = (model, item_ids)`` warm-starts (trainer.warmstart.grow_gru4rec): the old items
    keep their rows and weights, new items get new rows after them, the architecture is the
    old model's. ``init_optimizer`` (a warm start's) continues the Adagrad accumulators saved
    by an earlier run (``stats["optimizer_state"]`` of a run with ``keep_optimizer``): without
    them the first steps of a warm start are as large as a fresh model's.
    """
    p = _resolve_params(params)
    device = resolve_device(p.device)
    torch.manual_seed(p.seed)  # dropout draws from the global generators
    t_setup = time.perf_counter()
    data = TrainingData.build(train_df, p.batch_size, device, None if init is None else init[1])
    model = _build_model(p, len(data.item_ids), device, init)
    opt, named = _optimizer(model, p, init_optimizer)
    step = TrainStep(model, opt, data, p, device)
    n_steps = data.plan.n_steps if max_steps is None else min(data.plan.n_steps, max_steps)
    events_per_epoch = data.events_before(n_steps)
    setup_seconds = time.perf_counter() - t_setup

    head = MemoryHeadSchedule.build(model, data, p, max_steps)
    runner = StepRunner(step, use_graph=p.cuda_graph and device.type == "cuda")
    model.train()
    t0 = time.perf_counter()
    epoch_losses = []
    events_trained = 0
    with _ProgressBar(n_steps, p.n_epochs, log_every, data, progress) as bar:
        for epoch in range(p.n_epochs):
            head.before_epoch(epoch, step)
            n = (
                step.data.plan.n_steps
                if max_steps is None
                else min(step.data.plan.n_steps, max_steps)
            )
            ev = step.data.events_before(n)
            epoch_losses.append(_run_epoch(step, runner, n, ev, bar.epoch(epoch)))
            events_trained += ev
        held = head.after_training(step)
        if held is not None:  # one epoch: the held-out sessions, once, after the head's fit
            step.data = held
            n = held.plan.n_steps if max_steps is None else min(held.plan.n_steps, max_steps)
            ev = held.events_before(n)
            _run_epoch(step, runner, n, ev, _EpochBar(bar, p.n_epochs - 1, silent=True))
            events_trained += ev
            step.data = data
        train_seconds = time.perf_counter() - t0
        events_per_s = events_trained / max(train_seconds, 1e-9)
        bar.finish(events_per_s)  # the bar ends on the summary's figure
    model.eval()
    stats = {
        "device": str(device),
        "n_items": len(data.item_ids),
        "n_sessions": len(data.sessions.session_ids),
        "n_events_per_epoch": events_per_epoch,
        "n_steps_per_epoch": n_steps,
        "events_trained": events_trained,
        "epoch_losses": epoch_losses,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "train_events_per_s": events_per_s,
        "params": p.to_dict(),
        "cuda_graph": runner.graph is not None,
    }
    if head.fit is not None:
        stats["memory_head"] = asdict(head.fit)
    if keep_optimizer:
        stats["optimizer_state"] = opt.export_state(named)
    return model, data.item_ids, stats


# ----------------------------------------------------------------------------- phases


def _resolve_params(params: TrainParams | dict[str, Any] | None) -> TrainParams:
    if params is None:
        params = TrainParams()
    elif isinstance(params, dict):
        params = make_params(None, params)
    return params.validate()


@dataclass
class TrainingData:
    """The item index and the session-parallel plan of a training frame, on the device."""

    item_ids: list[str]
    sessions: SessionArrays
    plan_np: BatchPlan[np.ndarray]  # on the host: event counts without a device sync
    plan: BatchPlan[Tensor]
    keep: Tensor  # [T, B, 1]: 0 where a slot starts a session (multiplies the state)
    item_counts: Tensor  # [n_items] training events per item row
    events_cum: np.ndarray  # [T + 1]: (input, target) pairs in the first t steps

    @classmethod
    def build(
        cls,
        train_df: pd.DataFrame,
        batch_size: int,
        device: torch.device,
        init_ids: list[str] | None,
    ) -> TrainingData:
        """Item rows follow first appearance in training; a warm start's items (``init_ids``)
        keep their rows and new items come after them."""
        item_ids, index = build_item_index(_sorted_for_index(train_df)["ItemId"])
        if init_ids is not None:
            from trainer.warmstart import extend_index

            item_ids = extend_index(init_ids, item_ids)
            index = {iid: r for r, iid in enumerate(item_ids)}
        sessions = order_sessions(train_df, index)
        plan_np = session_parallel_plan(sessions, batch_size)
        if plan_np.n_events == 0:
            raise ValueError("training data has no session with 2 or more events")
        plan = plan_np.to(device)
        keep = (~plan.reset).to(torch.float32).unsqueeze(2)
        counts = np.bincount(sessions.items, minlength=len(item_ids)).astype(np.float32)
        cum = np.concatenate([[0], np.cumsum(plan_np.valid.sum(axis=1))])
        item_counts = torch.as_tensor(counts, device=device)
        return cls(item_ids, sessions, plan_np, plan, keep, item_counts, cum)

    def with_sessions(self, sessions: SessionArrays, batch_size: int) -> TrainingData:
        """The same items (rows, counts) with the plan of ``sessions`` (a subset of them)."""
        plan_np = session_parallel_plan(sessions, batch_size)
        plan = plan_np.to(self.keep.device)
        keep = (~plan.reset).to(torch.float32).unsqueeze(2)
        cum = np.concatenate([[0], np.cumsum(plan_np.valid.sum(axis=1))])
        return replace(
            self, sessions=sessions, plan_np=plan_np, plan=plan, keep=keep, events_cum=cum
        )

    def events_before(self, step: int) -> int:
        """(input, target) pairs in the plan's first ``step`` steps."""
        return int(self.events_cum[min(step, len(self.events_cum) - 1)])


def _build_model(
    p: TrainParams, n_items: int, device: torch.device, init: tuple[GRU4Rec, list[str]] | None
) -> GRU4Rec:
    """A fresh model, or (warm start) ``init``'s grown to ``n_items`` rows. The fresh one is
    built in both cases: its GRU cells draw from the global generator, and a warm start keeps
    those draws so that its dropout stream is the one it always had."""
    model = GRU4Rec(
        GRU4RecConfig(
            n_items=n_items,
            layers=p.layers,
            embedding=p.embedding,
            constrained_embedding=p.constrained_embedding,
            dropout_p_embed=p.dropout_p_embed,
            dropout_p_hidden=p.dropout_p_hidden,
            final_act=p.resolved_final_act(),
            elu_param=p.elu_param if p.elu_param > 0 else 1.0,
            session_memory=p.session_memory,
            memory_gate=p.memory_gate,
        ),
        seed=p.seed,
    )
    if init is not None:
        from trainer.warmstart import grow_gru4rec

        model = grow_gru4rec(init[0], n_items, p.seed)
    return model.to(device)


def _optimizer(
    model: GRU4Rec, p: TrainParams, init_optimizer: dict[str, Tensor] | None
) -> tuple[IndexedAdagradM, dict[str, torch.nn.Parameter]]:
    """Adagrad(+momentum), item tables row-sparse, continuing ``init_optimizer`` when given."""
    sparse = model.sparse_tables()
    sparse_ids = {id(t) for t in sparse}
    # the session-memory head is fitted apart (trainer.memory_head), never by this optimiser
    dense = [
        q
        for name, q in model.named_parameters()
        if id(q) not in sparse_ids and not name.startswith("memory_")
    ]
    opt = IndexedAdagradM(dense, sparse, p.learning_rate, p.momentum, nesterov=p.nesterov)
    named = dict(model.named_parameters())
    if init_optimizer is not None:
        opt.import_state(named, init_optimizer)
    return opt, named


class MemoryHeadSchedule:
    """When the session-memory head is fitted (``session_memory`` > 0, ``memory_holdout`` > 0):
    every epoch but the last trains on the sessions not held out; then the head is fitted on
    the held-out ones (trainer.memory_head); the last epoch trains on every session. With one
    epoch (a warm-start retrain's usual count), the head is fitted after it and the held-out
    sessions are then trained on once, so that every session is still learnt. Without the
    head: every epoch on every session."""

    def __init__(
        self,
        model: GRU4Rec,
        full: TrainingData,
        kept: TrainingData | None,
        held: SessionArrays | None,
    ) -> None:
        self.model, self.full, self.kept, self.held = model, full, kept, held
        self.fit: HeadFit | None = None
        self.n_epochs = 0
        self.batch_size = 0

    @classmethod
    def build(
        cls, model: GRU4Rec, data: TrainingData, p: TrainParams, max_steps: int | None
    ) -> MemoryHeadSchedule:
        if not model.memory or p.memory_holdout <= 0:
            return cls(model, data, None, None)
        kept, held = split_holdout(data.sessions, p.memory_holdout, p.seed)
        kept_data = data.with_sessions(kept, p.batch_size)
        if kept_data.plan_np.n_events == 0 or not (np.diff(held.offsets) >= 2).any():
            # too little data to hold any out: the offsets stay 0 (the paper's scores)
            return cls(model, data, None, None)
        schedule = cls(model, data, kept_data, held)
        schedule.n_epochs, schedule.batch_size = p.n_epochs, p.batch_size
        return schedule

    def before_epoch(self, epoch: int, step: TrainStep) -> None:
        if self.kept is None:
            return
        if epoch == 0:
            step.data = self.kept
        elif epoch == self.n_epochs - 1:
            self._fit()
            step.data = self.full

    def after_training(self, step: TrainStep) -> TrainingData | None:
        """After the epochs: with one epoch, fit the head and return the held-out sessions
        (the caller trains on them once); else None."""
        step.data = self.full
        if self.kept is None or self.fit is not None:
            return None
        self._fit()
        assert self.held is not None
        held = self.full.with_sessions(self.held, self.batch_size)
        return held if held.plan_np.n_events > 0 else None

    def _fit(self) -> None:
        assert self.held is not None
        self.model.eval()
        self.fit = fit_head(self.model, collect(self.model, self.held))
        self.model.train()


class TrainStep:
    """One training step on static buffers: :meth:`fill` copies step t of the plan (and the
    next negative samples) in, :meth:`run` does forward, backward and the optimiser step on
    them. The same tensors every step, so the step can be captured as a CUDA graph."""

    def __init__(
        self,
        model: GRU4Rec,
        opt: IndexedAdagradM,
        data: TrainingData,
        p: TrainParams,
        device: torch.device,
    ) -> None:
        self.model, self.opt, self.data, self.p = model, opt, data, p
        self.dense = opt.dense
        self.sampler = (
            SampleBuffer(
                data.item_counts,
                p.n_sample,
                p.sample_alpha,
                device,
                p.seed,
                p.sample_cache_max_size,
            )
            if p.n_sample > 0
            else None
        )
        if self.sampler is not None:
            self.sampler.refill()  # the first bulk draw belongs to setup, as in the official code
        self.loss_fn = get_loss(p.loss, p.bpreg)
        self.use_logq = p.loss == "cross-entropy" and p.logq > 0
        b = self.batch_size = p.batch_size
        n_out = b + (p.n_sample if self.sampler is not None else 0)
        self.x = torch.zeros(b, dtype=torch.long, device=device)
        self.y = torch.zeros(n_out, dtype=torch.long, device=device)
        self.valid = torch.zeros(b, dtype=torch.bool, device=device)
        self.keep = torch.zeros(b, 1, device=device)
        self.hidden = [torch.zeros(b, h, device=device) for h in p.layers]
        self.loss_sum = torch.zeros((), device=device)

    def start_epoch(self) -> None:
        for h in self.hidden:
            h.zero_()
        self.loss_sum.zero_()

    def mean_loss(self, n_events: int) -> float:
        """The per-event mean loss so far this epoch (a device sync)."""
        return float(self.loss_sum) * self.batch_size / max(1, n_events)

    def fill(self, t: int) -> None:
        plan, b = self.data.plan, self.batch_size
        self.x.copy_(plan.inputs[t], non_blocking=True)
        self.y[:b].copy_(plan.targets[t], non_blocking=True)
        if self.sampler is not None:
            self.y[b:].copy_(self.sampler.get(), non_blocking=True)
        self.valid.copy_(plan.valid[t], non_blocking=True)
        self.keep.copy_(self.data.keep[t], non_blocking=True)

    def run(self) -> None:
        hs = [h * self.keep for h in self.hidden]
        scores, new_hidden, leaves = self.model.train_forward(self.x, self.y, hs)
        if self.use_logq:
            p = self.p
            corr = logq_correction(
                self.data.item_counts, self.y, self.batch_size, p.sample_alpha, p.logq
            )
            loss = self.loss_fn(scores, self.valid, corr) / self.batch_size
        else:
            loss = self.loss_fn(scores, self.valid) / self.batch_size
        for q in self.dense:
            q.grad = None
        loss.backward()
        sparse_grads = []
        for tab, rows, leaf in leaves:
            assert leaf.grad is not None  # every gathered row is in the loss
            sparse_grads.append((tab, rows, leaf.grad))
        self.opt.step(sparse_grads)
        with torch.no_grad():
            for h, nh in zip(self.hidden, new_hidden, strict=True):
                h.copy_(nh)
            self.loss_sum.add_(loss.detach())


class StepRunner:
    """Runs a :class:`TrainStep` eagerly, or (``use_graph``, a CUDA device) as a replay of a
    CUDA graph captured from it: :data:`N_WARM` eager steps on a side stream first
    (autograd/cuBLAS initialisation), the capture at the next one; a capture that fails (an op
    that cannot be captured) warns and trains eagerly."""

    N_WARM = 3

    def __init__(self, step: TrainStep, use_graph: bool) -> None:
        self.step = step
        self.want_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, t: int) -> None:
        """Run the step whose buffers hold step ``t`` of the epoch."""
        if self.graph is not None:
            self.graph.replay()
        elif self.want_graph and t == self.N_WARM:
            self._capture_and_replay()
        elif self.want_graph and t < self.N_WARM:
            self._warm_up()
        else:
            self.step.run()

    def _warm_up(self) -> None:
        device = self.step.x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.step.run()
        torch.cuda.current_stream(device).wait_stream(side)

    def _capture_and_replay(self) -> None:
        try:
            self.graph = _capture(self.step.run, self.step.dense)
        except RuntimeError as e:  # e.g. an op that cannot be captured
            warnings.warn(f"CUDA graph capture failed, training eagerly: {e}", stacklevel=2)
            self.want_graph = False
            self.step.run()
        else:
            self.graph.replay()


def _capture(body: Callable[[], None], dense: list[torch.nn.Parameter]) -> torch.cuda.CUDAGraph:
    """Capture one training step (forward, backward, optimiser) as a CUDA graph."""
    torch.cuda.synchronize()
    for q in dense:  # the graph's backward allocates them from its private pool
        q.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _run_epoch(
    step: TrainStep, runner: StepRunner, n_steps: int, n_events: int, bar: _EpochBar
) -> float:
    """One epoch from zero states; returns its per-event mean loss (the official log's
    figure; one sync per epoch)."""
    step.start_epoch()
    for t in range(n_steps):
        step.fill(t)
        runner(t)
        bar.after_step(t, step)
    return step.mean_loss(n_events)


# ----------------------------------------------------------------------------- progress


class _ProgressBar:
    """A rich progress bar on stderr (events/s, loss) updated every ``log_every`` steps, or
    nothing when ``enabled`` is false. Its rate is the run's so far (events trained since
    the start / seconds), the summary's definition, and it ends on the summary's figure
    (:meth:`finish`): a rate over the last few steps alone read far from it."""

    def __init__(
        self, n_steps: int, n_epochs: int, log_every: int, data: TrainingData, enabled: bool
    ) -> None:
        self.n_steps, self.n_epochs, self.log_every, self.data = n_steps, n_epochs, log_every, data
        self.context = _progress(n_steps * n_epochs, enabled)
        self.bar: Any = None
        self.task: Any = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> _ProgressBar:
        self.bar = self.context.__enter__()
        if self.bar is not None:
            total = self.n_steps * self.n_epochs
            self.task = self.bar.add_task("train", total=total, eps=0.0, loss=float("nan"))
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.context.__exit__(*exc)

    def epoch(self, epoch: int) -> _EpochBar:
        return _EpochBar(self, epoch)

    def finish(self, events_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, eps=events_per_s)


class _EpochBar:
    def __init__(self, owner: _ProgressBar, epoch: int, *, silent: bool = False) -> None:
        self.owner, self.epoch, self.silent = owner, epoch, silent
        self.last_step = 0

    def after_step(self, t: int, step: TrainStep) -> None:
        o = self.owner
        if self.silent or o.bar is None or ((t + 1) % o.log_every != 0 and t + 1 != o.n_steps):
            return
        done = self.epoch * o.data.events_before(o.n_steps) + o.data.events_before(t + 1)
        o.bar.update(
            o.task,
            advance=t + 1 - self.last_step,
            eps=done / max(time.perf_counter() - o.t0, 1e-9),
            loss=step.mean_loss(o.data.events_before(t + 1)),
            description=f"epoch {self.epoch + 1}/{o.n_epochs}",
        )
        self.last_step = t + 1


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[eps]:>9,.0f} ev/s  loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def _sorted_for_index(df: pd.DataFrame) -> pd.DataFrame:
    """The frame in training order, so that item rows follow first appearance in training."""
    sess = df["SessionId"].astype(str)
    first = df.groupby(sess, sort=False)["Time"].transform("min")
    tmp = pd.DataFrame({"f": first.to_numpy(), "s": sess.to_numpy(), "t": df["Time"].to_numpy()})
    order = np.lexsort(
        (np.arange(len(df)), tmp["t"].to_numpy(), tmp["s"].to_numpy(), tmp["f"].to_numpy())
    )
    return df.iloc[order]
