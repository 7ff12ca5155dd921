"""Session-parallel mini-batches on a tiny hand-made log."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.model.gru4rec import GRU4Rec
from trainer.batching import order_sessions, schedule_sessions, session_parallel_plan
from trainer.train import train_gru4rec

# sessions (ordered by first time, then id): c(4 events) a(3) b(2) e(1: no pairs) d(2)
LOG = pd.DataFrame(
    {
        "SessionId": ["a", "a", "a", "b", "b", "c", "c", "c", "c", "d", "d", "e"],
        "ItemId": ["x", "y", "z", "x", "z", "y", "x", "z", "y", "x", "y", "z"],
        "Time": [1, 2, 3, 1.5, 2, 0.5, 1, 2, 3, 4, 5, 3.5],
    }
)
IDX = {"x": 0, "y": 1, "z": 2}


def test_session_order() -> None:
    s = order_sessions(LOG, IDX)
    assert list(s.session_ids) == ["c", "a", "b", "e", "d"]
    assert s.offsets.tolist() == [0, 4, 7, 9, 10, 12]
    assert s.items.tolist() == [1, 0, 2, 1, 0, 1, 2, 0, 2, 2, 0, 1]


def test_ties_in_first_time_break_by_session_id() -> None:
    df = pd.DataFrame(
        {"SessionId": ["b", "b", "a", "a"], "ItemId": list("xyzx"), "Time": [1, 2, 1, 3]}
    )
    assert list(order_sessions(df, IDX).session_ids) == ["a", "b"]


def test_slots_refill_and_reset_at_boundaries() -> None:
    plan = session_parallel_plan(order_sessions(LOG, IDX), batch_size=2)
    # slot 0: c (y->x, x->z, z->y) then d (x->y); slot 1: a (x->y, y->z) then b (x->z)
    np.testing.assert_array_equal(plan.inputs.T, [[1, 0, 2, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(plan.targets.T, [[0, 2, 1, 1], [1, 2, 2, 0]])
    np.testing.assert_array_equal(plan.reset.T, [[1, 0, 0, 1], [1, 0, 1, 0]])
    np.testing.assert_array_equal(plan.valid.T, [[1, 1, 1, 1], [1, 1, 1, 0]])
    assert plan.n_events == 7 == plan.valid.sum()


def test_every_pair_once() -> None:
    """Every (event, next event) pair of every session is in the plan exactly once."""
    rng = np.random.default_rng(0)
    n = 60
    lengths = rng.integers(1, 8, n)
    total = int(lengths.sum())
    # each event its own item, so a pair of items names one position in one session
    df = pd.DataFrame(
        {
            "SessionId": np.repeat([f"s{i:02d}" for i in range(n)], lengths),
            "ItemId": np.arange(total).astype(str),
            "Time": np.concatenate([np.arange(k) + i for i, k in enumerate(lengths)]).astype(float),
        }
    )
    idx = {str(i): i for i in range(total)}
    s = order_sessions(df, idx)
    plan = session_parallel_plan(s, 7)
    got = Counter(
        (int(a), int(b))
        for a, b in zip(plan.inputs[plan.valid], plan.targets[plan.valid], strict=True)
    )
    expected = Counter(
        (int(a), int(b))
        for _, g in df.groupby("SessionId")
        for a, b in itertools.pairwise(g["ItemId"].astype(int))
    )
    assert got == expected and set(got.values()) == {1}
    assert plan.n_events == int((lengths - 1).sum()) == sum(expected.values())
    # each slot: once reset, its inputs continue the previous step's target inside a session
    for b in range(7):
        for t in range(1, plan.n_steps):
            if plan.valid[t, b] and not plan.reset[t, b]:
                assert plan.inputs[t, b] == plan.targets[t - 1, b]


def test_hidden_state_reset_in_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loop (train_gru4rec itself) hands the model a zero state in exactly the
    slots that start a session, and the carried state everywhere else."""
    seen: list[list[bool]] = []
    real = GRU4Rec.train_forward

    def spy(self: GRU4Rec, x: torch.Tensor, y: torch.Tensor, hidden: list[torch.Tensor]) -> Any:
        seen.append([bool((hidden[0][b] == 0).all()) for b in range(hidden[0].shape[0])])
        return real(self, x, y, hidden)

    monkeypatch.setattr(GRU4Rec, "train_forward", spy)
    # the paper's plan: the session memory's held-out sessions would leave slots out of epoch 1
    params = {"batch_size": 2, "layers": [4], "n_epochs": 2, "n_sample": 0, "device": "cpu"}
    train_gru4rec(LOG, {**params, "session_memory": 0}, progress=False)
    one_epoch = [[True, True], [False, False], [False, True], [True, False]]
    assert seen == one_epoch + one_epoch  # each epoch starts from zero states


def test_one_scheduler_waits_for_a_users_previous_session_only_when_given_users() -> None:
    """``schedule_sessions`` is GRU4Rec's refill order, and with users it never runs two
    sessions of one user at once; when no two sessions share a user the two are the same."""
    rng = np.random.default_rng(1)
    steps = rng.integers(1, 6, 200)
    start, slot = schedule_sessions(steps, 5)
    solo = schedule_sessions(steps, 5, users=np.arange(200))
    np.testing.assert_array_equal(start, solo[0])
    np.testing.assert_array_equal(slot, solo[1])
    # the refill order: each session goes to the slot that frees up first (ties: lowest slot)
    free = [0] * 5
    for j, n in enumerate(steps.tolist()):
        first = min(range(5), key=lambda k: (free[k], k))
        assert (start[j], slot[j]) == (free[first], first)
        free[first] += n
    users = rng.integers(0, 12, 200)
    start, slot = schedule_sessions(steps, 5, users=users)
    assert (start >= 0).all()
    for u in range(12):
        mine = np.flatnonzero(users == u)  # in order: each starts after the previous one ended
        assert (start[mine[1:]] >= start[mine[:-1]] + steps[mine[:-1]]).all()
    for s in range(5):  # a slot runs one session at a time
        held = np.flatnonzero(slot == s)
        held = held[np.argsort(start[held])]
        assert (start[held[1:]] >= start[held[:-1]] + steps[held[:-1]]).all()
