"""Retrieval: exact top-k (blocked, bf16 shortlist), ANN candidates + exact re-rank, the
index beside the weights (its hash), and ``auto``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamrec.model import HRNN, PRNN, GRU4Rec
from streamrec.model.ann import AnnIndex, AnnIndexError, AnnParams, load_index, load_or_build
from streamrec.model.api import InnerProductScores
from streamrec.model.retrieval import (
    AUTO_ANN_MIN_ITEMS,
    FullScores,
    Retriever,
    choose_retrieval,
    publish_index,
    unique_rows,
)
from streamrec.model.topk import blocked_topk

pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS = 3000


def _gru4rec(n: int = N_ITEMS, seed: int = 0) -> GRU4Rec:
    m = GRU4Rec({"n_items": n, "layers": [16]}, seed=seed)
    with torch.no_grad():
        m.By.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return m.eval()


def _hrnn(memory: int = 0) -> HRNN:
    torch.manual_seed(1)
    m = HRNN(N_ITEMS, layers=[16], user_layers=[8], user_to_output=True, memory=memory)
    with torch.no_grad():
        m.Wuy.normal_(0.0, 0.3)
        m.By.normal_(0.0, 0.3)
    return m.eval()


def _prnn() -> PRNN:
    torch.manual_seed(2)
    feats = [torch.rand(N_ITEMS, 5)]
    return PRNN(
        N_ITEMS, [5], arch="parallel", id_hidden=12, feature_hidden=6, feature_values=feats
    ).eval()


def _full(model: InnerProductScores) -> FullScores:
    """The model's own scores of every item for a state after the step (what ``step`` gives)."""

    def scores(state: torch.Tensor, user: torch.Tensor | None) -> torch.Tensor:
        if isinstance(model, GRU4Rec):
            return model.score_items(model.output(state))
        if isinstance(model, HRNN):
            return model.score_items(model.output(state), user)
        assert isinstance(model, PRNN)
        return model.score_items(state)

    return scores


def _planted_states(model: InnerProductScores, targets: torch.Tensor, dim: int) -> torch.Tensor:
    """States whose output part points along each target's output row: a clear winner."""
    v = model.item_vectors()[targets, :dim]
    return 3.0 * v / v.norm(dim=1, keepdim=True)


def _states(model: InnerProductScores, targets: torch.Tensor) -> torch.Tensor:
    if isinstance(model, GRU4Rec):
        return _planted_states(model, targets, 16)
    if isinstance(model, HRNN):
        return _planted_states(model, targets, 16)
    assert isinstance(model, PRNN)
    return _planted_states(model, targets, model.state_dim)


@pytest.mark.parametrize("metric", ["auto", "ip", "l2-augmented"])
@pytest.mark.parametrize("make", [_gru4rec, _hrnn, _prnn], ids=["gru4rec", "hrnn", "prnn"])
def test_exact_and_ann_agree_on_the_top1_of_clear_cases(
    make: Callable[[], GRU4Rec | HRNN | PRNN], metric: str
) -> None:
    """States pointing along items' output rows, no output bias: where the exact winner leads
    the runner-up by 10 %, the ANN answer has the same winner. (With a random bias as large as
    the products, the inner-product graph misses half of such winners and the L2 reduction
    2 %: bench/results/catalogue-scale.md; on the trained 1M-item model it is the reverse.)"""
    model = make()
    assert isinstance(model, InnerProductScores)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("By", "Wuy")):
                p.zero_()
    targets = torch.arange(0, N_ITEMS, 37)
    states = 20.0 * _states(model, targets)
    users = model.initial_user_state(len(states)) if isinstance(model, HRNN) else None
    full = _full(model)
    with torch.inference_mode():
        exact = Retriever(model, full)
        index = AnnIndex.build(model.item_vectors(), AnnParams(metric=metric))
        ann = Retriever(model, full, mode="ann", index=index)
        values, top_exact = exact.topk(states, users, 20)
        _, top_ann = ann.topk(states, users, 20)
        reference = torch.topk(full(states, users), 20, dim=1).indices
    assert torch.equal(top_exact[:, 0], reference[:, 0])
    clear = values[:, 0] - values[:, 1] > 0.1 * values[:, 0].abs()
    assert int(clear.sum()) >= 10
    assert torch.equal(top_ann[clear, 0], top_exact[clear, 0])


