"""GRU4Rec model: step API, the embed/hidden_step/score_items split, determinism, learning."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.data.synthetic import generate_clicks
from streamrec.model import MODEL_REGISTRY, build_model
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from trainer.optim import IndexedAdagradM, segment_sum_sorted
from trainer.train import train_gru4rec

CONFIGS = [
    dict(n_items=30, layers=[16]),  # constrained (shared) embedding
    dict(n_items=30, layers=[16, 8], constrained_embedding=False, embedding=12),
    dict(n_items=30, layers=[16, 8], constrained_embedding=False, embedding=0, final_act="tanh"),
    dict(n_items=30, layers=[8], constrained_embedding=False, final_act="elu", elu_param=0.5),
]


def _built(cfg: dict) -> GRU4Rec:
    """A GRU4Rec built through the registry (as checkpoints are), in eval mode."""
    m = build_model("gru4rec", cfg)
    assert isinstance(m, GRU4Rec)
    return m.eval()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_api_shapes_and_unknown_item(cfg: dict) -> None:
    m = _built(cfg)
    assert m.n_items == 30 and m.state_dim == sum(cfg["layers"]) and m.user_state_dim == 0
    assert m.initial_user_state(3) is None
    with torch.inference_mode():
        s0 = m.initial_state(None, 3)
        assert s0.shape == (3, m.state_dim) and not s0.any()
        s1, sc = m.step(torch.tensor([1, 2, 3]), s0, None)
        assert s1.shape == (3, m.state_dim) and sc.shape == (3, 30)
        s2, sc2 = m.step(torch.tensor([4, -1, 5]), s1, None)
        torch.testing.assert_close(s2[1], s1[1], rtol=0, atol=0)  # unknown item: unchanged
        # its scores come from the unchanged state
        ref = m.score_items(s1[1:2, m.state_dim - cfg["layers"][-1] :])
        torch.testing.assert_close(sc2[1:2], ref)
        assert not torch.equal(s2[0], s1[0])
        assert m.end_session(None, s2) is None


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_equals_split(cfg: dict) -> None:
    m = _built(cfg)
    rows = torch.tensor([0, 7, 29])
    with torch.inference_mode():
        state = m.initial_state(None, 3)
        state, _ = m.step(torch.tensor([3, 4, 5]), state, None)
        new_state, scores = m.step(rows, state, None)
        out, hidden = m.hidden_step(m.embed(rows), m.split_state(state))
        torch.testing.assert_close(torch.cat(hidden, 1), new_state)
        torch.testing.assert_close(m.score_items(out), scores)
        sub = torch.tensor([2, 9])
        torch.testing.assert_close(m.score_items(out, sub), scores[:, sub])


def test_train_forward_matches_forward() -> None:
    for cfg in CONFIGS:
        m = _built(cfg)
        x, y = torch.tensor([1, 2]), torch.tensor([3, 4, 5, 3])
        h = m.split_state(torch.rand(2, m.state_dim))
        ref, _ = m(x, h, y)
        got, _, leaves = m.train_forward(x, y, h)
        torch.testing.assert_close(got, ref)
        assert all(leaf.requires_grad for _, _, leaf in leaves)


def test_config_round_trip_and_registry() -> None:
    m = GRU4Rec(GRU4RecConfig(n_items=10, layers=[4, 3], embedding=5, constrained_embedding=False))
    again = MODEL_REGISTRY["gru4rec"].from_config(m.config_dict())
    assert again.config_dict() == m.config_dict()
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", {})
    with pytest.raises(ValueError):
        GRU4RecConfig(n_items=10, final_act="relu")


def test_init_ranges_follow_official() -> None:
    m = GRU4Rec(GRU4RecConfig(n_items=1000, layers=[50]), seed=1)
    bound = np.sqrt(6.0 / (1000 + 50))
    assert m.Wy.abs().max() <= bound and m.Wy.abs().max() > 0.9 * bound
    g0 = m.G[0]
    assert isinstance(g0, torch.nn.GRUCell)
    assert not m.By.any() and not g0.bias_ih.any()
    wih = g0.weight_ih  # each gate block: ±sqrt(6 / (in + out))
    assert wih.abs().max() <= np.sqrt(6.0 / 100)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is much faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("scan", [False, True])
def test_sparse_segment_sum_and_update_match_dense(scan: bool) -> None:
    rows = torch.tensor([3, 1, 3, 0, 3, 1])
    g = torch.randn(6, 4)
    param_rows, state_rows, summed = segment_sum_sorted(rows, g, 5, scan)
    dense = torch.zeros(5, 4).index_add_(0, rows, g)
    got = torch.zeros(5, 4).index_add_(0, param_rows, summed)
    torch.testing.assert_close(got, dense)
    real = state_rows < 5
    assert int(real.sum()) == 3 and sorted(state_rows[real].tolist()) == [0, 1, 3]
    assert not summed[~real].any()
    # sparse Adagrad+momentum on the touched rows == dense Adagrad on the summed gradient
    for mom in (0.0, 0.5):
        p1 = torch.nn.Parameter(torch.ones(5, 4))
        p2 = torch.nn.Parameter(torch.ones(5, 4))
        o1 = IndexedAdagradM([], [p1], lr=0.1, momentum=mom)
        o2 = IndexedAdagradM([p2], [], lr=0.1, momentum=mom)
        for _ in range(2):
            o1.step([(p1, rows, g)])
            p2.grad = dense.clone()
            o2.step()
        torch.testing.assert_close(p1[[0, 1, 3]], p2[[0, 1, 3]])
        torch.testing.assert_close(p1[[2, 4]], torch.ones(2, 4))  # untouched rows


def _split(df: pd.DataFrame, frac: float = 0.8) -> tuple[pd.DataFrame, pd.DataFrame]:
    sid = df["SessionId"].astype(int)
    cut = np.quantile(sid.unique(), frac)
    return df[sid <= cut], df[sid > cut]


SMALL = dict(layers=[32], batch_size=16, n_epochs=1, n_sample=32, learning_rate=0.1, seed=3)


@pytest.mark.slow
def test_determinism_same_seed() -> None:
    df = generate_clicks(n_sessions=300, n_items=50, seed=5)
    m1, ids1, st1 = train_gru4rec(df, dict(SMALL, dropout_p_hidden=0.2), progress=False)
    m2, ids2, st2 = train_gru4rec(df, dict(SMALL, dropout_p_hidden=0.2), progress=False)
    assert ids1 == ids2 and st1["epoch_losses"] == st2["epoch_losses"]
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    m3, _, _ = train_gru4rec(df, dict(SMALL, dropout_p_hidden=0.2, seed=4), progress=False)
    assert not torch.equal(m3.Wy, m1.Wy)


def _recall_mrr(model: GRU4Rec | None, pop: torch.Tensor, test: pd.DataFrame, index: dict) -> tuple:
    """Next-item Recall@20 / MRR@20 (conservative ties) of the model, or POP if model is None."""
    hits, rr, n = 0, 0.0, 0
    for _, g in test.groupby("SessionId", sort=False):
        rows = torch.tensor([index[i] for i in g.sort_values("Time")["ItemId"]])
        state = model.initial_state(None, 1) if model is not None else None
        for a, b in itertools.pairwise(rows):
            if model is not None:
                assert state is not None  # set with the model
                with torch.inference_mode():
                    state, sc = model.step(a.view(1), state, None)
                sc = sc[0]
            else:
                sc = pop
            rank = int((sc >= sc[b]).sum())  # conservative
            n += 1
            if rank <= 20:
                hits += 1
                rr += 1.0 / rank
    return hits / n, rr / n


@pytest.mark.slow
def test_learns_synthetic_structure_better_than_pop() -> None:
    df = generate_clicks(n_sessions=1500, n_items=150, seed=11)
    train, test = _split(df)
    model, item_ids, stats = train_gru4rec(
        train,
        dict(layers=[64], batch_size=32, n_epochs=3, n_sample=64, learning_rate=0.1, logq=1.0),
        progress=False,
    )
    assert stats["epoch_losses"][-1] < stats["epoch_losses"][0]
    index = {i: r for r, i in enumerate(item_ids)}
    test = test[test["ItemId"].isin(index)]
    test = test[test.groupby("SessionId")["ItemId"].transform("size") >= 2].head(1500)
    counts = train["ItemId"].map(index).value_counts()
    pop = torch.zeros(len(item_ids))
    pop[torch.tensor(counts.index.to_numpy())] = torch.tensor(counts.to_numpy(), dtype=torch.float)
    r_m, mrr_m = _recall_mrr(model, pop, test, index)
    r_p, mrr_p = _recall_mrr(None, pop, test, index)
    print(f"GRU4Rec R@20={r_m:.3f} MRR@20={mrr_m:.3f}  POP R@20={r_p:.3f} MRR@20={mrr_p:.3f}")
    assert r_m > r_p + 0.1, (r_m, r_p)
    assert mrr_m > 2 * mrr_p, (mrr_m, mrr_p)


@pytest.mark.gpu
def test_cuda_graph_step_matches_eager_on_gpu() -> None:
    df = generate_clicks(n_sessions=400, n_items=80, seed=6)
    base = dict(SMALL, device="cuda", n_epochs=2)
    m1, _, st1 = train_gru4rec(df, base, progress=False)
    m2, _, st2 = train_gru4rec(df, dict(base, cuda_graph=True), progress=False)
    m3, _, _ = train_gru4rec(df, base, progress=False)
    assert st2["cuda_graph"] and not st1["cuda_graph"]
    for (k, a), b, c in zip(
        m1.state_dict().items(), m2.state_dict().values(), m3.state_dict().values(), strict=True
    ):
        assert torch.equal(a, c), k  # same seed, same device: same result
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
