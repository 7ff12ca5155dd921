import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.data.synthetic import generate_clicks
from trainer.baselines import (
    BPRMF,
    ItemKNN,
    Pop,
    SessionPop,
    build_baseline,
    item_similarities,
    run_baseline,
    sorted_item_rows,
)
from trainer.data import split_by_time

# Toy log. Event counts: A 6 (twice in s5), B 4, C 6, D 1, E 3.
# Co-occurrence (sum over sessions of count_i * count_j):
#   A-B: s1 1 + s2 1 + s5 2*1 = 4;  A-C: s1 + s6 = 2;  A-D: s4 = 1;  B-C: s1 + s3 = 2;  C-E: 3.
TOY = [
    ("s1", "A B C"),
    ("s2", "A B"),
    ("s3", "B C"),
    ("s4", "A D"),
    ("s5", "A B A"),
    ("s6", "A C"),
    ("s7", "C E"),
    ("s8", "C E"),
    ("s9", "C E"),
]


def _frame(sessions: list[tuple[str, str]], t0: float = 0.0) -> pd.DataFrame:
    rows, t = [], t0
    for sid, items in sessions:
        for it in items.split():
            rows.append((sid, it, t))
            t += 1.0
    return pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time"])


def _sim(co: float, si: float, sj: float, lam: float) -> float:
    return co / math.sqrt((si + lam) * (sj + lam))


@pytest.mark.parametrize("lam", [0.0, 20.0])
def test_item_knn_similarities_by_hand(lam: float) -> None:
    df = _frame(TOY)
    index = sorted_item_rows(df)  # A..E -> 0..4
    assert index == {"A": 0, "B": 1, "C": 2, "D": 3, "E": 4}
    rows = df["ItemId"].map(index).to_numpy()
    sess = pd.factorize(df["SessionId"])[0]
    nb, val = item_similarities(rows, sess, 5, n_sims=4, lmbd=lam)
    got_a = dict(zip(nb[0].tolist(), val[0].tolist(), strict=True))
    expected_a = {1: _sim(4, 6, 4, lam), 2: _sim(2, 6, 6, lam), 3: _sim(1, 6, 1, lam)}
    for j, v in expected_a.items():
        assert got_a[j] == pytest.approx(v)
    assert got_a.get(4, 0.0) == 0.0 and got_a.get(0, 0.0) == 0.0  # E never with A; no self
    got_c = dict(zip(nb[2].tolist(), val[2].tolist(), strict=True))
    assert got_c[4] == pytest.approx(_sim(3, 6, 3, lam))
    assert got_c[1] == pytest.approx(_sim(2, 6, 4, lam))
    # similarity is symmetric for alpha = 0.5
    got_b = dict(zip(nb[1].tolist(), val[1].tolist(), strict=True))
    assert got_b[0] == pytest.approx(got_a[1])


def test_regularisation_demotes_the_rare_item() -> None:
    # without lambda, rare D (1 event) outranks C among A's neighbours: 1/sqrt(6) > 2/sqrt(36);
    # with lambda = 20: 1/sqrt(26*21) = 0.0428 < 2/sqrt(26*26) = 0.0769
    df = _frame(TOY)
    index = sorted_item_rows(df)
    rows = df["ItemId"].map(index).to_numpy()
    sess = pd.factorize(df["SessionId"])[0]
    nb0, _ = item_similarities(rows, sess, 5, n_sims=3, lmbd=0.0)
    nb20, val20 = item_similarities(rows, sess, 5, n_sims=2, lmbd=20.0)
    assert nb0[0].tolist() == [1, 3, 2]  # B, D, C
    assert nb20[0].tolist() == [1, 2]  # B, C; D cut by n_sims = 2
    assert val20[0, 0] > val20[0, 1] > 0


def test_item_knn_step_and_run_baseline_on_toy_log() -> None:
    train = _frame(TOY)
    knn = build_baseline("item-knn", train, device="cpu", lmbd=20.0)
    assert isinstance(knn, ItemKNN)
    state = knn.initial_state(None, 2)
    state, scores = knn.step(torch.tensor([0, 2]), state, None)  # last items A and C
    assert scores[0, 1].item() == pytest.approx(_sim(4, 6, 4, 20), rel=1e-6)
    assert scores[0, 4].item() == 0.0 and scores[0, 0].item() == 0.0
    assert scores[1, 4].item() == pytest.approx(_sim(3, 6, 3, 20), rel=1e-6)
    # an unknown item keeps the state (and thus the scores) of the session
    state2, scores2 = knn.step(torch.tensor([-1, -1]), state, None)
    assert torch.equal(state2, state) and torch.equal(scores2, scores)

    # A -> B: B is A's top neighbour (rank 1); C -> E: rank 1; A -> D: rank 3 (after B, C)
    test = _frame([("t1", "A B"), ("t2", "C E"), ("t3", "A D")], t0=100.0)
    out = run_baseline("item-knn", train, test, ks=(1, 5), lmbd=20.0, device="cpu")
    assert out["n_events"] == 3
    assert out["recall@1"] == pytest.approx(2 / 3)
    assert out["mrr@5"] == pytest.approx((1 + 1 + 1 / 3) / 3)


