"""Fitting the session-memory head on held-out sessions (trainer.memory_head)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from trainer.batching import SessionArrays
from trainer.memory_head import collect, fit_head, smooth_reciprocal_rank, split_holdout


def _sessions(seqs: list[list[int]]) -> SessionArrays:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    items = np.array([i for s in seqs for i in s], dtype=np.int64)
    return SessionArrays(items, offsets, np.array([f"s{k}" for k in range(len(seqs))], object))


def _model(k: int = 4, gate: bool = True, n_items: int = 40) -> GRU4Rec:
    return GRU4Rec(
        GRU4RecConfig(n_items=n_items, layers=[8], session_memory=k, memory_gate=gate), seed=2
    ).eval()


def _mrr(model: GRU4Rec, s: SessionArrays) -> float:
    """Exact mean reciprocal rank (conservative ties) of every next item, session by session."""
    rr = []
    with torch.no_grad():
        for j in range(len(s.offsets) - 1):
            seq = s.items[s.offsets[j] : s.offsets[j + 1]]
            state = model.initial_state(None, 1)
            for a, b in itertools.pairwise(seq):
                state, scores = model.step(torch.tensor([a]), state, None)
                rr.append(1.0 / float((scores[0] >= scores[0, b]).sum()))
    return float(np.mean(rr))


def test_split_holdout_partitions_the_sessions_in_order() -> None:
    s = _sessions([[k, k + 1, k + 2][: 2 + k % 2] for k in range(200)])
    kept, held = split_holdout(s, 0.25, seed=3)
    assert 30 < len(held.session_ids) < 70
    assert sorted([*kept.session_ids, *held.session_ids], key=lambda x: int(x[1:])) == list(
        s.session_ids
    )
    for part in (kept, held):  # each session's items as they were, in the original order
        ks = [int(x[1:]) for x in part.session_ids]
        assert ks == sorted(ks)
        for j, k in enumerate(ks):
            got = part.items[part.offsets[j] : part.offsets[j + 1]]
            np.testing.assert_array_equal(got, s.items[s.offsets[k] : s.offsets[k + 1]])
    again = split_holdout(s, 0.25, seed=3)[1]
    assert list(again.session_ids) == list(held.session_ids)


def test_collect_keeps_each_prediction_as_the_step_scores_it() -> None:
    m = _model()
    s = _sessions([[1, 2, 1, 3], [4, 4], [5, 6, 7, 5, 6], [9]])
    data = collect(m, s, top=5)
    assert len(data) == 3 + 1 + 4  # every next item; the one-click session predicts nothing
    # the longest session comes first; its predictions are the first rows of each step
    seq = [5, 6, 7, 5, 6]
    state = m.initial_state(None, 1)
    rows_of_seq = [0, 3, 5, 7]  # chunk order: steps of [5..], [1..], [4, 4] interleaved
    with torch.no_grad():
        for t, row in enumerate(rows_of_seq):
            state = m.advance(torch.tensor([seq[t]]), state)
            raw = torch.addmm(m.By.view(1, -1), m.output(state), m.Wy.t())[0]
            assert float(data.target_score[row]) == pytest.approx(float(raw[seq[t + 1]]), abs=1e-6)
            remembered = (m.memory_of(state)[0] - 1).long().tolist()
            slot = int(data.target_slot[row])
            assert (slot >= 0) == (seq[t + 1] in remembered)
            if slot >= 0:
                assert remembered[slot] == seq[t + 1]
            assert int(data.filled[row].sum()) == len({*seq[: t + 1]})
            others = raw.clone()
            others[[r for r in remembered if r >= 0]] = -torch.inf
            torch.testing.assert_close(
                data.top_other[row], torch.topk(others, 5).values, atol=1e-6, rtol=0
            )


@pytest.mark.parametrize("repeat", [True, False])
def test_fit_head_learns_whether_items_come_back(repeat: bool) -> None:
    """Sessions that click their current item again (repeat) or never revisit an item: the
    fitted newest-group offset rises or falls, and the exact MRR improves."""
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(120):
        if repeat:
            first = rng.choice(30, 3, replace=False)
            seqs.append([int(first[0]), int(first[0]), int(first[1]), int(first[1]), int(first[2])])
        else:
            seqs.append([int(x) for x in rng.choice(12, 5, replace=False)])
    s = _sessions(seqs)
    m = _model(n_items=30)
    paper = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("memory_")}
    before = _mrr(m, s)
    data = collect(m, s)
    fit = fit_head(m, data, steps=150)
    assert fit.reciprocal_rank_after > fit.reciprocal_rank_before
    newest = float(m.memory_bias[0].detach())
    assert newest > 0 if repeat else newest < 0
    assert _mrr(m, s) > before
    for k, v in m.state_dict().items():  # only the head changed
        if not k.startswith("memory_"):
            torch.testing.assert_close(v, paper[k], rtol=0, atol=0)
    assert all(p.requires_grad for p in m.parameters())


def test_smooth_reciprocal_rank_tends_to_the_exact_one() -> None:
    """With every other item among the columns and a small temperature, the smooth value is
    the exact mean reciprocal rank (random scores: no ties)."""
    m = _model(n_items=20)
    with torch.no_grad():
        m.memory_bias.copy_(torch.tensor([1.0, -0.5, 0.3]))
    s = _sessions([[1, 2, 1, 3, 4], [5, 6, 7, 5], [8, 9]])
    data = collect(m, s, top=20)
    smooth = float(smooth_reciprocal_rank(m, data, 1e-4).detach())
    assert smooth == pytest.approx(_mrr(m, s), abs=1e-4)


def test_fit_head_needs_a_memory() -> None:
    m = _model()
    data = collect(m, _sessions([[1, 2, 3]]))
    with pytest.raises(ValueError, match="session_memory"):
        fit_head(GRU4Rec(GRU4RecConfig(n_items=40, layers=[8])), data)
    with pytest.raises(ValueError, match="held-out"):
        collect(m, _sessions([[1], [2]]))
