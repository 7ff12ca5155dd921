"""Next-item evaluation through the step API (docs/architecture.md).

For every event of a test session after the first, the model has read the session's earlier
events (state reset at the session start) and the true next item is ranked among all items.
Sessions are evaluated in parallel: they are sorted by length (longest first) and cut into
chunks of ``batch_size``; within a chunk the sessions still running at step t are a prefix, so
each time step is one batched ``model.step`` on that prefix. Every session starts from the
model's initial state and only sees its own events, so the result is the same as evaluating the
sessions one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch

from streamrec.model.api import InnerProductScores, SplitStepModel, StepModel
from streamrec.model.retrieval import Retriever
from trainer.batching import session_arrays
from trainer.metrics import MetricAccumulator, ranks

#: the most score bytes evaluation holds at once (states x items x 4): a step over a large
#: catalogue is scored in row blocks of this size instead of one [batch, n_items] matrix
SCORE_BYTES = 256 * 2**20

SESSION, ITEM, TIME = "SessionId", "ItemId", "Time"


def advance(
    model: Any, rows: torch.Tensor, state: torch.Tensor, user: torch.Tensor | None
) -> torch.Tensor:
    """The states after one step, without scoring (``forward_step``, else ``advance``)."""
    forward = getattr(model, "forward_step", None)
    if forward is not None:
        return forward(rows, state, user)[0]
    if isinstance(model, SplitStepModel):
        return model.advance(rows, state)
    return model.step(rows, state, user)[0]


def ranks_in_topk(
    values: torch.Tensor, top: torch.Tensor, targets: torch.Tensor, ties: str, worst: float
) -> torch.Tensor:
    """Ranks of ``targets`` from a top-k answer (``values``, ``top`` ``[B, k]``): a target in
    the answer ranks among the answer's items (ties as :func:`trainer.metrics.ranks`), a target
    not in it gets ``worst`` (beyond every cut-off up to k)."""
    hit = top == targets.to(top.device).unsqueeze(1)
    found = hit.any(dim=1)
    ts = torch.where(hit, values, torch.full_like(values, -torch.inf)).amax(dim=1, keepdim=True)
    higher = (values > ts).sum(dim=1).to(torch.float32)
    at_least = (values >= ts).sum(dim=1).to(torch.float32)
    if ties == "standard":
        r = higher + 1
    elif ties == "conservative":
        r = at_least
    else:
        r = (higher + 1 + at_least) / 2
    return torch.where(found, r, torch.full_like(r, worst))


def step_ranks(
    model: Any,
    rows: torch.Tensor,
    state: torch.Tensor,
    user: torch.Tensor | None,
    targets: torch.Tensor,
    ties: str,
    *,
    retriever: Retriever | None = None,
    k: int = 20,
    score_bytes: int = SCORE_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new states, ranks of ``targets``) for one step of a batch.

    With ``retriever``: the ranks within its top-``k`` answer (what a worker serving that
    retrieval answers). Else every item is scored: at once when ``[B, n_items]`` fits
    ``score_bytes``, otherwise in row blocks that do (bounded memory over any catalogue, the
    same ranks: each row's scores are computed as before)."""
    n_items = int(model.n_items)
    b = state.shape[0]
    split = isinstance(model, InnerProductScores)
    if retriever is None and (b * n_items * 4 <= score_bytes or not split):
        new, scores = model.step(rows, state, user)
        return new, ranks(scores, targets, ties)
    new = advance(model, rows, state, user)
    if retriever is not None:
        # ``rows``: the clicked items, whose successors a successor table adds (as served)
        values, top = retriever.topk(new, user, min(k, n_items), clicked=rows)
        return new, ranks_in_topk(values, top, targets, ties, float(n_items))
    assert isinstance(model, InnerProductScores)
    block = max(1, score_bytes // (4 * n_items))
    parts = []
    for lo in range(0, b, block):
        us = None if user is None else user[lo : lo + block]
        scores = model.score_all(new[lo : lo + block], us)
        parts.append(ranks(scores, targets[lo : lo + block], ties))
    return new, torch.cat(parts)


def model_device(model: object) -> torch.device:
    """The device of a model's parameters/buffers (or its ``device`` attribute; else CPU)."""
    if isinstance(model, torch.nn.Module):
        t: torch.Tensor
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    dev = getattr(model, "device", None)  # a step model that is not a module (baselines)
    return torch.device(dev) if dev is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """A torch module in evaluation mode for the duration, then back in the mode it had
    (other step models, e.g. the baselines, have no mode)."""
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None and was_training:
            module.train()


@torch.inference_mode()
def evaluate_sessions(
    model: StepModel,
    item_rows: np.ndarray,
    offsets: np.ndarray,
    accumulator: MetricAccumulator,
    *,
    ties: str = "conservative",
    batch_size: int = 512,
    device: torch.device | str | None = None,
    user_states: torch.Tensor | None = None,
    retriever: Retriever | None = None,
) -> MetricAccumulator:
    """Rank every next event of the encoded sessions and add the ranks to ``accumulator``.

    ``user_states`` (``[n_sessions, user_state_dim]``, optional) is the user state each session
    starts from (HRNN per-user evaluation passes the warmed states); by default every session
    starts from ``model.initial_user_state``. ``retriever``: rank within its top-k answers
    (ANN retrieval; see :func:`step_ranks`). Returns the accumulator.
    """
    device = torch.device(device) if device is not None else model_device(model)
    n_sessions = len(offsets) - 1
    lengths = np.diff(offsets)
    if n_sessions == 0:
        return accumulator
    if item_rows.size and (item_rows.min() < 0 or item_rows.max() >= model.n_items):
        raise ValueError(f"item rows must be in [0, {model.n_items}); got out-of-range rows")
    if user_states is not None and user_states.shape[0] != n_sessions:
        raise ValueError(f"user_states has {user_states.shape[0]} rows for {n_sessions} sessions")
    # longest first (stable), sessions of length 1 have nothing to predict
    by_len = np.argsort(-lengths, kind="stable")
    by_len = by_len[lengths[by_len] >= 2]
    for c0 in range(0, len(by_len), batch_size):
        chunk = by_len[c0 : c0 + batch_size]
        lens = lengths[chunk]
        b, max_len = len(chunk), int(lens[0])
        # padded [b, max_len] item matrix, built with one vectorised gather
        total = int(lens.sum())
        r = np.repeat(np.arange(b), lens)
        col = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        pad = np.full((b, max_len), -1, dtype=np.int64)
        pad[r, col] = item_rows[np.repeat(offsets[chunk], lens) + col]
        pad_t = torch.from_numpy(np.ascontiguousarray(pad.T)).to(device)  # [max_len, b]
        # sessions still predicting at step t (need an event t + 1): a prefix of the chunk
        n_live = (lens[None, :] > np.arange(1, max_len)[:, None]).sum(axis=1)
        ustate: torch.Tensor | None
        if user_states is not None:
            ustate = user_states[torch.from_numpy(chunk).to(user_states.device)].to(device)
        else:
            ustate = model.initial_user_state(b)
        state = model.initial_state(ustate, b)
        for t in range(max_len - 1):
            n = int(n_live[t])
            if n < state.shape[0]:
                state = state[:n]
                ustate = ustate[:n] if ustate is not None else None
            state, step_r = step_ranks(
                model,
                pad_t[t, :n],
                state,
                ustate,
                pad_t[t + 1, :n],
                ties,
                retriever=retriever,
                k=max(accumulator.ks),
            )
            accumulator.add_ranks(step_r)
    return accumulator


def evaluate_next_item(
    model: StepModel,
    test_df: pd.DataFrame,
    item_index: Mapping[str, int],
    ks: Iterable[int] = (1, 5, 10, 20),
    ties: str = "conservative",
    batch_size: int = 512,
    device: torch.device | str | None = None,
    retriever: Retriever | None = None,
) -> dict[str, float]:
    """Recall@k and MRR@k of next-item prediction on ``test_df`` (see the module docstring).

    Returns ``{"recall@k": ..., "mrr@k": ... for each k, "n_events": ..., "n_sessions": ...}``.
    Raises ValueError if a test item is not in ``item_index``.
    """
    item_rows, offsets, _ = session_arrays(test_df, item_index)
    acc = MetricAccumulator(ks)
    with eval_mode(model):
        evaluate_sessions(
            model,
            item_rows,
            offsets,
            acc,
            ties=ties,
            batch_size=batch_size,
            device=device,
            retriever=retriever,
        )
    out = acc.result()
    out["n_sessions"] = int((np.diff(offsets) >= 2).sum())
    return out
