"""The ``trainer`` command-line contract end to end on a small synthetic log."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from streamrec.data.synthetic import generate_clicks
from streamrec.model.checkpoint import load_checkpoint
from trainer.cli import main

KS = (1, 5, 20)
FAST = ["layers=24", "n_epochs=1", "n_sample=16", "batch_size=16", "learning_rate=0.1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is much faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("clicks")
    df = generate_clicks(n_sessions=300, n_items=60, seed=7)
    sid = df["SessionId"].astype(int)
    train, test = d / "train.tsv", d / "test.tsv.gz"
    df[sid < 240].to_csv(train, sep="\t", index=False)
    df[sid >= 240].to_csv(test, sep="\t", index=False, compression="gzip")
    return train, test


@pytest.fixture(scope="module")
def trained(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    train, test = files
    out = tmp_path_factory.mktemp("run") / "ckpt"
    args = ["train", "--train", str(train), "--test", str(test), "--preset",
            "yoochoose_xe_shared_best", "--param", *FAST, "--k", "1", "5", "20",
            "--out", str(out), "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "Recall@k" in res.output
    return out


def _test_sessions(test: Path, known: set[str]) -> list[list[str]]:
    """The test log as the CLI evaluates it: known items, sessions of 2+ events, by time."""
    df = pd.read_csv(test, sep="\t", dtype={"SessionId": str, "ItemId": str})
    df = df[df["ItemId"].isin(known)].sort_values(["SessionId", "Time"], kind="stable")
    out = [list(g["ItemId"]) for _, g in df.groupby("SessionId", sort=False)]
    return [s for s in out if len(s) >= 2]


def _brute_force(
    scores_after: Callable[[list[str]], dict[str, float]],
    sessions: Sequence[list[str]],
    ties: str = "conservative",
) -> dict[str, float]:
    """Recall@k / MRR@k one prefix at a time, ranking in plain Python over a score dict."""
    ranks = []
    for sess in sessions:
        for j in range(1, len(sess)):
            sc = scores_after(sess[:j])
            target = sc[sess[j]]
            higher = sum(v > target for v in sc.values())
            at_least = sum(v >= target for v in sc.values())
            ranks.append(
                {"standard": higher + 1, "conservative": at_least}.get(
                    ties, (higher + 1 + at_least) / 2
                )
            )
    r = np.array(ranks, dtype=float)
    out: dict[str, float] = {"n_events": len(r)}
    for k in KS:
        out[f"recall@{k}"] = float((r <= k).mean())
        out[f"mrr@{k}"] = float(np.where(r <= k, 1 / r, 0).mean())
    return out


def _model_scores(ckpt: Path) -> Callable[[list[str]], dict[str, float]]:
    ck = load_checkpoint(ckpt, "cpu")
    net: Any = ck.model  # the step API (docs/architecture.md)

    def scores_after(prefix: list[str]) -> dict[str, float]:
        with torch.inference_mode():
            state = net.initial_state(None, 1)
            for it in prefix:
                state, sc = net.step(torch.tensor([ck.item_index[it]]), state, None)
        return dict(zip(ck.item_ids, sc[0].tolist(), strict=True))

    return scores_after


def _assert_metrics(got: dict, want: dict) -> None:
    for k in KS:
        assert got[f"recall@{k}"] == pytest.approx(want[f"recall@{k}"], abs=1e-6), k
        assert got[f"mrr@{k}"] == pytest.approx(want[f"mrr@{k}"], abs=1e-6), k
    assert got["n_events"] == want["n_events"]


def test_train_writes_checkpoint_and_metrics(trained: Path, files: tuple[Path, Path]) -> None:
    assert (trained / "model.safetensors").is_file() and (trained / "checkpoint.json").is_file()
    m = json.loads((trained / "metrics.json").read_text())
    ck = load_checkpoint(trained)
    # the reported metrics are the checkpoint's own, recomputed prefix by prefix
    sessions = _test_sessions(files[1], set(ck.item_ids))
    _assert_metrics(m, _brute_force(_model_scores(trained), sessions))
    # and the model learned the planted structure: far better than popularity
    assert m["recall@20"] > _pop_metrics(files)["recall@20"] + 0.1
    assert m["train_seconds"] > 0 and m["train_events_per_s"] > 0
    assert ck.model_name == "gru4rec"
    # preset + overrides recorded with the official names
    assert ck.train_params["loss"] == "cross-entropy" and ck.train_params["logq"] == 1.0
    assert ck.train_params["layers"] == [24] and ck.train_params["n_epochs"] == 1
    assert ck.metrics["recall@20"] == m["recall@20"]


def _pop_metrics(files: tuple[Path, Path]) -> dict[str, float]:
    train = pd.read_csv(files[0], sep="\t", dtype={"ItemId": str})
    counts = train["ItemId"].value_counts()
    pop = {str(i): float(c) for i, c in counts.items()}
    return _brute_force(lambda prefix: pop, _test_sessions(files[1], set(pop)))


def test_evaluate_json_matches(trained: Path, files: tuple[Path, Path]) -> None:
    _, test = files
    res = CliRunner().invoke(
        main, ["evaluate", "--model", str(trained), "--test", str(test), "--k", "1", "5", "20",
               "--ties", "conservative", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{") :])
    want = json.loads((trained / "metrics.json").read_text())
    for key in ("recall@1", "mrr@1", "recall@5", "mrr@5", "recall@20", "mrr@20"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_evaluate_through_retrieval(trained: Path, files: tuple[Path, Path]) -> None:
    """--retrieval exact ranks within the worker's top-k: the same Recall/MRR up to k; ann
    builds the index beside the checkpoint and reports what it cost."""
    _, test = files
    base = ["evaluate", "--model", str(trained), "--test", str(test), "--k", "1", "5", "20",
            "--json"]  # fmt: skip
    got = {}
    for mode in ("all", "exact", "ann"):
        res = CliRunner().invoke(main, [*base, "--retrieval", mode])
        assert res.exit_code == 0, res.output
        got[mode] = json.loads(res.output[res.output.index("{") :])
    for key in ("recall@1", "mrr@1", "recall@5", "mrr@5", "recall@20", "mrr@20", "n_events"):
        assert got["exact"][key] == pytest.approx(got["all"][key], abs=1e-12), key
    assert got["ann"]["retrieval"] == "ann"
    assert got["ann"]["index_bytes"] > 0
    assert (trained / "retrieval.json").is_file()  # saved beside the weights
    # 60 items: the index finds them all, so nothing is lost
    assert got["ann"]["recall@20"] == pytest.approx(got["all"]["recall@20"], abs=1e-12)
    # the head of every item (60 <= head) is the exact answer; a head of 25 loses
    for head, same in (("60", True), ("25", False)):
        res = CliRunner().invoke(
            main, [*base, "--retrieval", "ann", "--ann-index", "head", "--head-items", head]
        )
        assert res.exit_code == 0, res.output
        h = json.loads(res.output[res.output.index("{") :])
        assert h["index_params"]["kind"] == "head"
        assert (h["recall@20"] == pytest.approx(got["all"]["recall@20"], abs=1e-12)) is same


def test_evaluate_through_head_and_successors(
    trained: Path, files: tuple[Path, Path], tmp_path: Path
) -> None:
    """--ann-index head+successors scores the clicked item's successors in the training log
    with the head: the table beside the checkpoint, built from --train (as ``trainer train``
    publishes it) when missing or when its hash does not match; without --train, an error."""
    from streamrec.model.api import InnerProductScores
    from streamrec.model.checkpoint import load_checkpoint
    from streamrec.model.successors import TABLE_FILE, SuccessorTable, load_table
    from trainer.batching import session_arrays

    train, test = files
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    base = ["evaluate", "--model", str(ckpt), "--test", str(test), "--k", "20", "--json",
            "--retrieval", "ann", "--ann-index", "head+successors", "--head-items", "25",
            "--successors", "4"]  # fmt: skip
    res = CliRunner().invoke(main, base)
    assert res.exit_code != 0 and "--train" in res.output
    ck = load_checkpoint(ckpt, "cpu")
    rows, offsets, _ = session_arrays(pd.read_csv(train, sep="\t"), ck.item_index)
    assert isinstance(ck.model, InnerProductScores)
    with torch.inference_mode():
        v = ck.model.item_vectors()
    want = SuccessorTable.build(rows, offsets, len(v), 4, "")
    for damage in (False, True):
        if damage:  # contents no longer match their hash: rebuilt, not used
            (ckpt / TABLE_FILE).write_bytes(b"not a table")
        res = CliRunner().invoke(main, [*base, "--train", str(train)])
        assert res.exit_code == 0, res.output
        got = json.loads(res.output[res.output.index("{") :])
        assert got["successors"] == 4 and got["index_params"]["kind"] == "head+successors"
        assert torch.equal(load_table(ckpt, v, 4).table, want.table)
    # trainer train publishes the table beside the index
    out = tmp_path / "published"
    args = ["train", "--train", str(train), "--preset", "yoochoose_xe_shared_best", "--param",
            *FAST, "--out", str(out), "--no-progress", "--retrieval-index", "always"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert (out / TABLE_FILE).is_file() and "successor table" in res.output


@pytest.mark.parametrize("ties", ["standard", "median"])
def test_evaluate_table_and_other_ties(trained: Path, files: tuple[Path, Path], ties: str) -> None:
    _, test = files
    res = CliRunner().invoke(
        main, ["evaluate", "--model", str(trained), "--test", str(test), "--ties", ties,
               "--k", "1", "5", "20"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    want = _brute_force(
        _model_scores(trained), _test_sessions(test, set(load_checkpoint(trained).item_ids)), ties
    )
    rows = {
        cells[0]: cells[1:]
        for line in res.output.splitlines()
        if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 3
        and cells[0].isdigit()
    }
    assert rows == {
        str(k): [f"{want[f'recall@{k}']:.4f}", f"{want[f'mrr@{k}']:.4f}"] for k in KS
    }, res.output


def test_baseline_json(files: tuple[Path, Path]) -> None:
    train, test = files
    res = CliRunner().invoke(
        main, ["baseline", "--name", "pop", "--train", str(train), "--test", str(test), "--json",
               "--k", "1", "5", "20"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{") :])
    _assert_metrics(got, _pop_metrics(files))


@pytest.mark.parametrize("name", ["s-pop", "item-knn", "bpr-mf"])
def test_other_baselines_through_the_cli(files: tuple[Path, Path], name: str) -> None:
    """The CLI reports what the library computes (trainer.baselines.run_baseline, whose models
    tests/trainer/test_baselines.py checks by hand) on the test restricted to known items."""
    from trainer.baselines import run_baseline

    train, test = files
    res = CliRunner().invoke(
        main, ["baseline", "--name", name, "--train", str(train), "--test", str(test), "--json",
               "--k", "1", "5", "20"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{") :])
    train_df = pd.read_csv(train, sep="\t", dtype={"SessionId": str, "ItemId": str})
    test_df = pd.read_csv(test, sep="\t", dtype={"SessionId": str, "ItemId": str})
    known = set(train_df["ItemId"])
    test_df = test_df[test_df["ItemId"].isin(known)]
    test_df = test_df[test_df.groupby("SessionId")["SessionId"].transform("size") >= 2]
    want = run_baseline(name, train_df, test_df.reset_index(drop=True), KS)
    _assert_metrics(got, want)
    assert got["recall@20"] > _pop_metrics(files)["recall@20"]  # sequence-aware beats pop


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--param", "bogus=1"], "bogus"),
        (["--param", "batch_size=many"], "batch_size"),
        (["--preset", "nope"], "nope"),
        (["--model", "transformer"], "transformer"),
        (["--variant", "all"], "--variant"),
    ],
)
def test_bad_arguments_name_the_problem(
    files: tuple[Path, Path], tmp_path: Path, extra: list[str], needle: str
) -> None:
    train, _ = files
    res = CliRunner().invoke(
        main, ["train", "--train", str(train), "--out", str(tmp_path / "o"), "--no-progress",
               "--param", *FAST, *extra],
    )  # fmt: skip
    assert res.exit_code != 0
    assert needle in res.output
    assert not (tmp_path / "o").exists()


def test_missing_file_and_bad_checkpoint(files: tuple[Path, Path], tmp_path: Path) -> None:
    _, test = files
    res = CliRunner().invoke(main, ["train", "--train", str(tmp_path / "no.tsv"), "--out", "x"])
    assert res.exit_code != 0 and "no.tsv" in res.output
    (tmp_path / "broken").mkdir()
    res = CliRunner().invoke(
        main, ["evaluate", "--model", str(tmp_path / "broken"), "--test", str(test)]
    )
    assert res.exit_code != 0 and "checkpoint.json" in res.output


def test_presets_and_param_parsing() -> None:
    from trainer.presets import PRESETS, ParamError, make_params

    p = make_params("yoochoose_xe_shared_best")
    assert (p.loss, p.layers, p.batch_size, p.n_epochs, p.learning_rate) == (
        "cross-entropy", [480], 48, 10, 0.07,
    )  # fmt: skip
    assert (p.n_sample, p.sample_alpha, p.dropout_p_hidden, p.logq, p.bpreg) == (
        2048, 0.2, 0.2, 1.0, 0.0,
    )  # fmt: skip
    assert p.constrained_embedding and p.embedding == 0 and p.resolved_final_act() == "linear"
    bm = make_params("coveo_bprmax_shared_best")
    assert bm.loss == "bpr-max" and bm.bpreg == 1.85 and bm.resolved_final_act() == "elu"
    assert len(PRESETS) == 12  # the six published files, each also as its *_paper preset
    assert sorted(n for n in PRESETS if not n.endswith("_paper")) == sorted(
        n.removesuffix("_paper") for n in PRESETS if n.endswith("_paper")
    )
    q = make_params("yoochoose_xe_shared_best", ["layers=100/50", "constrained_embedding=False"])
    assert q.layers == [100, 50] and q.constrained_embedding is False and q.batch_size == 48
    bad_params = [
        ("dropout_p_hidden=1.5", "dropout_p_hidden"),
        ("loss=hinge", "loss"),
        ("n_epochs=1.5", "n_epochs"),
        ("nope=1", "nope"),
        ("layers", "layers"),
    ]
    for bad, name in bad_params:
        with pytest.raises(ParamError, match=name):
            make_params(None, [bad])
