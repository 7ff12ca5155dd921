"""``trainer train`` options of the hierarchical and parallel models, end to end through the
CLI: ``--session-gap`` on a per-user log with no session ids, ``--features`` for p-RNN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from streamrec.data.synthetic import generate_clicks
from streamrec.model import HRNN
from streamrec.model.checkpoint import load_checkpoint
from trainer.cli import main
from trainer.hier import evaluate_users


def _sessions_by_hand(df: pd.DataFrame, gap: float) -> pd.Series:
    """A new session wherever a user's next click comes more than ``gap`` seconds later."""
    df = df.sort_values(["UserId", "Time"], kind="stable")
    new = (df["UserId"] != df["UserId"].shift()) | (df["Time"].diff() > gap)
    return new.cumsum().reindex(df.index)


def test_hrnn_with_session_gap_on_a_log_without_sessions(tmp_path: Path) -> None:
    df = generate_clicks(n_sessions=150, n_items=30, n_users=20, seed=5)
    log = df.drop(columns="SessionId")
    log.to_csv(tmp_path / "log.tsv", sep="\t", index=False)
    gap = 3600.0
    args = ["train", "--train", str(tmp_path / "log.tsv"), "--split", "last-session",
            "--session-gap", str(gap), "--model", "hrnn", "--k", "20", "--no-progress",
            "--out", str(tmp_path / "h"), "--param", "n_epochs=1", "layers=12",
            "user_layers=6"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "h" / "metrics.json").read_text())
    # the held-out sessions are each user's last session under the gap rule
    sess = _sessions_by_hand(log, gap)
    log = log.assign(SessionId=sess.astype(str))
    newest = log.loc[log.groupby("UserId")["Time"].idxmax()]
    last = log["UserId"].map(dict(zip(newest["UserId"], newest["SessionId"], strict=True)))
    test = log[log["SessionId"] == last]
    train = log[log["SessionId"] != last]
    assert m["n_events"] == len(test) - test["SessionId"].nunique()
    # and the reported metrics are the kept model's, evaluated afresh on that split
    ck = load_checkpoint(tmp_path / "h", "cpu")
    assert isinstance(ck.model, HRNN)
    known = test[test["ItemId"].isin(ck.item_index)]
    want = evaluate_users(ck.model, train, known, ck.item_index, ks=(20,))
    assert m["recall@20"] == pytest.approx(want["recall@20"], abs=1e-9)
    assert m["mrr@20"] == pytest.approx(want["mrr@20"], abs=1e-9)


def test_prnn_features_file_reaches_the_model(tmp_path: Path) -> None:
    df = generate_clicks(n_sessions=120, n_items=25, n_users=15, seed=6)
    df.to_csv(tmp_path / "log.tsv", sep="\t", index=False)
    rng = np.random.default_rng(0)
    items = sorted(df["ItemId"].unique())
    vec = rng.normal(size=(len(items), 3)).astype(np.float32)
    feats = pd.DataFrame({"ItemId": items, "f0": vec[:, 0], "f1": vec[:, 1], "f2": vec[:, 2]})
    feats.to_csv(tmp_path / "feats.tsv", sep="\t", index=False)
    args = ["train", "--train", str(tmp_path / "log.tsv"), "--split", "last-session",
            "--model", "prnn", "--features", str(tmp_path / "feats.tsv"), "--k", "20",
            "--no-progress", "--out", str(tmp_path / "p"), "--param", "n_epochs=1",
            "id_hidden=8", "feature_hidden=4"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(tmp_path / "p", "cpu")
    model: Any = ck.model
    assert model.feature_dims and model.feature_dims[0] >= 3
    table = model.feat_0.numpy()
    by_id = dict(zip(items, vec, strict=True))
    for item, row in ck.item_index.items():  # each item's row holds its vector from the file
        np.testing.assert_allclose(table[row, :3], by_id[item], rtol=1e-6)
