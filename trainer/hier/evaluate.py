"""Per-user evaluation of the user-aware models, POP in the step API, split sizes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from streamrec.model.api import StepModule, TrainableStepModel
from streamrec.model.retrieval import Retriever
from trainer.evaluate import eval_mode, model_device, step_ranks
from trainer.hier.batches import (
    EVAL,
    UserParallelBatches,
    advance_at_boundaries,
    user_parallel_batches,
)
from trainer.metrics import MetricAccumulator


@torch.inference_mode()
def evaluate_users(
    model: StepModule,
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    item_index: Mapping[str, int],
    ks: Iterable[int] = (5, 20),
    ties: str = "conservative",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    first_n: int | None = None,
    retriever: Retriever | None = None,
) -> dict[str, float]:
    """Per-user next-item evaluation of each user's test session(s).

    The user's training sessions warm the user state in time order (no learning; skipped for
    models without a user state), then every next item of the test session is ranked among all
    items (``trainer.metrics.ranks`` with ``ties``). Test items outside ``item_index`` are
    neither ranked nor fed (an unknown input keeps the state, as in the live service).
    ``first_n`` ranks only the first ``first_n`` predictions of each test session (where the
    user state matters most). ``retriever``: ranks within its top-k answers (ANN retrieval),
    see :func:`trainer.evaluate.step_ranks`, which also scores large catalogues in blocks.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    model.to(dev)
    test = test_df.copy()
    test[EVAL] = True
    users = set(test["UserId"].astype(str))
    parts = [test]
    if int(model.user_state_dim) > 0:  # the training sessions warm the user state
        hist = train_df[train_df["UserId"].astype(str).isin(users)].copy()
        hist[EVAL] = False
        parts.insert(0, hist)
    b = user_parallel_batches(pd.concat(parts, ignore_index=True), item_index, batch_size)
    scored = (b.targets >= 0) & b.flag
    if first_n is not None:
        scored &= b.position < first_n
    acc = MetricAccumulator(ks)
    with eval_mode(model):
        _rank_scored(model, b, scored, acc, ties, dev, retriever)
    res = acc.result()
    res["n_users"] = len(users)
    return res


def _rank_scored(
    model: StepModule,
    b: UserParallelBatches,
    scored: np.ndarray,
    acc: MetricAccumulator,
    ties: str,
    dev: torch.device,
    retriever: Retriever | None = None,
) -> None:
    """Step through the batches, ranking the targets where ``scored``; the other steps only
    advance the states (without scoring where the model can)."""
    bs = b.inputs.shape[1]
    inputs = torch.from_numpy(b.inputs).to(dev)
    targets = torch.from_numpy(b.targets).to(dev)
    sstart = torch.from_numpy(b.session_start).to(dev)
    ustart = torch.from_numpy(b.user_start).to(dev)
    any_scored = np.asarray(scored.any(axis=1))
    scored_t = torch.from_numpy(scored).to(dev)
    user = model.initial_user_state(bs)
    state = model.initial_state(user, bs)
    for t in range(b.n_steps):
        if b.any_start[t]:
            rows = torch.from_numpy(np.flatnonzero(b.session_start[t])).to(dev)
            state, user = advance_at_boundaries(model, state, user, sstart[t], ustart[t], rows)
        if any_scored[t]:
            # unscored rows rank a stand-in target 0, dropped below
            state, r = step_ranks(
                model, inputs[t], state, user, targets[t].clamp(min=0), ties,
                retriever=retriever, k=max(acc.ks),
            )  # fmt: skip
            acc.add_ranks(r.index_select(0, scored_t[t].nonzero().squeeze(1)))
        elif isinstance(model, TrainableStepModel):  # advance without scoring
            state, _ = model.forward_step(inputs[t], state, user)
        else:
            state, _ = model.step(inputs[t], state, user)


class PopStepModel(nn.Module):
    """POP in the step API (every step scores items by their training count): the baseline
    that :func:`evaluate_users` compares the user-aware models with."""

    user_state_dim = 0
    state_dim = 1
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


def evaluate_users_job(
    model: StepModule,
    test_df: pd.DataFrame,
    item_index: Mapping[str, int],
    ks: Sequence[int],
    ties: str,
    device: torch.device | str | None = None,
    train_df: pd.DataFrame | None = None,
    retriever: Retriever | None = None,
) -> dict[str, float]:
    """The ``trainer`` evaluator for hrnn/prnn: per user, training sessions warm the state."""
    if "UserId" not in test_df.columns:
        raise ValueError("per-user evaluation needs a UserId column in --test")
    if train_df is None:
        train_df = test_df.iloc[:0]
    return evaluate_users(
        model, train_df, test_df, item_index, ks, ties, device=device, retriever=retriever
    )
