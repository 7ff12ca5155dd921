"""p-RNN: training schedules touch only their subnets; item features from files and metadata;
learning from informative features."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.data.synthetic import generate_clicks
from streamrec.model.api import TrainableStepModel, as_trainable
from streamrec.model.checkpoint import load_checkpoint, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.model.items import build_item_index
from streamrec.model.prnn import PRNN
from trainer.data import split_last_session_out
from trainer.features import (
    build_item_features,
    hashed_tfidf,
    load_feature_file,
    multi_hot,
)
from trainer.hier import (
    HierParams,
    Stage,
    evaluate_users,
    schedule_plan,
    train_hier,
)

# one user, one session of two events: exactly one mini-batch with a target per epoch
ONE_BATCH = pd.DataFrame(
    {"UserId": ["u", "u"], "SessionId": ["s", "s"], "ItemId": ["a", "b"], "Time": [1.0, 2.0]}
)
IDX = {"a": 0, "b": 1, "c": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str = "parallel") -> PRNN:
    torch.manual_seed(0)
    fv = [torch.rand(3, 4), torch.rand(3, 5)]
    return PRNN(3, [4, 5], arch=arch, id_hidden=6, feature_hidden=3, feature_values=fv)


def _snapshot(m: PRNN) -> dict[str, dict[str, torch.Tensor]]:
    return {
        k: {str(i): p.detach().clone() for i, p in enumerate(ps)}
        for k, ps in m.param_groups().items()
    }


def _changed(before, after) -> set[str]:
    return {k for k in before if any(not torch.equal(before[k][i], after[k][i]) for i in before[k])}


def _run(schedule: str, n_epochs: int = 1) -> list[set[str]]:
    m = _model()
    snaps = [_snapshot(m)]
    p = HierParams(
        n_epochs=n_epochs, batch_size=1, learning_rate=0.5, schedule=schedule, n_sample=2
    )

    def on_epoch_end(epoch: int, model: object) -> None:
        assert isinstance(model, PRNN)
        snaps.append(_snapshot(model))

    train_hier(m, ONE_BATCH, IDX, p, on_epoch_end=on_epoch_end)
    return [_changed(a, b) for a, b in itertools.pairwise(snaps)]


def test_param_groups_partition_all_parameters():
    m = _model()
    groups = m.param_groups()
    assert list(groups) == ["id", "f0", "f1"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    assert any(p is m.By.weight for p in groups["id"])  # the bias goes with the id subnet


def test_joint_updates_everything():
    assert _run("joint") == [{"id", "f0", "f1"}]


def test_residual_trains_id_then_features_on_frozen_id():
    assert _run("residual") == [{"id"}, {"f0", "f1"}]
    # during the first phase the feature subnets do not contribute to the scores
    plan = schedule_plan(_model(), "residual", 2)
    assert [s.active for s in plan] == [["id"], ["id"], None, None]


def test_alternating_one_subnet_per_epoch():
    assert _run("alternating") == [{"id"}, {"f0"}, {"f1"}]


def test_interleaving_one_subnet_per_minibatch():
    # one mini-batch per epoch: the cycle continues across epochs
    assert _run("interleaving") == [{"id"}, {"f0"}, {"f1"}]


def test_schedules_stage_hrnns_session_network_and_user_path():
    from streamrec.model.hrnn import HRNN

    plan = schedule_plan(HRNN(3, [4], [4]), "residual", 2)
    assert [(s.train, s.active) for s in plan] == [(["session"], ["session"])] * 2 + [
        (["user"], None)
    ] * 2
    # without a user path HRNN is one part: every schedule is joint
    plan = schedule_plan(HRNN(3, [4], [4], variant="none"), "alternating", 2)
    assert plan == [Stage(train=None, active=None, interleave=False)] * 2


def test_every_epoch_is_labelled_with_its_stage_or_subnet():
    """``--param n_epochs=2`` with the staged schedule runs 2 stages of 2 epochs: the progress
    lines say so (not "epoch 1/4 ... 4/4")."""
    from streamrec.model.hrnn import HRNN

    labels = [s.label for s in schedule_plan(HRNN(3, [4], [4]), "residual", 2)]
    assert labels == [
        "stage 1/2 (session), epoch 1/2",
        "stage 1/2 (session), epoch 2/2",
        "stage 2/2 (user), epoch 1/2",
        "stage 2/2 (user), epoch 2/2",
    ]
    labels = [s.label for s in schedule_plan(_model(), "alternating", 1)]
    assert labels == [
        "epoch 1/3 (subnet id, its epoch 1/1)",
        "epoch 2/3 (subnet f0, its epoch 1/1)",
        "epoch 3/3 (subnet f1, its epoch 1/1)",
    ]
    assert [s.label for s in schedule_plan(_model(), "joint", 2)] == ["epoch 1/2", "epoch 2/2"]


def test_architectures_state_layout_and_unknown_items():
    for arch, dim in (("id", 6), ("feature", 6), ("parallel", 12), ("concat", 6)):
        m = _model(arch).eval()
        assert m.state_dim == dim and m.user_state_dim == 0
        s = torch.randn(2, dim)
        with torch.no_grad():
            new, scores = m.step(torch.tensor([1, -1]), s, None)
        assert scores.shape == (2, 3)
        assert torch.equal(new[1], s[1]) and not torch.equal(new[0], s[0])


def test_subnet_weights_scale_contributions():
    m = _model().eval()
    h = torch.randn(1, 12)
    with torch.no_grad():
        base = m.score_items(h)
        m.set_active(["id"])
        only_id = m.score_items(h)
        m.set_active(None)
        m.w[1:] = 0.0
    assert torch.allclose(m.score_items(h).detach(), only_id)
    assert not torch.allclose(base, only_id)


def test_checkpoint_carries_features(tmp_path):
    m = _model().eval()
    save_checkpoint(tmp_path / "p", m, "prnn", ["a", "b", "c"])
    ck = load_checkpoint(tmp_path / "p")
    assert isinstance(ck.model, PRNN)
    assert torch.equal(ck.model.get_buffer("feat_1"), m.get_buffer("feat_1"))
    with torch.no_grad():
        s = m.initial_state(None, 1)
        assert torch.equal(m.step(torch.tensor([2]), s)[1], ck.model.step(torch.tensor([2]), s)[1])


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("fmt", ["tsv", "csv", "tsv-list", "npz", "parquet"])
def test_features_from_file(tmp_path, fmt):
    ids = ["b", "a", "zz"]  # zz is not in the index; c has no vector
    vec = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    df = pd.DataFrame({"ItemId": ids, "x0": vec[:, 0], "x1": vec[:, 1]})
    if fmt == "tsv":
        path = tmp_path / "f.tsv"
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "csv":
        path = tmp_path / "f.csv.gz"
        df.to_csv(path, index=False)
    elif fmt == "tsv-list":
        path = tmp_path / "f.tsv"
        pd.DataFrame({"ItemId": ids, "vec": ["1 2", "3 4", "5 6"]}).to_csv(
            path, sep="\t", index=False
        )
    elif fmt == "npz":
        path = tmp_path / "f.npz"
        np.savez(path, item_ids=np.array(ids), vectors=vec)
    else:
        path = tmp_path / "f.parquet"
        df.to_parquet(path)
    fm = load_feature_file(path, IDX)
    np.testing.assert_array_equal(fm.values, [[3, 4], [1, 2], [0, 0]])
    np.testing.assert_array_equal(fm.has_features, [True, True, False])
    flagged = fm.with_missing_flag()
    np.testing.assert_array_equal(flagged.values[:, -1], [0, 0, 1])


def test_features_from_metadata(tmp_path):
    meta = pd.DataFrame(
        {
            "ItemId": ["a", "b", "x"],
            "Title": ["Toy Story (1995)", "Story of Heat", "Other"],
            "Genres": ["Animation Comedy", "Action", "Drama"],
        }
    )
    mh = multi_hot(meta, "Genres", IDX)
    assert mh.columns == ["Action", "Animation", "Comedy", "Drama"]
    np.testing.assert_array_equal(mh.values, [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mh.has_features, [True, True, False])
    pipe = multi_hot(meta.assign(Genres=["Animation|Comedy", "Action", "Drama"]), "Genres", IDX)
    np.testing.assert_array_equal(pipe.values, mh.values)
    tf = hashed_tfidf(meta, ["Title"], IDX, n_features=64)
    assert tf.values.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(tf.values[:2], axis=1), 1.0, rtol=1e-5)
    assert (tf.values[2] == 0).all() and not tf.has_features[2]
    # the shared token "story" makes a and b similar; idf weighs it below the unique tokens
    assert 0 < float(tf.values[0] @ tf.values[1]) < 0.9
    path = tmp_path / "items.tsv.gz"
    meta.to_csv(path, sep="\t", index=False)
    fms = build_item_features(IDX, item_meta_path=path, tfidf_dim=32)
    assert [f.dim for f in fms] == [5, 33]  # + the missing flag column


# ----------------------------------------------------------------------------- learning


def test_prnn_beats_pop_with_informative_features():
    n_items, n_topics = 150, 10
    df = generate_clicks(n_sessions=900, n_items=n_items, n_users=90, n_topics=n_topics, seed=3)
    tr, te = split_last_session_out(df)
    ids, idx = build_item_index(tr["ItemId"])
    # informative features: the planted topic of each item (item i is in topic i % n_topics)
    topic = np.zeros((len(ids), n_topics), dtype=np.float32)
    topic[np.arange(len(ids)), np.array([int(i) % n_topics for i in ids])] = 1.0
    m = PRNN(len(ids), [n_topics], arch="parallel", id_hidden=32, feature_hidden=16,
             feature_values=[torch.from_numpy(topic)])  # fmt: skip
    p = HierParams(n_epochs=2, batch_size=32, learning_rate=0.1, n_sample=32, schedule="joint")
    train_hier(m, tr, idx, p)
    res = evaluate_users(m, tr, te, idx)
    counts = torch.bincount(torch.tensor(tr["ItemId"].map(idx).to_numpy()), minlength=len(ids))
    rows = torch.tensor(te["ItemId"].map(idx).to_numpy())
    sess = te["SessionId"].to_numpy()
    nxt = torch.tensor(sess[1:] == sess[:-1])
    pop_ranks = (counts.float().unsqueeze(0) >= counts[rows[1:][nxt]].float().unsqueeze(1)).sum(1)
    pop_r20 = float((pop_ranks <= 20).float().mean())
    assert res["n_events"] == int(nxt.sum())
    assert res["recall@20"] > pop_r20 + 0.1, (res, pop_r20)


def test_trainable_models_are_declared_not_probed():
    """HRNN and p-RNN declare ``TrainableStepModel``: p-RNN trains through the contract's
    default step (``forward_step`` then ``score_items``, every gradient dense), HRNN through its
    own with row-sparse item tables; a model that does not declare it is refused."""
    m = _model().eval()
    assert isinstance(m, TrainableStepModel) and m.sparse_tables() == []
    rows, state = torch.tensor([0, 2]), m.initial_state(None, 2)
    new, scores, leaves = m.train_step(rows, state, None, torch.tensor([1, 2]))
    ref_new, ref_scores = m.step(rows, state, None)
    assert leaves == [] and torch.equal(new, ref_new)
    torch.testing.assert_close(scores, ref_scores[:, [1, 2]])
    from streamrec.model.hrnn import HRNN

    h = HRNN(3, [4], [4])
    assert isinstance(h, TrainableStepModel) and h.sparse_tables()
    assert as_trainable(h) is h
    with pytest.raises(TypeError, match="not a trainable step model"):
        as_trainable(GRU4Rec(GRU4RecConfig(n_items=3, layers=[4])))
