"""GRU4Rec's session memory: the last K distinct items of the session and their score offsets."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from streamrec.model import build_model
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig, push_recent, recency_groups

BASES: list[dict[str, Any]] = [
    dict(n_items=30, layers=[8]),
    dict(n_items=30, layers=[8, 6], constrained_embedding=False, embedding=5),
    dict(n_items=30, layers=[8], constrained_embedding=False, embedding=0, final_act="tanh"),
]


def _memory_model(base: dict[str, Any], k: int, gate: bool, seed: int = 1) -> GRU4Rec:
    """A model with memory whose offset weights are random (they start at zero)."""
    m = GRU4Rec(GRU4RecConfig(**base, session_memory=k, memory_gate=gate), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.memory_bias.copy_(torch.randn(m.memory_bias.shape, generator=gen))
        if gate:
            m.memory_gate_weight.copy_(torch.randn(m.memory_gate_weight.shape, generator=gen))
    return m.eval()


def _reference_scores(m: GRU4Rec, state: torch.Tensor) -> torch.Tensor:
    """Scores from the definition: the paper's scores, then each remembered item's offset by
    its recency position (1 = newest), group floor(log2(position)), loop by loop."""
    out = m.output(state)
    raw = torch.addmm(m.By.view(1, -1), out, m.Wy.t())
    memory = m.memory_of(state)
    k = memory.shape[1]
    for b in range(state.shape[0]):
        for slot in range(k):
            row = int(memory[b, slot]) - 1
            if row < 0:
                continue
            group = int(math.log2(k - slot))
            offset = m.memory_bias[group]
            if m.config.memory_gate:
                offset = offset + out[b] @ m.memory_gate_weight[:, group]
            raw[b, row] += offset
    return m.final_activation(raw)


def test_recency_groups_are_powers_of_two() -> None:
    assert recency_groups(10).tolist() == [3, 3, 3, 2, 2, 2, 2, 1, 1, 0]
    assert recency_groups(1).tolist() == [0]


def test_push_recent_moves_a_repeat_to_the_end_and_drops_the_oldest() -> None:
    memory = torch.zeros(1, 4)
    seen = []
    for row in [4, 5, 4, 6, 7, 5, 8, 8]:
        memory = push_recent(memory, torch.tensor([row]))
        seen.append([int(x) - 1 for x in memory[0]])
    assert seen == [
        [-1, -1, -1, 4],
        [-1, -1, 4, 5],
        [-1, -1, 5, 4],  # 4 again: it moves to the newest place
        [-1, 5, 4, 6],
        [5, 4, 6, 7],
        [4, 6, 7, 5],  # 5 again, the memory full: no item is lost
        [6, 7, 5, 8],  # a new item: the oldest (4) is dropped
        [6, 7, 5, 8],
    ]
    # an unknown item (row < 0) leaves the memory as it is
    torch.testing.assert_close(push_recent(memory, torch.tensor([-1])), memory, rtol=0, atol=0)


def test_the_memory_of_a_step_is_the_definitions_for_every_click() -> None:
    """``advance`` (the serving step's memory, a gather) and ``push_recent``: the last K
    distinct items, newest last, against a list kept by hand; random sessions of a small
    catalogue (many repeats, full memories) and unknown items (row < 0: the state stays)."""
    k, n = 6, 9
    m = _memory_model(dict(n_items=n, layers=[8]), k=k, gate=True)
    gen = torch.Generator().manual_seed(5)
    clicks = torch.randint(-1, n, (40, 16), generator=gen)
    clicks[clicks.eq(-1) & (torch.rand(clicks.shape, generator=gen) < 0.5)] = -3
    lists: list[list[int]] = [[] for _ in range(16)]
    with torch.inference_mode():
        state = m.initial_state(None, 16)
        for t in range(clicks.shape[0]):
            new = m.advance(clicks[t], state)
            pushed = push_recent(m.memory_of(state), clicks[t])
            for b, row in enumerate(clicks[t].tolist()):
                if row >= 0:
                    lists[b] = [*[x for x in lists[b] if x != row][-(k - 1) :], row]
                want = [-1] * (k - len(lists[b])) + lists[b]
                assert [int(x) - 1 for x in m.memory_of(new)[b]] == want
                assert [int(x) - 1 for x in pushed[b]] == want
                if row < 0:
                    assert torch.equal(new[b], state[b])
            state = new
    assert min(len(x) for x in lists) == k  # every memory filled, then shifted


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("base", BASES)
def test_step_adds_the_offset_of_each_remembered_item(base: dict[str, Any], gate: bool) -> None:
    m = _memory_model(base, k=5, gate=gate)
    assert m.state_dim == sum(base["layers"]) + 5 and m.state_sizes == [*base["layers"], 5]
    sessions = torch.tensor(
        [[1, 5, 1, 2, 3, 5, 3, 9], [1, 4, -1, 3, 3, 0, 7, 1], [5, 3, 2, 1, 5, 2, 2, 4]]
    )
    with torch.inference_mode():
        state = m.initial_state(None, 3)
        assert not state.any()  # an all-zero state is an empty memory
        for t in range(sessions.shape[1]):
            new, scores = m.step(sessions[:, t], state, None)
            torch.testing.assert_close(scores, _reference_scores(m, new))
            # split step: advance then the state scorer, as the workers run it
            torch.testing.assert_close(m.advance(sessions[:, t], state), new, rtol=0, atol=0)
            torch.testing.assert_close(m.state_scorer()(new), scores, rtol=0, atol=0)
            torch.testing.assert_close(m.state_scorer(copy=True)(new), scores)
            state = new
        assert int((m.memory_of(state)[1] > 0).sum()) == 5  # 1 4 3 0 7: five distinct


@pytest.mark.parametrize("gate", [False, True])
def test_forward_scores_a_subset_as_the_step(gate: bool) -> None:
    m = _memory_model(BASES[0], k=4, gate=gate)
    rows = torch.tensor([0, 3, 5, 2, 29, 1, 5])  # a few items, one twice
    with torch.no_grad():
        state = m.initial_state(None, 3)
        for x in ([1, 2, 3], [3, 2, 0], [5, 5, 1]):
            items = torch.tensor(x)
            new, full = m.step(items, state, None)
            sub, hidden = m(items, m.split_state(state), rows)
            torch.testing.assert_close(sub, full[:, rows])
            torch.testing.assert_close(torch.cat(hidden, 1), new, rtol=0, atol=0)
            state = new


def test_training_forward_is_the_papers() -> None:
    """The memory takes no part in training: the sampled scores are those of the same network
    without memory, whatever the offsets (the head is fitted apart, trainer.memory_head)."""
    m = _memory_model(BASES[0], k=4, gate=True)
    paper = GRU4Rec(GRU4RecConfig(**BASES[0]), seed=1)
    paper.load_state_dict(
        {k: v for k, v in m.state_dict().items() if not k.startswith("memory_")}, strict=True
    )
    x, y = torch.tensor([1, 2]), torch.tensor([3, 4, 1, 3])
    h = [torch.rand(2, 8)]
    got, new, leaves = m.train_forward(x, y, h)
    ref, ref_new, _ = paper.train_forward(x, y, h)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(new[0], ref_new[0], rtol=0, atol=0)
    assert all(t is not m.memory_bias for t, _, _ in leaves)


def test_memory_starts_silent_the_paper_scores() -> None:
    """Zero offset weights: the same scores as the model without memory, same seed."""
    for base in BASES:
        paper = GRU4Rec(GRU4RecConfig(**base), seed=3).eval()
        m = GRU4Rec(GRU4RecConfig(**base, session_memory=8, memory_gate=True), seed=3).eval()
        with torch.inference_mode():
            s_paper, s_mem = paper.initial_state(None, 2), m.initial_state(None, 2)
            for x in ([1, 2], [2, 2], [7, 1]):
                s_paper, a = paper.step(torch.tensor(x), s_paper, None)
                s_mem, b = m.step(torch.tensor(x), s_mem, None)
                torch.testing.assert_close(b, a, rtol=0, atol=0)
                torch.testing.assert_close(s_mem[:, : paper.state_dim], s_paper, rtol=0, atol=0)


def test_a_config_without_memory_is_the_paper_model() -> None:
    """Checkpoints written before the memory existed carry no ``session_memory``: they build
    the paper's model, with the same tensor names."""
    old = {"n_items": 10, "layers": [4], "embedding": 0, "constrained_embedding": True}
    m = build_model("gru4rec", old)
    assert isinstance(m, GRU4Rec) and m.memory == 0 and m.state_dim == 4
    assert set(m.state_dict()) == {"G.0.weight_ih", "G.0.weight_hh", "G.0.bias_ih"} | {
        "G.0.bias_hh",
        "Wy",
        "By",
    }
    with pytest.raises(ValueError, match="session_memory"):
        GRU4RecConfig(n_items=10, session_memory=-1)
