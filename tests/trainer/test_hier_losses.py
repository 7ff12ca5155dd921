"""Every loss trains HRNN and p-RNN (issue #10): cross-entropy with and without logQ, BPR-max,
TOP1-max, BPR and TOP1, each with and without extra samples. Training must lower the loss and
the model must beat POP (computed on the same log) on a log with planted persistent user
tastes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.data.synthetic import generate_clicks
from streamrec.model.hrnn import HRNN
from streamrec.model.items import build_item_index
from streamrec.model.prnn import PRNN
from trainer.data import filter_users, split_last_session_out
from trainer.hier import (
    HRNNParams,
    PopStepModel,
    PRNNParams,
    evaluate_users,
    train_hier,
)

LOSSES: dict[str, dict[str, Any]] = {
    "xe": dict(loss="cross-entropy", logq=0.0),
    "xe-logq": dict(loss="cross-entropy", logq=1.0),
    "bpr-max": dict(loss="bpr-max"),
    "top1-max": dict(loss="top1-max"),
    "bpr": dict(loss="bpr"),
    "top1": dict(loss="top1"),
}
N_TOPICS = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def log() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int], dict[str, float]]:
    df = generate_clicks(
        n_sessions=700, n_items=120, n_users=80, n_topics=N_TOPICS, seed=5,
        user_concentration=0.1, p_user_favourite=0.2, n_user_favourites=5,
    )  # fmt: skip
    df = filter_users(df, min_sessions=3, min_session_length=2, min_item_support=2)
    tr, te = split_last_session_out(df)
    _, idx = build_item_index(tr["ItemId"])
    pop = evaluate_users(PopStepModel.from_log(tr, idx), tr, te, idx, ks=(20,))
    assert pop["n_events"] > 200
    return tr, te, idx, pop


def _check(stats, res, pop) -> None:
    losses = stats["epoch_losses"]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    assert res["recall@20"] > pop["recall@20"] + 0.2, (res, pop)
    assert res["mrr@20"] > 2 * pop["mrr@20"], (res, pop)


@pytest.mark.slow
@pytest.mark.parametrize("n_sample", [0, 32])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_hrnn(log, loss, n_sample):
    tr, te, idx, pop = log
    p = HRNNParams(
        **LOSSES[loss], n_epochs=3, batch_size=32, learning_rate=0.1, n_sample=n_sample,
        layers=[32], user_layers=[32], seed=1, device="cpu",
    )  # fmt: skip
    torch.manual_seed(1)
    m = HRNN(len(idx), variant="init", **p.model_options())
    if loss == "bpr-max":
        assert m.final_act == "elu"  # as GRU4Rec: ELU on the scores for bpr-max
    stats = train_hier(m, tr, idx, p)
    _check(stats, evaluate_users(m, tr, te, idx, ks=(20,)), pop)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["parallel", "concat"])
@pytest.mark.parametrize("n_sample", [0, 32])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_prnn(log, loss, n_sample, arch):
    """p-RNN, parallel and feature-concatenation variants, with the items' topic as feature."""
    tr, te, idx, pop = log
    topic = np.zeros((len(idx), N_TOPICS), dtype=np.float32)
    for item, row in idx.items():
        topic[row, int(item) % N_TOPICS] = 1.0
    p = PRNNParams(
        **LOSSES[loss], n_epochs=3, batch_size=32, learning_rate=0.1, n_sample=n_sample,
        seed=1, device="cpu",
    )  # fmt: skip
    torch.manual_seed(1)
    m = PRNN(
        len(idx), [N_TOPICS], arch=arch, id_hidden=32, feature_hidden=16,
        feature_values=[torch.from_numpy(topic)], final_act=p.resolved_final_act(),
        elu_param=p.resolved_elu_param(),
    )  # fmt: skip
    stats = train_hier(m, tr, idx, p)
    _check(stats, evaluate_users(m, tr, te, idx, ks=(20,)), pop)
