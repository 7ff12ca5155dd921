"""HRNN's item memory (``memory`` > 0): the user's last distinct items of earlier sessions and
a learnt score offset for them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.model.checkpoint import load_checkpoint, save_checkpoint
from streamrec.model.hrnn import HRNN, merge_distinct, push_distinct
from streamrec.model.items import build_item_index
from trainer.hier import HRNNParams, train_hier

pytestmark = pytest.mark.usefixtures("one_thread")


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_push_distinct_appends_new_known_rows_and_drops_the_oldest():
    mem = _t([[-1, -1, -1], [1, 2, 3], [1, 2, 3], [-1, 4, 5]])
    out = push_distinct(mem, torch.tensor([5, 2, 9, -1]))
    # new row appended; already remembered: unchanged; full: oldest dropped; unknown: unchanged
    assert out.tolist() == [[-1, -1, 5], [1, 2, 3], [2, 3, 9], [-1, 4, 5]]


def test_merge_distinct_keeps_the_last_k_distinct_items_newest_last():
    older = _t([[1, 2, 3], [-1, -1, 7], [-1, -1, -1], [4, 5, 6]])
    newer = _t([[-1, 3, 4], [-1, -1, 8], [-1, -1, -1], [-1, -1, -1]])
    # a row in both counts at its newer place; empty slots are dropped, then -1 fills the front
    assert merge_distinct(older, newer).tolist() == [
        [2, 3, 4],
        [-1, 7, 8],
        [-1, -1, -1],
        [4, 5, 6],
    ]


def _model(memory: int, seed: int = 0) -> HRNN:
    torch.manual_seed(seed)
    return HRNN(12, layers=[6], user_layers=[5], variant="init", memory=memory).eval()


def test_memory_follows_the_session_into_the_user_state_and_offsets_only_those_items():
    m = _model(memory=3)
    assert m.state_dim == 6 + 3 and m.user_state_dim == 5 + 3
    with torch.no_grad():
        user = m.initial_user_state(1)
        assert user[0, 5:].tolist() == [-1, -1, -1]
        state = m.initial_state(user, 1)
        for item in (4, 7, 4, -1, 9, 2):  # a repeat and an unknown are not remembered twice
            state, _ = m.step(torch.tensor([item]), state, user)
        assert state[0, 6:].tolist() == [7, 9, 2]  # the last three distinct, 4 dropped
        user = m.end_session(user, state)
        assert user[0, 5:].tolist() == [7, 9, 2]
        nxt = m.initial_state(user, 1)
        assert nxt[0, 6:].tolist() == [-1, -1, -1]  # a new session starts with an empty memory
        _, at_zero = m.step(torch.tensor([1]), nxt, user)
        m.memory_bias.fill_(-3.0)
        _, offset = m.step(torch.tensor([1]), nxt, user)
    diff = (offset - at_zero)[0]
    remembered = torch.zeros(12, dtype=torch.bool)
    remembered[[7, 9, 2]] = True
    assert torch.allclose(diff[remembered], torch.full((3,), -3.0))
    assert torch.equal(diff[~remembered], torch.zeros(9))


def test_memory_is_silent_at_init_and_survives_a_checkpoint(tmp_path):
    """memory_bias starts at 0: the scores are those of the same model without a memory."""
    plain, with_mem = _model(memory=0), _model(memory=4)
    with_mem.load_state_dict(plain.state_dict(), strict=False)
    rows = [torch.tensor([3, 5]), torch.tensor([5, -1]), torch.tensor([8, 1])]
    with torch.no_grad():
        u0, u1 = plain.initial_user_state(2), with_mem.initial_user_state(2)
        s0, s1 = plain.initial_state(u0, 2), with_mem.initial_state(u1, 2)
        for r in rows:
            s0, a = plain.step(r, s0, u0)
            s1, b = with_mem.step(r, s1, u1)
            assert torch.allclose(a, b)
        u1 = with_mem.end_session(u1, s1)
        _, b = with_mem.step(rows[0], with_mem.initial_state(u1, 2), u1)
        with_mem.memory_bias.fill_(1.5)
    path = tmp_path / "ckpt"
    save_checkpoint(path, with_mem, "hrnn", [str(i) for i in range(12)])
    loaded = load_checkpoint(path).model
    assert isinstance(loaded, HRNN) and loaded.config_dict()["memory"] == 4
    assert float(loaded.memory_bias.detach()) == 1.5
    # a checkpoint written before the option existed has no "memory": none, as before
    cfg = with_mem.config_dict()
    del cfg["memory"]
    assert HRNN.from_config(cfg).user_state_dim == 5


def _log(repeat: bool, seed: int = 0) -> pd.DataFrame:
    """40 users with 4 sessions of 5 clicks. ``repeat``: every session draws from the user's
    own 6 items; otherwise the user never clicks an item twice."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(40):
        pool = rng.choice(60, size=6 if repeat else 20, replace=False)
        for s in range(4):
            items = rng.choice(pool, 5) if repeat else pool[s * 5 : s * 5 + 5]
            for e, it in enumerate(items):
                rows.append((f"u{u}", f"u{u}s{s}", str(it), 1000.0 * u + 100.0 * s + e))
    return pd.DataFrame(rows, columns=["UserId", "SessionId", "ItemId", "Time"])


@pytest.mark.parametrize("repeat", [True, False])
def test_memory_bias_learns_whether_a_users_items_come_back(repeat):
    df = _log(repeat)
    _, idx = build_item_index(df["ItemId"])
    p = HRNNParams(
        n_epochs=3, batch_size=8, n_sample=16, layers=[16], user_layers=[8], memory=10, seed=1
    )
    torch.manual_seed(1)
    m = HRNN(len(idx), variant="init", **p.model_options())
    train_hier(m, df, idx, p)
    bias = float(m.memory_bias.detach())
    assert bias > 0.2 if repeat else bias < -0.2, bias
