"""Warm start for every model: grow a trained model to a larger item index, keep training it.

One generic rule over the model's state (parameters and persistent buffers): a fresh model is
built from the old one's config with the new ``n_items``; a tensor of the same shape in both is
copied bit for bit; a tensor whose first dimension is the item count in both (``old.n_items``
rows in the old model, ``n_items`` in the new one) is an item table (embeddings, output
``Wy``/``By``, HRNN's ``Wuy``, p-RNN's per-item feature buffers and per-subnet output blocks,
GRU4Rec's one-hot input weights): its old rows are copied bit for bit and the new rows keep the
fresh model's initialisation. Any other shape change is refused. The old model is not changed.

The item index only grows: old items keep their rows, items first seen get rows after them
(:func:`extend_index`), so a worker's stored item ids stay valid across a swap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from streamrec.errors import StreamrecError
from streamrec.model.api import RegisteredModel, as_trainable
from streamrec.model.gru4rec import GRU4Rec
from streamrec.model.items import build_item_index
from streamrec.model.prnn import PRNN
from trainer.hier.params import HierParams

_M = TypeVar("_M", bound=RegisteredModel)


def grow_model(old: _M, n_items: int, seed: int | None = None) -> _M:
    """A model like ``old`` with ``n_items >= old.n_items`` item rows (see the module doc)."""
    m = int(old.n_items)
    if n_items < m:
        raise ValueError(f"the item index only grows: {n_items} < {m}")
    new = type(old).from_config({**old.config_dict(), "n_items": n_items}, seed=seed)
    old_sd = old.state_dict()
    new_sd = new.state_dict()
    if set(old_sd) != set(new_sd):
        raise ValueError(f"state keys differ: {sorted(set(old_sd) ^ set(new_sd))}")
    with torch.no_grad():
        for k, v in new_sd.items():
            o = old_sd[k].detach().to("cpu")
            if o.shape == v.shape:
                v.copy_(o)
            elif (
                o.dim() >= 1
                and o.shape[0] == m
                and v.shape[0] == n_items
                and (o.shape[1:] == v.shape[1:])
            ):
                v[:m].copy_(o)  # an item table: old rows first, new rows stay fresh
            else:
                raise ValueError(f"tensor {k}: shape {tuple(o.shape)} cannot grow to {v.shape}")
    return new


def grow_gru4rec(old: GRU4Rec, n_items: int, seed: int | None = None) -> GRU4Rec:
    """:func:`grow_model` for GRU4Rec."""
    return grow_model(old, n_items, seed)


def extend_index(old_ids: Sequence[str], ids: Sequence[str]) -> list[str]:
    """``old_ids`` then the ids of ``ids`` not among them, in their order."""
    known = set(old_ids)
    return [*old_ids, *(i for i in ids if i not in known)]


def warm_epochs(n_epochs: int, new_events: int | None, train_events: int) -> int:
    """Epochs of a warm-start cycle over a window of ``train_events`` of which ``new_events``
    are newer than the parent model's training data.

    The parent has already had ``n_epochs`` passes over the old events; another ``n_epochs``
    over a window that barely grew repeats them cycle after cycle (on MovieLens-1M, monthly
    cycles of 3 epochs over the whole history made every candidate worse than the frozen
    model: bench/results/backtest-ml1m.md). So the window gets the new events' share of the
    epochs, ``ceil(n_epochs * new / train)``, at least 1 and at most ``n_epochs``; unknown
    ``new_events`` (a parent without the figure) gets ``n_epochs``.
    """
    if new_events is None or train_events <= 0:
        return n_epochs
    share = max(0, new_events) / train_events
    return max(1, min(n_epochs, math.ceil(n_epochs * share - 1e-9)))


class FeatureMismatch(StreamrecError, ValueError):
    """The item features no longer fit the published p-RNN (a warm start is impossible)."""


def new_feature_rows(
    model: RegisteredModel, index: dict[str, int], first_new: int, build: Callable[..., list[Any]]
) -> None:
    """Fill a grown p-RNN's feature buffers for the rows ``first_new:`` (the new items) from
    ``build(index, n_items) -> [FeatureMatrix]``; the old rows stay as they were. Raises
    FeatureMismatch when the features' shapes are not the model's (the feature files changed)."""
    if not isinstance(model, PRNN) or not model.feature_dims:
        return
    dims = list(model.feature_dims)
    n = model.n_items
    feats = build(index, n)
    got = [int(f.dim) for f in feats]
    if got != dims:
        raise FeatureMismatch(
            f"the item features have dims {got}, the published p-RNN was trained on {dims} "
            "(feature files changed?): use --cold"
        )
    with torch.no_grad():
        for i, f in enumerate(feats):
            buf = getattr(model, f"feat_{i}")
            buf[first_new:].copy_(torch.from_numpy(np.asarray(f.values[first_new:])))


def train_hier_warm(
    model_name: str,
    parent: RegisteredModel,
    parent_ids: list[str],
    train_df: pd.DataFrame,
    params: HierParams,
    *,
    variant: str | None = None,
    features: Callable[..., list[Any]] | None = None,
    log: Callable[[str], None] | None = None,
    init_optimizer: dict[str, torch.Tensor] | None = None,
) -> tuple[RegisteredModel, list[str], dict[str, Any], dict[str, Any]]:
    """Warm-start HRNN / p-RNN: grow ``parent`` to the window's items and continue training
    it with ``trainer.hier.train_hier`` (``params``: HRNNParams / PRNNParams; the
    architecture is the parent's), continuing ``init_optimizer`` (the parent's Adagrad state)
    when given. Returns ``(model, item_ids, stats, train_params)``; ``stats`` carries this
    run's optimiser state as ``optimizer_state``."""
    from trainer.hier.loop import train_hier

    if "UserId" not in train_df.columns:
        raise ValueError(f"{model_name} needs a UserId column (none in the archived window)")
    window_ids, _ = build_item_index(train_df["ItemId"])
    item_ids = extend_index(parent_ids, window_ids)
    index = {iid: r for r, iid in enumerate(item_ids)}
    model = grow_model(parent.to("cpu"), len(item_ids), params.seed)
    if isinstance(model, PRNN) and model.feature_dims:
        if features is None:
            raise ValueError("p-RNN warm start needs the item features (--features/--item-meta)")
        new_feature_rows(model, index, len(parent_ids), features)
    stats = train_hier(
        as_trainable(model),
        train_df,
        index,
        params,
        log=log,
        init_optimizer=init_optimizer,
        keep_optimizer=True,
    )
    tp = {**asdict(params), **({"variant": variant} if variant else {})}
    return model, item_ids, stats, tp