@pytest.mark.parametrize("bias", [0.3, 1.0])
def test_the_automatic_graph_finds_clear_winners_beside_a_large_bias(bias: float) -> None:
    """Output rows of a trained model's size, a bias as large as the products, GRU states at
    their largest norm: on one of the two graphs the inner-product graph misses half the
    clear winners (catalogue-scale.md); ``auto`` must build one that finds them."""
    model = _gru4rec()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.Wy.mul_(10.0)  # |w| ~ 1, as trained rows
        model.By.copy_(bias * torch.randn(model.By.shape, generator=gen))
    targets = torch.arange(0, N_ITEMS, 37)
    states = 4.0 * _planted_states(model, targets, 16) / 3.0  # |h| = 4 = sqrt(16 units)
    with torch.inference_mode():
        values, top_exact = Retriever(model).topk(states, None, 20)
        index = AnnIndex.build(model.item_vectors(), AnnParams())
        _, top_ann = Retriever(model, mode="ann", index=index).topk(states, None, 20)
    clear = values[:, 0] - values[:, 1] > 0.1 * values[:, 0].abs()
    assert int(clear.sum()) >= 10
    assert torch.equal(top_ann[clear, 0], top_exact[clear, 0]), index.meta["metric_probe_recall"]


def test_hrnn_memory_items_are_always_candidates_and_win_when_the_offset_says_so() -> None:
    model = _hrnn(memory=4)
    with torch.no_grad():
        model.memory_bias.fill_(50.0)  # remembered items outrank everything
    states = _planted_states(model, torch.tensor([10, 20]), 16)
    states = torch.cat([states, torch.full((2, 4), -1.0)], dim=1)  # the session's own memory
    users = model.initial_user_state(2)
    # the items each user remembers: the ones the inner product ranks last for its state
    with torch.inference_mode():
        every = torch.arange(N_ITEMS).expand(2, -1)
        worst = model.score_rows(states, None, every).argsort(dim=1)[:, :2]
    users[:, model.user_dim_total :] = torch.cat([worst, torch.full((2, 2), -1)], dim=1).float()
    full = _full(model)
    with torch.inference_mode():
        index = AnnIndex.build(model.item_vectors(), AnnParams(candidates=20))
        ann = Retriever(model, full, mode="ann", index=index, candidates=20)
        extra = torch.tensor([5, 7, -1])
        cands = ann.ann_candidates(states, users, 20, extra)
        _, top = ann.topk(states, users, 20)
        reference = torch.topk(full(states, users), 2, dim=1).indices
    for b in range(2):
        found = set(cands[b].tolist())
        assert set(worst[b].tolist()) <= found  # the memory, though the index never finds it
        assert {5, 7} <= found  # the caller's list (a filter or boost)
        assert set(top[b, :2].tolist()) == set(reference[b].tolist()) == set(worst[b].tolist())


def test_candidates_are_unique() -> None:
    rows = torch.tensor([[3, 1, 3, -1, 1], [0, 0, 0, 2, -1]])
    got = unique_rows(rows)
    for b in range(2):
        kept = [r for r in got[b].tolist() if r >= 0]
        assert sorted(kept) == sorted({r for r in rows[b].tolist() if r >= 0})


def test_an_index_whose_hash_does_not_match_its_weights_is_rebuilt(tmp_path: Path) -> None:
    model = _gru4rec()
    params = AnnParams()
    built = load_or_build(tmp_path, model.item_vectors(), params)
    assert (tmp_path / "retrieval.json").exists()
    assert load_index(tmp_path, model.item_vectors(), params).meta == built.meta  # reused
    with torch.no_grad():
        model.Wy[17] += 0.5  # other weights (one item changed)
    with pytest.raises(AnnIndexError, match="hash"):
        load_index(tmp_path, model.item_vectors(), params)
    rebuilt = load_or_build(tmp_path, model.item_vectors(), params)
    assert rebuilt.meta["vectors_sha256"] != built.meta["vectors_sha256"]
    # the stale file was replaced: the next load finds the index of the new weights
    assert load_index(tmp_path, model.item_vectors(), params).meta == rebuilt.meta
    # and item 17, moved, is found where its new vector is
    q = model.query_vectors(_planted_states(model, torch.tensor([17]), 16), None)
    assert rebuilt.search(q, 5)[0, 0].item() == 17


