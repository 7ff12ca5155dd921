"""The held-out slice a checkpoint carries for the workers' relative gate.

A worker validates a checkpoint before it serves
(``streamrec.serving.served_model.ServingModel.validate``): with
``data_stats["holdout_sessions"]`` (lists of item ids) and ``metrics["holdout_recall@20"]`` in
the checkpoint, the model's Recall@20 on that slice must reach ``model.gate_ratio`` of the
figure. The trainer writes both: a bounded sample of held-out sessions (known items only) and
the Recall@20 computed on it by the function a worker uses (``streamrec.model.gate.holdout_recall``,
behind ``ServingModel.holdout_recall``), so the two figures differ only by the device a worker
runs on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from streamrec.model.api import StepModule
from streamrec.model.gate import HOLDOUT_KEY, HOLDOUT_METRIC, holdout_recall
from trainer.evaluate import eval_mode, model_device

#: sessions stored (a worker steps each one item by item on every swap)
MAX_SESSIONS = 200
#: events kept per session (its first ones): bounds the checkpoint's metadata
MAX_SESSION_EVENTS = 50


def holdout_slice(
    test: pd.DataFrame,
    item_index: Mapping[str, int],
    max_sessions: int = MAX_SESSIONS,
    max_events: int = MAX_SESSION_EVENTS,
    seed: int = 0,
) -> list[list[str]]:
    """Up to ``max_sessions`` sessions of ``test`` (a seeded sample, in time order), each its
    first ``max_events`` events of items in ``item_index``, with at least 2 events."""
    if len(test) == 0:
        return []
    d = test[["SessionId", "ItemId", "Time"]].copy()
    d["ItemId"] = d["ItemId"].astype(str)
    d = d[d["ItemId"].isin(item_index)]
    d = d.sort_values(["Time"], kind="stable")
    groups = {
        str(s): g["ItemId"].tolist()[:max_events] for s, g in d.groupby("SessionId", sort=False)
    }
    sessions = [items for items in groups.values() if len(items) >= 2]
    if len(sessions) > max_sessions:
        pick = np.sort(np.random.default_rng(seed).choice(len(sessions), max_sessions, False))
        sessions = [sessions[i] for i in pick]
    return sessions


def slice_recall(model: StepModule, item_ids: list[str], sessions: list[list[str]]) -> float:
    """Recall@20 on ``sessions`` computed as a worker computes it, by the same function
    (``streamrec.model.gate.holdout_recall``; NaN without predictions)."""
    index = {iid: r for r, iid in enumerate(item_ids)}
    with eval_mode(model):
        return holdout_recall(model, index, sessions, model_device(model))


def gate_figures(
    model: StepModule, item_ids: list[str], test: pd.DataFrame | None, seed: int = 0
) -> tuple[dict[str, Any], dict[str, float]]:
    """``(data_stats part, metrics part)`` for a checkpoint: the slice and its Recall@20;
    both empty when ``test`` leaves no session of 2 known items."""
    if test is None:
        return {}, {}
    index = {iid: r for r, iid in enumerate(item_ids)}
    sessions = holdout_slice(test, index, seed=seed)
    if not sessions:
        return {}, {}
    recall = slice_recall(model, item_ids, sessions)
    if recall != recall:
        return {}, {}
    return {HOLDOUT_KEY: sessions}, {HOLDOUT_METRIC: recall}
