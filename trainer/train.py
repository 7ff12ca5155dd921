"""GRU4Rec training loop: session-parallel mini-batches, sampled negatives, sparse Adagrad.

The hot loop only slices precomputed device tensors; it never reads a value back to the host
except for the progress bar every ``log_every`` steps, so a GPU runs it launch-bound, not
sync-bound, and every step has the same shapes (CUDA-graph friendly).
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch

from streamrec.model.device import resolve_device
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.model.items import build_item_index
from trainer.batching import BatchPlan, order_sessions, session_parallel_plan
from trainer.losses import get_loss, logq_correction
from trainer.optim import IndexedAdagradM
from trainer.presets import TrainParams, make_params
from trainer.sampling import SampleBuffer


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
    if params is None:
        params = TrainParams()
    elif isinstance(params, dict):
        params = make_params(None, params)
    p = params.validate()
    device = resolve_device(p.device)
    torch.manual_seed(p.seed)  # dropout draws from the global generators
    t_setup = time.perf_counter()

    item_ids, index = build_item_index(_sorted_for_index(train_df)["ItemId"])
    if init is not None:
        from trainer.warmstart import extend_index

        item_ids = extend_index(init[1], item_ids)
        index = {iid: r for r, iid in enumerate(item_ids)}
    sessions = order_sessions(train_df, index)
    plan_np = session_parallel_plan(sessions, p.batch_size)
    if plan_np.n_events == 0:
        raise ValueError("training data has no session with 2 or more events")
    plan: BatchPlan[torch.Tensor] = plan_np.to(device)
    keep = (~plan.reset).to(torch.float32).unsqueeze(2)  # [T, B, 1] multiplies the state
    counts = np.bincount(sessions.items, minlength=len(item_ids)).astype(np.float32)
    item_counts = torch.as_tensor(counts, device=device)

    model = GRU4Rec(
        GRU4RecConfig(
            n_items=len(item_ids),
            layers=p.layers,
            embedding=p.embedding,
            constrained_embedding=p.constrained_embedding,
            dropout_p_embed=p.dropout_p_embed,
            dropout_p_hidden=p.dropout_p_hidden,
            final_act=p.resolved_final_act(),
            elu_param=p.elu_param if p.elu_param > 0 else 1.0,
        ),
        seed=p.seed,
    )
    if init is not None:
        from trainer.warmstart import grow_gru4rec

        model = grow_gru4rec(init[0], len(item_ids), p.seed)
    model = model.to(device)
    sparse = model.sparse_tables()
    sparse_ids = {id(t) for t in sparse}
    dense = [q for q in model.parameters() if id(q) not in sparse_ids]
    opt = IndexedAdagradM(dense, sparse, p.learning_rate, p.momentum, nesterov=p.nesterov)
    named = dict(model.named_parameters())
    if init_optimizer is not None:
        opt.import_state(named, init_optimizer)
    sampler = (
        SampleBuffer(
            item_counts, p.n_sample, p.sample_alpha, device, p.seed, p.sample_cache_max_size
        )
        if p.n_sample > 0
        else None
    )
    if sampler is not None:
        sampler.refill()  # the first bulk draw belongs to setup, as in the official code
    loss_fn = get_loss(p.loss, p.bpreg)
    use_logq = p.loss == "cross-entropy" and p.logq > 0
    B = p.batch_size
    n_steps = plan.n_steps if max_steps is None else min(plan.n_steps, max_steps)
    events_per_epoch = plan_np.n_events if max_steps is None else int(plan_np.valid[:n_steps].sum())
    setup_seconds = time.perf_counter() - t_setup

    # Static buffers: every step copies its slice of the plan in, then runs `body` (eagerly,
    # or as a replay of a CUDA graph captured from it).
    n_out = B + (p.n_sample if sampler is not None else 0)
    x_buf = torch.zeros(B, dtype=torch.long, device=device)
    y_buf = torch.zeros(n_out, dtype=torch.long, device=device)
    valid_buf = torch.zeros(B, dtype=torch.bool, device=device)
    keep_buf = torch.zeros(B, 1, device=device)
    hidden = [torch.zeros(B, h, device=device) for h in p.layers]
    loss_sum = torch.zeros((), device=device)

    def fill(t: int) -> None:
        x_buf.copy_(plan.inputs[t], non_blocking=True)
        y_buf[:B].copy_(plan.targets[t], non_blocking=True)
        if sampler is not None:
            y_buf[B:].copy_(sampler.get(), non_blocking=True)
        valid_buf.copy_(plan.valid[t], non_blocking=True)
        keep_buf.copy_(keep[t], non_blocking=True)

    def body() -> None:
        hs = [h * keep_buf for h in hidden]
        scores, new_hidden, leaves = model.train_forward(x_buf, y_buf, hs)
        if use_logq:
            corr = logq_correction(item_counts, y_buf, B, p.sample_alpha, p.logq)
            loss = loss_fn(scores, valid_buf, corr) / B
        else:
            loss = loss_fn(scores, valid_buf) / B
        for q in dense:
            q.grad = None
        loss.backward()
        sparse_grads = []
        for tab, rows, leaf in leaves:
            assert leaf.grad is not None  # every gathered row is in the loss
            sparse_grads.append((tab, rows, leaf.grad))
        opt.step(sparse_grads)
        with torch.no_grad():
            for h, nh in zip(hidden, new_hidden, strict=True):
                h.copy_(nh)
            loss_sum.add_(loss.detach())

    graph: torch.cuda.CUDAGraph | None = None
    want_graph = p.cuda_graph and device.type == "cuda"
    n_warm = 3  # eager steps on a side stream before capture (autograd/cuBLAS init)

    model.train()
    epoch_losses: list[float] = []
    t0 = time.perf_counter()
    with _progress(n_steps * p.n_epochs, progress) as bar:
        task = (
            bar.add_task("train", total=n_steps * p.n_epochs, eps=0.0, loss=float("nan"))
            if bar
            else None
        )
        for epoch in range(p.n_epochs):
            for h in hidden:
                h.zero_()
            loss_sum.zero_()
            last_t, last_step = time.perf_counter(), 0
            for t in range(n_steps):
                fill(t)
                if graph is not None:
                    graph.replay()
                elif want_graph and t == n_warm:
                    try:
                        graph = _capture(body, dense)
                    except RuntimeError as e:  # e.g. an op that cannot be captured
                        warnings.warn(
                            f"CUDA graph capture failed, training eagerly: {e}", stacklevel=2
                        )
                        want_graph = False
                        body()
                    else:
                        graph.replay()
                elif want_graph and t < n_warm:
                    side = torch.cuda.Stream(device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):
                        body()
                    torch.cuda.current_stream(device).wait_stream(side)
                else:
                    body()
                if bar is not None and ((t + 1) % log_every == 0 or t + 1 == n_steps):
                    now = time.perf_counter()
                    ev = int(plan_np.valid[last_step : t + 1].sum())
                    bar.update(
                        task,
                        advance=t + 1 - last_step,
                        eps=ev / max(now - last_t, 1e-9),
                        loss=float(loss_sum) * B / max(1, int(plan_np.valid[: t + 1].sum())),
                        description=f"epoch {epoch + 1}/{p.n_epochs}",
                    )
                    last_t, last_step = now, t + 1
            # per-event mean loss of the epoch (the official log's figure); one sync per epoch
            epoch_losses.append(float(loss_sum) * B / max(1, events_per_epoch))
    train_seconds = time.perf_counter() - t0
    model.eval()
    n_events = events_per_epoch * p.n_epochs
    stats = {
        "device": str(device),
        "n_items": len(item_ids),
        "n_sessions": len(sessions.session_ids),
        "n_events_per_epoch": events_per_epoch,
        "n_steps_per_epoch": n_steps,
        "epoch_losses": epoch_losses,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "train_events_per_s": n_events / max(train_seconds, 1e-9),
        "params": p.to_dict(),
        "cuda_graph": graph is not None,
    }
    if keep_optimizer:
        stats["optimizer_state"] = opt.export_state(named)
    return model, item_ids, stats


def _capture(body: Any, dense: list[torch.nn.Parameter]) -> torch.cuda.CUDAGraph:
    """Capture one training step (forward, backward, optimiser) as a CUDA graph."""
    torch.cuda.synchronize()
    for q in dense:  # the graph's backward allocates them from its private pool
        q.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _sorted_for_index(df: pd.DataFrame) -> pd.DataFrame:
    """The frame in training order, so that item rows follow first appearance in training."""
    sess = df["SessionId"].astype(str)
    first = df.groupby(sess, sort=False)["Time"].transform("min")
    tmp = pd.DataFrame({"f": first.to_numpy(), "s": sess.to_numpy(), "t": df["Time"].to_numpy()})
    order = np.lexsort(
        (np.arange(len(df)), tmp["t"].to_numpy(), tmp["s"].to_numpy(), tmp["f"].to_numpy())
    )
    return df.iloc[order]