def test_an_index_built_with_other_settings_is_rebuilt(tmp_path: Path) -> None:
    model = _gru4rec()
    load_or_build(tmp_path, model.item_vectors(), AnnParams(connectivity=8))
    with pytest.raises(AnnIndexError, match="built with"):
        load_index(tmp_path, model.item_vectors(), AnnParams(connectivity=16))
    # a search-time setting is not a reason to rebuild
    load_index(tmp_path, model.item_vectors(), AnnParams(connectivity=8, expansion_search=400))


def test_auto_chooses_as_documented() -> None:
    small, large = _gru4rec(10), _gru4rec(10)
    assert choose_retrieval("auto", AUTO_ANN_MIN_ITEMS - 1, "cpu", small) == "exact"
    assert choose_retrieval("auto", AUTO_ANN_MIN_ITEMS, "cpu", large) == "ann"
    assert choose_retrieval("auto", AUTO_ANN_MIN_ITEMS, "cuda", large) == "exact"  # GPU: exact
    assert choose_retrieval("exact", 10**7, "cpu", large) == "exact"
    assert choose_retrieval("ann", 10, "cpu", small) == "ann"

    class NoSplit(torch.nn.Module):  # a model without the inner-product split
        pass

    assert choose_retrieval("auto", 10**7, "cpu", NoSplit()) == "exact"
    with pytest.raises(ValueError, match="inner-product"):
        choose_retrieval("ann", 10**7, "cpu", NoSplit())
    with pytest.raises(ValueError, match="retrieval must be"):
        choose_retrieval("fast", 10, "cpu", small)


@pytest.mark.parametrize("n", [4096, 5000, 17_319])
def test_blocked_topk_is_torch_topk(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.bfloat16):
        scores = torch.randn(37, n, generator=gen).to(dtype)
        values, rows = blocked_topk(scores, 21)
        ref_values, _ = torch.topk(scores, 21, dim=1)
        assert torch.equal(values, ref_values)
        assert torch.equal(scores.gather(1, rows), values)


@pytest.mark.parametrize("make", [_gru4rec, _hrnn, _prnn], ids=["gru4rec", "hrnn", "prnn"])
def test_bf16_shortlist_gives_the_float32_answer(make: Callable[[], GRU4Rec | HRNN | PRNN]) -> None:
    model = make()
    gen = torch.Generator().manual_seed(5)
    states = torch.randn(200, model.state_dim, generator=gen).tanh()
    users = model.initial_user_state(200) if isinstance(model, HRNN) else None
    full = _full(model)
    with torch.inference_mode():
        reference = torch.topk(full(states, users), 20, dim=1)
        for shortlist in (128, 20):  # 20: most rows cannot be proven and fall back
            r = Retriever(model, full, bf16_shortlist=True, shortlist=shortlist)
            values, rows = r.topk(states, users, 20)
            assert torch.equal(rows, reference.indices)  # the same items, in the same order
            # their float32 scores, from another kernel (bmm, not addmm): the last bit may differ
            torch.testing.assert_close(values, reference.values, rtol=1e-6, atol=1e-6)
    assert r.shortlist_fallbacks > 0  # the float32 pass was exercised


def test_an_index_is_published_beside_the_weights_where_auto_would_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamrec.model.retrieval as retrieval

    model = _gru4rec()
    assert publish_index(tmp_path, model) is None  # 3,000 items: auto serves them exactly
    assert not (tmp_path / "retrieval.json").exists()
    assert publish_index(tmp_path, model, when="never") is None
    monkeypatch.setattr(retrieval, "AUTO_ANN_MIN_ITEMS", N_ITEMS)
    published = publish_index(tmp_path, model)
    assert published is not None
    assert load_index(tmp_path, model.item_vectors(), AnnParams()).meta == published.meta


@pytest.mark.parametrize("n", [4096, 5000, 17_319])
def test_tiled_topk_is_the_untiled_answer(n: int) -> None:
    model = _gru4rec(n)
    gen = torch.Generator().manual_seed(n)
    states = torch.randn(70, 16, generator=gen).tanh()
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            values, rows = model.state_topk(dtype)(states, 21)
            scores = model.state_scorer(dtype, copy=True)(states)
            ref_values, _ = torch.topk(scores, 21, dim=1)
            assert torch.equal(values, ref_values)  # the same elements, to the bit
            assert torch.equal(scores.gather(1, rows), values)
        # and a second call reuses the buffers without leaking the first call's scores
        again, _ = model.state_topk()(states[:5], 21)
        assert torch.equal(again, torch.topk(model.state_scorer()(states[:5]), 21, dim=1)[0])


