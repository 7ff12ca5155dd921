import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from trainer.batching import session_arrays
from trainer.evaluate import evaluate_next_item, evaluate_sessions
from trainer.metrics import MetricAccumulator


class HistoryModel:
    """Toy step-API model with exact integer scores: the state counts the items seen so far in
    the session (decayed by 2 per step, so order matters) and the scores add a fixed transition
    row of the last item. Anything leaking between sessions or across slots changes the ranks."""

    def __init__(self, n_items: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n_items = n_items
        self.state_dim = n_items
        self.user_state_dim = 0
        self.trans = torch.randint(0, 3, (n_items, n_items), generator=g).double()
        self.device = torch.device("cpu")

    def initial_user_state(self, batch_size: int) -> None:
        return None

    def initial_state(self, user_state: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        assert user_state is None
        return torch.zeros(batch_size, self.n_items, dtype=torch.float64)

    def step(self, item_rows, state, user_state):
        assert item_rows.shape[0] == state.shape[0]
        new = state * 2
        new[torch.arange(len(item_rows)), item_rows] += 1
        return new, new + self.trans[item_rows]

    def end_session(self, user_state, final_state):
        return user_state


def _reference(model: HistoryModel, sessions: list[list[int]], ks, ties: str) -> dict:
    """One session at a time, one event at a time, plain Python ranks."""
    hits = dict.fromkeys(ks, 0.0)
    rr = dict.fromkeys(ks, 0.0)
    n = 0
    for s in sessions:
        state = model.initial_state(None, 1)
        for cur, nxt in itertools.pairwise(s):
            state, scores = model.step(torch.tensor([cur]), state, None)
            row = scores[0].tolist()
            gt = sum(v > row[nxt] for v in row)
            eq = sum(v == row[nxt] for v in row)
            rank = {"standard": gt + 1, "conservative": gt + eq, "median": gt + 1 + (eq - 1) / 2}[
                ties
            ]
            for k in ks:
                if rank <= k:
                    hits[k] += 1
                    rr[k] += 1 / rank
            n += 1
    out = {f"recall@{k}": hits[k] / n for k in ks} | {f"mrr@{k}": rr[k] / n for k in ks}
    return out | {"n_events": n}


def _frame(sessions: list[list[int]], shuffle: bool = True, seed: int = 0) -> pd.DataFrame:
    rows = []
    t = 1000.0
    for j, s in enumerate(sessions):
        for it in s:
            rows.append((f"s{j:03d}", str(it), t))
            t += 1.0
    df = pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time"])
    if shuffle:  # evaluation must not depend on the row order of the frame
        df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return df


def _random_sessions(n: int, n_items: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 12, n)  # includes sessions of length 1 (nothing to predict)
    return [rng.integers(0, n_items, ln).tolist() for ln in lens]


@pytest.mark.parametrize("ties", ["standard", "conservative", "median"])
@pytest.mark.parametrize("batch_size", [1, 4, 512])
def test_batched_equals_one_by_one(ties: str, batch_size: int) -> None:
    n_items = 9
    model = HistoryModel(n_items)
    sessions = _random_sessions(40, n_items, seed=1)
    index = {str(i): i for i in range(n_items)}
    ks = (1, 3, 5)
    got = evaluate_next_item(
        model, _frame(sessions), index, ks=ks, ties=ties, batch_size=batch_size
    )
    ref = _reference(model, sessions, ks, ties)
    assert got["n_events"] == ref["n_events"] == sum(max(len(s) - 1, 0) for s in sessions)
    assert got["n_sessions"] == sum(len(s) >= 2 for s in sessions)
    for key, val in ref.items():
        assert got[key] == pytest.approx(val, abs=1e-12), key


def test_item_index_is_not_identity() -> None:
    # ids map to rows through item_index, not by their numeric value
    n_items = 5
    model = HistoryModel(n_items, seed=3)
    sessions = _random_sessions(15, n_items, seed=2)
    perm = [3, 0, 4, 1, 2]
    index = {f"item{perm[r]}": r for r in range(n_items)}
    df = _frame(sessions)
    df["ItemId"] = df["ItemId"].map(lambda v: f"item{perm[int(v)]}")
    got = evaluate_next_item(model, df, index, ks=(2,), ties="conservative", batch_size=3)
    ref = _reference(model, sessions, (2,), "conservative")
    assert got["recall@2"] == pytest.approx(ref["recall@2"])
    assert got["mrr@2"] == pytest.approx(ref["mrr@2"])


def test_events_are_ordered_by_time_within_session() -> None:
    # the frame lists session s's events out of time order; the model must see a, b, c
    df = pd.DataFrame(
        {"SessionId": ["s", "s", "s"], "ItemId": ["c", "a", "b"], "Time": [3.0, 1.0, 2.0]}
    )
    rows, offsets, ids = session_arrays(df, {"a": 0, "b": 1, "c": 2})
    assert rows.tolist() == [0, 1, 2]
    assert offsets.tolist() == [0, 3]
    assert ids.tolist() == ["s"]


class GRUStepModel(torch.nn.Module):
    """A small real GRU behind the step API (float64 so batching cannot flip near-ties)."""

    def __init__(self, n_items: int, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.n_items, self.state_dim, self.user_state_dim = n_items, hidden, 0
        self.emb = torch.nn.Embedding(n_items, hidden).double()
        self.cell = torch.nn.GRUCell(hidden, hidden).double()
        self.out = torch.nn.Linear(hidden, n_items).double()

    def initial_user_state(self, batch_size):
        return None

    def initial_state(self, user_state, batch_size):
        return torch.zeros(batch_size, self.state_dim, dtype=torch.float64)

    def step(self, item_rows, state, user_state):
        h = self.cell(self.emb(item_rows), state)
        return h, self.out(h)

    def end_session(self, user_state, final_state):
        return user_state


def test_real_gru_batched_matches_batch_of_one_and_restores_training_mode() -> None:
    n_items = 30
    model = GRUStepModel(n_items)
    model.train()
    sessions = _random_sessions(60, n_items, seed=4)
    index = {str(i): i for i in range(n_items)}
    df = _frame(sessions)
    a = evaluate_next_item(model, df, index, ks=(1, 5, 10), batch_size=16)
    b = evaluate_next_item(model, df, index, ks=(1, 5, 10), batch_size=1)
    assert model.training
    assert a == pytest.approx(b, abs=1e-12)
    assert 0.0 <= a["mrr@10"] <= a["recall@10"] <= 1.0


def test_unknown_item_raises() -> None:
    model = HistoryModel(3)
    df = pd.DataFrame(
        {"SessionId": ["s", "s"], "ItemId": ["0", "zz"], "Time": [1.0, 2.0]},
    )
    with pytest.raises(ValueError, match=r"not in the item index.*'zz'"):
        evaluate_next_item(model, df, {"0": 0, "1": 1, "2": 2})


def test_user_states_are_passed_per_session() -> None:
    class UserBias(HistoryModel):
        user_state_dim = 1

        def initial_user_state(self, batch_size):
            return torch.zeros(batch_size, 1, dtype=torch.float64)

        def initial_state(self, user_state, batch_size):
            return torch.zeros(batch_size, self.n_items, dtype=torch.float64)

        def step(self, item_rows, state, user_state):
            # the user state names the item this user always picks next
            scores = torch.zeros(len(item_rows), self.n_items, dtype=torch.float64)
            scores[torch.arange(len(item_rows)), user_state[:, 0].long()] = 1.0
            return state, scores

    model = UserBias(4)
    # session j always continues with item j; two sessions of 3 events
    rows = np.array([0, 0, 0, 1, 1, 1])
    offsets = np.array([0, 3, 6])
    right = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    acc = evaluate_sessions(model, rows, offsets, MetricAccumulator((1,)), user_states=right)
    assert acc.result()["recall@1"] == 1.0
    acc = evaluate_sessions(
        model, rows, offsets, MetricAccumulator((1,)), user_states=right.flip(0)
    )
    assert acc.result()["recall@1"] == 0.0
    # without user states the model falls back to initial_user_state (always item 0)
    acc = evaluate_sessions(model, rows, offsets, MetricAccumulator((1,)))
    assert acc.result()["recall@1"] == 0.5
