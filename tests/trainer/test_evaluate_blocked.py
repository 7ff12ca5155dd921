"""Evaluation over large catalogues: scored in row blocks of bounded size (the same ranks as
one dense score matrix), and ranked within a retrieval's top-k answer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from streamrec.model import HRNN, PRNN, GRU4Rec
from streamrec.model.ann import AnnIndex, AnnParams
from streamrec.model.retrieval import Retriever
from trainer.evaluate import evaluate_sessions, model_device, ranks_in_topk, step_ranks
from trainer.metrics import MetricAccumulator, ranks

pytestmark = pytest.mark.usefixtures("one_thread")

N = 700


def _models() -> list[Any]:
    torch.manual_seed(0)
    g = GRU4Rec({"n_items": N, "layers": [12]}, seed=0)
    h = HRNN(N, layers=[12], user_layers=[6], user_to_output=True, memory=3)
    p = PRNN(N, [4], arch="parallel", id_hidden=8, feature_hidden=4,
             feature_values=[torch.rand(N, 4)])  # fmt: skip
    with torch.no_grad():
        g.By.normal_(0, 0.5)
        h.By.normal_(0, 0.5)
        h.Wuy.normal_(0, 0.3)
        h.memory_bias.fill_(0.4)
    # the user enters every step (variant "all"): the states too depend on the user
    ha = HRNN(N, layers=[12], user_layers=[6], variant="all", user_to_output=True, memory=3)
    with torch.no_grad():
        ha.By.normal_(0, 0.5)
        first = ha.G[0]
        assert isinstance(first, torch.nn.GRUCell)
        first.weight_ih.normal_(0, 0.5)  # its weights of the user's input start at zero
    return [g.eval(), h.eval(), p.eval(), ha.eval()]


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["gru4rec", "hrnn", "prnn", "hrnn-all"])
def test_blocked_scoring_gives_the_dense_ranks(index: int) -> None:
    model = _models()[index]
    b = 37
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, N, (b,), generator=gen)
    targets = torch.randint(0, N, (b,), generator=gen)
    user = model.initial_user_state(b)
    if isinstance(model, HRNN):  # some remembered items, so the memory offset counts
        user[:, model.user_dim_total :] = torch.randint(0, N, (b, 3), generator=gen).float()
        # and a user who is not the empty one, so a step that drops the user is seen
        user[:, : model.user_dim_total] = torch.rand(b, model.user_dim_total, generator=gen) - 0.5
    state = model.initial_state(user, b)
    with torch.inference_mode():
        new_dense, scores = model.step(rows, state, user)
        dense = ranks(scores, targets, "conservative")
        # room for 5 rows of scores at a time: 8 blocks
        new, blocked = step_ranks(model, rows, state, user, targets, "conservative",
                                  score_bytes=5 * N * 4)  # fmt: skip
    assert torch.equal(new, new_dense)
    assert torch.equal(blocked, dense)


def test_ranks_within_a_topk_answer() -> None:
    values = torch.tensor([[5.0, 4.0, 4.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    top = torch.tensor([[7, 3, 9, 2], [1, 2, 3, 4]])
    targets = torch.tensor([9, 8])  # tied at 2nd/3rd; not in the answer
    assert ranks_in_topk(values, top, targets, "conservative", 1000.0).tolist() == [3.0, 1000.0]
    assert ranks_in_topk(values, top, targets, "standard", 1000.0).tolist() == [2.0, 1000.0]
    assert ranks_in_topk(values, top, targets, "median", 1000.0).tolist() == [2.5, 1000.0]


@pytest.mark.parametrize("ties", ["conservative", "standard", "median"])
def test_ranks_within_a_topk_answer_are_floats_like_the_dense_ranks(ties: str) -> None:
    """Whatever the tie mode, the ranks are float32 as :func:`trainer.metrics.ranks` gives
    them, and a target outside the answer gets ``worst`` exactly (not cut to an integer)."""
    values = torch.tensor([[5.0, 4.0, 4.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    top = torch.tensor([[7, 3, 9, 2], [1, 2, 3, 4]])
    r = ranks_in_topk(values, top, torch.tensor([9, 8]), ties, 4.5)
    dense = ranks(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), ties)
    assert r.dtype == dense.dtype == torch.float32
    assert r[1].item() == 4.5


def _sessions(n_sessions: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    lengths = rng.integers(2, 8, n_sessions)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return rng.integers(0, N, int(offsets[-1])), offsets


def test_evaluation_through_exact_retrieval_matches_full_ranking_up_to_k() -> None:
    model = _models()[0]
    items, offsets = _sessions()
    dense = evaluate_sessions(model, items, offsets, MetricAccumulator((1, 5, 20))).result()
    exact = Retriever(model)
    through = evaluate_sessions(model, items, offsets, MetricAccumulator((1, 5, 20)),
                                retriever=exact).result()  # fmt: skip
    for key in ("recall@1", "recall@5", "recall@20", "mrr@20", "n_events"):
        assert through[key] == pytest.approx(dense[key], abs=1e-12)


def test_evaluation_through_ann_retrieval_costs_little_on_a_small_catalogue() -> None:
    model = _models()[0]
    items, offsets = _sessions()
    dense = evaluate_sessions(model, items, offsets, MetricAccumulator((20,))).result()
    with torch.inference_mode():
        index = AnnIndex.build(model.item_vectors(), AnnParams())
    ann = Retriever(model, mode="ann", index=index)
    got = evaluate_sessions(model, items, offsets, MetricAccumulator((20,)),
                            retriever=ann).result()  # fmt: skip
    assert got["n_events"] == dense["n_events"]
    assert got["recall@20"] == pytest.approx(dense["recall@20"], abs=0.02)


def test_the_device_of_a_step_model_that_is_not_a_module_is_its_device_attribute() -> None:
    class Baseline:
        device = "meta"  # any device but the CPU default

    assert model_device(Baseline()) == torch.device("meta")
    assert model_device(object()) == torch.device("cpu")