def test_pop_ranks_by_training_counts() -> None:
    train = _frame(TOY)
    pop = build_baseline("pop", train, device="cpu")
    assert isinstance(pop, Pop)
    _, scores = pop.step(torch.tensor([3]), pop.initial_state(None, 1), None)
    assert scores[0].tolist() == [6.0, 4.0, 6.0, 1.0, 3.0]
    # A and C tie on 6: conservative rank 2, standard rank 1
    test = _frame([("t", "D A")], t0=50.0)
    cons = run_baseline("pop", train, test, ks=(1,), ties="conservative", device="cpu")
    std = run_baseline("pop", train, test, ks=(1,), ties="standard", device="cpu")
    assert (cons["recall@1"], std["recall@1"]) == (0.0, 1.0)


def _spop_reference(train: pd.DataFrame, test: pd.DataFrame, k: int) -> float:
    """Official PersonalPop scoring (count in session + pop/(pop+1)), conservative ranks."""
    pop = train["ItemId"].value_counts()
    items = sorted(pop.index)
    base = np.array([pop[i] / (pop[i] + 1) for i in items])
    hits = n = 0
    for _, g in test.sort_values("Time").groupby("SessionId"):
        seq = g["ItemId"].tolist()
        counts: dict[str, int] = {}
        for cur, nxt in itertools.pairwise(seq):
            counts[cur] = counts.get(cur, 0) + 1
            scores = base + np.array([counts.get(i, 0) for i in items])
            rank = int((scores >= scores[items.index(nxt)]).sum())
            hits += rank <= k
            n += 1
    return hits / n


def test_session_pop_matches_the_official_formula() -> None:
    df = generate_clicks(n_sessions=300, n_items=25, n_topics=3, seed=11)
    train, test = split_by_time(df, days=6)
    assert len(test) > 50
    out = run_baseline("s-pop", train, test, ks=(1, 3), device="cpu")
    assert out["recall@1"] == pytest.approx(_spop_reference(train, test, 1))
    assert out["recall@3"] == pytest.approx(_spop_reference(train, test, 3))


def test_session_pop_ring_buffer_forgets_the_oldest_clicks() -> None:
    train = _frame(TOY)
    index = sorted_item_rows(train)
    spop = SessionPop(history=2, device="cpu").fit(train, index)
    state = spop.initial_state(None, 1)
    for item in (3, 3, 4):  # D, D, E
        state, scores = spop.step(torch.tensor([item]), state, None)
    # only the last two clicks (D, E) count: D and E get +1, D's first click forgotten
    assert math.floor(scores[0, 3].item()) == 1 and math.floor(scores[0, 4].item()) == 1
    assert math.floor(scores[0, 0].item()) == 0
    # popularity breaks ties: E (3 events) above D (1 event), A (6) above B (4)
    assert scores[0, 4] > scores[0, 3] and scores[0, 0] > scores[0, 1]


def test_bpr_state_is_the_mean_of_item_vectors_and_is_seeded() -> None:
    train = _frame(TOY)
    index = sorted_item_rows(train)
    a = BPRMF(n_factors=4, n_epochs=3, batch_size=4, seed=5, device="cpu").fit(train, index)
    b = BPRMF(n_factors=4, n_epochs=3, batch_size=4, seed=5, device="cpu").fit(train, index)
    assert torch.equal(a.item_vectors, b.item_vectors)
    state = a.initial_state(None, 1)
    state, _ = a.step(torch.tensor([0]), state, None)
    state, scores = a.step(torch.tensor([2]), state, None)
    mean = (a.item_vectors[0] + a.item_vectors[2]) / 2
    expected = a.item_vectors @ mean + a.item_bias
    assert torch.allclose(scores[0], expected, atol=1e-6)


@pytest.fixture(scope="module")
def synthetic_split() -> tuple[pd.DataFrame, pd.DataFrame]:
    df = generate_clicks(n_sessions=3000, n_items=300, n_topics=10, seed=21)
    train, test = split_by_time(df, days=4)
    return train, test


def test_sequence_baselines_beat_popularity_on_synthetic_data(synthetic_split) -> None:
    train, test = synthetic_split
    pop = run_baseline("pop", train, test, ks=(20,), device="cpu")
    knn = run_baseline("item-knn", train, test, ks=(20,), device="cpu")
    bpr = run_baseline("bpr-mf", train, test, ks=(20,), device="cpu", n_epochs=5, n_factors=32)
    assert pop["n_events"] == knn["n_events"] > 1000
    assert knn["recall@20"] > pop["recall@20"] + 0.2, (knn, pop)
    assert knn["mrr@20"] > 2 * pop["mrr@20"]
    assert bpr["recall@20"] > pop["recall@20"] + 0.1, (bpr, pop)


def test_unknown_baseline_name() -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("gru", _frame(TOY))