def test_bf16_shortlist_over_a_tiled_catalogue() -> None:
    model = _gru4rec(9000)
    states = torch.randn(130, 16, generator=torch.Generator().manual_seed(3)).tanh()
    with torch.inference_mode():
        reference = torch.topk(model.score_all(states), 20, dim=1)
        r = Retriever(model, bf16_shortlist=True)
        _, rows = r.topk(states, None, 20)
    assert torch.equal(rows, reference.indices)


def test_a_head_index_answers_exactly_within_the_largest_vectors(tmp_path: Path) -> None:
    """``kind=head``: the candidates are the exact top items among the ``head_items`` largest
    item vectors; an item outside the head is never proposed (but an extra row still is),
    and nothing is written beside the weights."""
    model = _gru4rec()
    v = model.item_vectors()
    head = 600
    params = AnnParams(kind="head", head_items=head)
    with torch.inference_mode():
        index = load_or_build(tmp_path, v, params)
        assert not list(tmp_path.iterdir())  # a sort of the norms: nothing saved
        in_head = torch.zeros(N_ITEMS, dtype=torch.bool)
        in_head[torch.topk(v.norm(dim=1), head).indices] = True
        states = _planted_states(model, torch.arange(0, N_ITEMS, 29), 16)
        q = model.query_vectors(states, None)
        scores = (q @ v.T).masked_fill(~in_head, -float("inf"))
        want = torch.topk(scores, 20, dim=1).indices
        assert torch.equal(index.search(q, 20), want)
        ann = Retriever(model, mode="ann", index=index)
        outside = int((~in_head).nonzero()[0])
        values, top = ann.topk(states, None, 20, extra_rows=torch.tensor([outside]))
        exact = Retriever(model).topk(states, None, 20)
        extra_score = model.score_rows(states, None, torch.full((len(states), 1), outside))
    assert bool(in_head[top[top != outside]].all())
    # the extra row is scored: in the answer exactly where it beats the 20th
    assert torch.equal((top == outside).any(dim=1), extra_score[:, 0] >= values[:, -1])
    # where the exact winner is in the head, both answer it
    winner_in_head = in_head[exact[1][:, 0]]
    assert int(winner_in_head.sum()) >= 10
    assert torch.equal(top[winner_in_head, 0], exact[1][winner_in_head, 0])
    # bf16 head scores, a shortlist re-ranked in float32: the float32 head's answer
    with torch.inference_mode():
        bf16 = AnnIndex.build(v, replace(params, head_dtype="bf16"))
        assert not bf16.exact_order
        values16, top16 = Retriever(model, mode="ann", index=bf16).topk(states, None, 20)
        values32, top32 = Retriever(model, mode="ann", index=index).topk(states, None, 20)
    assert torch.equal(top16[:, 0], top32[:, 0])
    assert torch.allclose(values16, values32)
    with pytest.raises(ValueError, match="head_dtype"):
        AnnIndex.build(v, replace(params, head_dtype="f16"))


def test_an_automatic_graph_setting_reuses_the_graph_it_would_choose_from(tmp_path: Path) -> None:
    """An index built with an explicit ``metric`` is reused by ``metric=auto`` (the default):
    auto only chooses at build; other construction settings still force a rebuild."""
    model = _gru4rec()
    built = load_or_build(tmp_path, model.item_vectors(), AnnParams(metric="ip"))
    again = load_index(tmp_path, model.item_vectors(), AnnParams(metric="auto"))
    assert again.meta == built.meta and again.metric == "ip"
    with pytest.raises(AnnIndexError, match="built with"):
        load_index(tmp_path, model.item_vectors(), AnnParams(metric="l2-augmented"))
    with pytest.raises(AnnIndexError, match="built with"):
        load_index(tmp_path, model.item_vectors(), AnnParams(metric="auto", connectivity=8))


def test_a_hybrid_index_proposes_the_head_and_the_graph_candidates_once(tmp_path: Path) -> None:
    model = _gru4rec()
    v = model.item_vectors()
    params = AnnParams(kind="head+hnsw", head_items=500, metric="ip")
    with torch.inference_mode():
        hybrid = load_or_build(tmp_path, v, params)
        assert (tmp_path / "retrieval.json").exists()  # the graph, saved as a hnsw index
        graph = load_index(tmp_path, v, replace(params, kind="hnsw"))
        head = AnnIndex.build(v, replace(params, kind="head"))
        q = model.query_vectors(_planted_states(model, torch.arange(0, N_ITEMS, 97), 16), None)
        got = hybrid.search(q, 30)
        want = torch.cat([head.search(q, 30), graph.search(q, 30)], dim=1)
    for g, w in zip(got.tolist(), want.tolist(), strict=True):
        kept = [r for r in g if r >= 0]
        assert len(kept) == len(set(kept))
        assert set(kept) == {r for r in w if r >= 0}


