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

import numpy as np
import pandas as pd
import torch

from streamrec.model.api import StepModel
from trainer.batching import session_arrays
from trainer.metrics import MetricAccumulator

SESSION, ITEM, TIME = "SessionId", "ItemId", "Time"


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
) -> MetricAccumulator:
    """Rank every next event of the encoded sessions and add the ranks to ``accumulator``.

    ``user_states`` (``[n_sessions, user_state_dim]``, optional) is the user state each session
    starts from (HRNN per-user evaluation passes the warmed states); by default every session
    starts from ``model.initial_user_state``. Returns the accumulator.
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
            state, scores = model.step(pad_t[t, :n], state, ustate)
            accumulator.add(scores, pad_t[t + 1, :n], ties)
    return accumulator


def evaluate_next_item(
    model: StepModel,
    test_df: pd.DataFrame,
    item_index: Mapping[str, int],
    ks: Iterable[int] = (1, 5, 10, 20),
    ties: str = "conservative",
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Recall@k and MRR@k of next-item prediction on ``test_df`` (see the module docstring).

    Returns ``{"recall@k": ..., "mrr@k": ... for each k, "n_events": ..., "n_sessions": ...}``.
    Raises ValueError if a test item is not in ``item_index``.
    """
    item_rows, offsets, _ = session_arrays(test_df, item_index)
    acc = MetricAccumulator(ks)
    with eval_mode(model):
        evaluate_sessions(
            model, item_rows, offsets, acc, ties=ties, batch_size=batch_size, device=device
        )
    out = acc.result()
    out["n_sessions"] = int((np.diff(offsets) >= 2).sum())
    return out
