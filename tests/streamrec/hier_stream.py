"""A user-aware click stream and its reference answers, for the HRNN serving tests (the core's
and the worker's through the broker): several sessions per user, every other one closed by an
explicit ``session_end``, the others by the next session's id.

Not a test module: ``tests/streamrec`` is on ``sys.path`` when its tests run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamrec.serving.served_model import ServingModel
from streamrec.testing import click

N_ITEMS = 40


def hier_log() -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[str, bytes]]]:
    """Train/test split (each user's last session held out) and the stream a producer sends:
    every click keyed by its user in event-time order, every other session closed by an
    explicit ``session_end``, the others by the next session's id (or the gap)."""
    from streamrec.data.synthetic import generate_clicks
    from trainer.data import split_last_session_out

    df = generate_clicks(n_sessions=60, n_items=N_ITEMS, n_users=12, seed=3)
    train, test = split_last_session_out(df)
    values: list[tuple[str, bytes]] = []
    ordered = df.sort_values(["Time", "SessionId"], kind="stable").reset_index(drop=True)
    last = ordered.groupby("SessionId")["Time"].transform("max")
    n_session = 0
    for row, t_last in zip(ordered.itertuples(), last, strict=True):
        values.append((row.UserId, click(row.SessionId, row.ItemId, user=row.UserId, t=row.Time)))
        if row.Time == t_last and (n_session := n_session + 1) % 2 == 0:
            end = click(row.SessionId, None, user=row.UserId, t=row.Time, type="session_end")
            values.append((row.UserId, end))
    return train, test, values


def hier_reference(
    model: ServingModel, values: list[tuple[str, bytes]], gap: float, *, user_path: bool = True
) -> list[tuple[list[str], list[float]]]:
    """Top-20 after every click, by the model's step API one click at a time: each user's
    sessions in order, the user state advanced (end_session) whenever a session ends. With
    ``user_path=False`` every session starts from the empty user state instead (what a
    service that loses the user state would answer)."""
    users: dict[str, Any] = {}
    open_: dict[str, tuple[str, Any, float]] = {}
    out: list[tuple[list[str], list[float]]] = []
    for user, value in values:
        ev = json.loads(value)
        u = users.setdefault(user, model.initial_user_states(1))
        cur = open_.get(user)
        ended = cur is not None and (
            ev["type"] == "session_end"
            or cur[0] != ev["session_id"]
            or ev["timestamp"] - cur[2] > gap
        )
        if ended and cur is not None:
            if user_path:
                users[user] = u = model.end_session(u, cur[1])
            del open_[user]
        if ev["type"] == "session_end":
            continue
        state = open_[user][1] if user in open_ else model.initial_states(u, 1)
        o = model.step(model.rows([ev["item_id"]]), state, u if model.user_state_dim else None, 20)
        open_[user] = (ev["session_id"], o.states, ev["timestamp"])
        out.append((model.ids(o.top_rows[0]).tolist(), o.top_scores[0].tolist()))
    return out


def later_session_clicks(values: list[tuple[str, bytes]]) -> list[bool]:
    """Per click of ``values`` (session ends left out): whether it is in a user's second or
    later session, where the user state has been advanced."""
    first_session: dict[str, str] = {}
    out = []
    for user, value in values:
        ev = json.loads(value)
        if ev["type"] == "session_end":
            continue
        out.append(first_session.setdefault(user, ev["session_id"]) != ev["session_id"])
    return out


def user_path_changes_answers(model: ServingModel, values: list[tuple[str, bytes]]) -> float:
    """The share of the clicks in users' later sessions whose top-20 differs between the
    reference and the reference without the user path (a test with a user path that changes
    nothing could not see a bug in it)."""
    with_user = hier_reference(model, values, 1800.0)
    without = hier_reference(model, values, 1800.0, user_path=False)
    later = later_session_clicks(values)
    differ = [a[0] != b[0] for a, b, x in zip(with_user, without, later, strict=True) if x]
    return float(np.mean(differ))


def train_small_hrnn(path: Path) -> Path:
    """An HRNN (``all`` variant, user state to the output, an item memory) trained on the
    training part of :func:`hier_log`, saved as a checkpoint at ``path`` (item ids ``"0"``
    .. ``"39"``): its user path is trained away from zero, so the user state changes the
    scores (an untrained HRNN's user path is zero and scores as a GRU4Rec)."""
    import torch

    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.hrnn import HRNN
    from trainer.hier import HRNNParams, train_hier

    train, _, _ = hier_log()
    ids = [str(j) for j in range(N_ITEMS)]
    torch.manual_seed(11)
    model = HRNN(N_ITEMS, layers=[16], user_layers=[8], variant="all", user_to_output=True,
                 memory=10)  # fmt: skip
    params = HRNNParams(n_epochs=2, batch_size=8, schedule="joint", device="cpu")
    train_hier(model, train, {i: j for j, i in enumerate(ids)}, params)
    return save_checkpoint(path, model.eval(), "hrnn", ids).path