def test_gru4rec_session_memory_in_every_retrieval() -> None:
    """GRU4Rec's session memory (in the state): exact, tiled, bf16-shortlist and ANN retrieval
    all carry its offsets; a large offset puts the session's items first whatever the index
    finds, a large negative one puts them last."""
    m = GRU4Rec({"n_items": N_ITEMS, "layers": [16], "session_memory": 8, "memory_gate": True})
    m.eval()
    gen = torch.Generator().manual_seed(3)
    clicks = torch.randint(0, N_ITEMS, (5, 64), generator=gen)
    with torch.inference_mode():
        m.By.normal_(0.0, 0.3, generator=gen)
        state = m.initial_state(None, 64)
        for t in range(5):
            state = m.advance(clicks[t], state)
        remembered = m.offset_rows(None, state)
        assert remembered is not None and remembered.shape == (64, 8)
        index = AnnIndex.build(m.item_vectors(), AnnParams(candidates=20))
        for bias, first in ((50.0, True), (-50.0, False)):
            m.memory_bias.fill_(bias)
            m.memory_gate_weight.normal_(0.0, 0.1, generator=gen)
            reference = torch.topk(m.score_state(state), 20, dim=1)
            exact = Retriever(m).topk(state, None, 20)
            assert torch.equal(exact[1], reference.indices)
            tiled = m.state_topk()(state, 20)
            assert torch.equal(tiled[1], reference.indices)
            short = Retriever(m, bf16_shortlist=True, shortlist=32).topk(state, None, 20)
            assert torch.equal(short[1], reference.indices)
            _, ann = Retriever(m, mode="ann", index=index, candidates=20).topk(state, None, 20)
            rows = m.score_rows(state, None, reference.indices)
            torch.testing.assert_close(rows, reference.values, rtol=1e-5, atol=1e-5)
            for b in range(64):
                mine = {r for r in remembered[b].tolist() if r >= 0}
                if first:
                    assert set(ann[b, : len(mine)].tolist()) == mine
                else:  # last, if the index's candidates leave them in the answer at all
                    assert not set(ann[b, : 20 - len(mine)].tolist()) & mine


@pytest.mark.parametrize(("n", "gate"), [(4096, True), (5000, True), (5000, False)])
def test_tiled_topk_with_a_session_memory_is_the_full_answer(n: int, gate: bool) -> None:
    """Over a tiled catalogue (>= 4096 items) the memory's offsets go into the tiled score
    matrix before its block maxima are taken: the top-k is that of ``state_scorer`` to the bit,
    with offsets that lower a block's best item, raise an item from a weak block, or fall on
    the ragged tail (items 4992-4999 of 5000); rows remember 0 to 8 items (empty slots), in
    two passes of rows."""
    k, slots = 21, 8
    m = GRU4Rec({"n_items": n, "layers": [16], "session_memory": slots, "memory_gate": gate})
    m.eval()
    gen = torch.Generator().manual_seed(n)
    b = 100  # two passes of ROWS_PER_PASS rows
    with torch.inference_mode():
        m.By.normal_(0.0, 0.3, generator=gen)
        hidden = torch.randn(b, 16, generator=gen).tanh()
        plain = m.score_items(hidden)
        best = torch.topk(plain, 4, dim=1).indices  # each row's best items
        weak = torch.topk(-plain, 2, dim=1).indices  # and worst ones
        tail = torch.randint(n - n % 64 if n % 64 else n - 8, n, (b, 2), generator=gen)
        items = torch.cat([weak, tail, best], dim=1)  # the best are the most recent
        memory = torch.zeros(b, slots)
        for row in range(b):
            filled = row % (slots + 1)  # 0 (an empty memory) to all 8 slots
            mine = list(dict.fromkeys(items[row].tolist()))[-filled:] if filled else []
            if mine:
                memory[row, slots - len(mine) :] = torch.tensor(mine, dtype=torch.float32) + 1
        states = torch.cat([hidden, memory], dim=1)
        for bias in (-5.0, 5.0):
            m.memory_bias.fill_(bias)
            if gate:
                m.memory_gate_weight.normal_(0.0, 0.5, generator=gen)
            for dtype in (torch.float32, torch.bfloat16):
                values, rows = m.state_topk(dtype)(states, k)
                scores = m.state_scorer(dtype, copy=True)(states)
                assert torch.equal(values, torch.topk(scores, k, dim=1).values)
                assert torch.equal(scores.gather(1, rows), values)
            # the scores of every path are the model's own (score_state)
            frozen = m.state_scorer(torch.float32, copy=True)
            assert torch.equal(frozen(states), m.score_state(states))
        # an empty memory in every row: the paper's top-k
        values, _ = m.state_topk()(torch.cat([hidden, torch.zeros(b, slots)], dim=1), k)
        assert torch.equal(values, torch.topk(plain, k, dim=1).values)


@pytest.mark.parametrize("n", [4096, 5000])
def test_a_few_rows_take_whole_score_rows_with_the_tiled_answer(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to ``WHOLE_ROWS_MAX`` rows the tiled top-k writes every tile first, then adds the
    memory's offsets in one scatter (every slot: an empty one into a spare column) and takes
    all block maxima at once: the same rows and values, to the bit, as the tile-by-tile pass
    at the same batch size (and the full score matrix's up to its last bit), with ties (a
    good item's copy in its own block, in another tile, on the ragged tail; a remembered copy
    whose offset is 0), memories from empty to full, rows whose offsets move items across
    blocks."""
    import streamrec.model.topk as topk_module

    k, slots, b = 21, 8, 27
    m = GRU4Rec({"n_items": n, "layers": [16], "session_memory": slots, "memory_gate": True})
    m.eval()
    gen = torch.Generator().manual_seed(n + 1)
    with torch.inference_mode():
        m.By.normal_(0.0, 0.3, generator=gen)
        hidden = torch.randn(b, 16, generator=gen).tanh()
        best = torch.topk(m.score_items(hidden), 4, dim=1).indices
        weak = torch.topk(-m.score_items(hidden), 2, dim=1).indices
        top = [int(best[row, 0]) for row in range(3)]
        for row, dst in enumerate((top[0] ^ 1, (top[1] + 2048) % n, n - 1)):
            m.Wy[dst] = m.Wy[best[row, 0]]  # an item scored as a row's best: a tie
            m.By[dst] = m.By[best[row, 0]]
        # slot groups 3 2 2 2 2 1 1 0: the newest item's offset is 0 (its tie stays)
        m.memory_bias.copy_(torch.tensor([0.0, 1.5, -4.0, 3.0]))
        m.memory_gate_weight.normal_(0.0, 0.5, generator=gen)
        m.memory_gate_weight[:, 0] = 0.0
        items = torch.cat([weak, best[:, 1:], best[:, :1]], dim=1)  # a row's best the newest
        memory = torch.zeros(b, slots)
        for row in range(b):
            filled = (row + 1) % (slots + 1)  # 1 to 8 slots, and empty memories
            mine = list(dict.fromkeys(items[row].tolist()))[-filled:] if filled else []
            if mine:
                memory[row, slots - len(mine) :] = torch.tensor(mine, dtype=torch.float32) + 1
        states = torch.cat([hidden, memory], dim=1)
        for dtype in (torch.float32, torch.bfloat16):
            topk = m.state_topk(dtype)
            scores = m.state_scorer(dtype, copy=True)(states)
            for size in (1, 3, topk_module.WHOLE_ROWS_MAX):
                parts = [states[lo : lo + size] for lo in range(0, b, size)]
                assert all(len(p) <= topk_module.WHOLE_ROWS_MAX for p in parts)
                whole = [topk(p, k) for p in parts]
                with monkeypatch.context() as patch:
                    patch.setattr(topk_module, "WHOLE_ROWS_MAX", 0)  # tile by tile
                    tiled = [topk(p, k) for p in parts]
                for (wv, wr), (tv, tr) in zip(whole, tiled, strict=True):
                    assert torch.equal(wv, tv) and torch.equal(wr, tr)
                # the full matrix's addmm may differ from a tile's in the last bit (one row)
                values = torch.cat([v for v, _ in whole])
                torch.testing.assert_close(values, torch.topk(scores, k, dim=1).values)
                rows = torch.cat([r for _, r in whole])
                torch.testing.assert_close(scores.gather(1, rows), values)
            ties = values[:, 1:] == values[:, :-1]
            assert bool(ties[:3].any(dim=1).all())  # the planted copies tie in the answers
