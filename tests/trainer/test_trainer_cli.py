"""The ``trainer`` command-line contract end to end on a small synthetic log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from streamrec.model.checkpoint import load_checkpoint
from streamrec.synthetic import generate_clicks
from trainer.cli import main

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


def test_train_writes_checkpoint_and_metrics(trained: Path) -> None:
    assert (trained / "model.safetensors").is_file() and (trained / "checkpoint.json").is_file()
    m = json.loads((trained / "metrics.json").read_text())
    for key in ("recall@1", "mrr@1", "recall@5", "mrr@5", "recall@20", "mrr@20"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["recall@20"] >= m["recall@5"] >= m["recall@1"]
    assert m["train_seconds"] > 0 and m["train_events_per_s"] > 0
    ck = load_checkpoint(trained)
    assert ck.model_name == "gru4rec"
    # preset + overrides recorded with the official names
    assert ck.train_params["loss"] == "cross-entropy" and ck.train_params["logq"] == 1.0
    assert ck.train_params["layers"] == [24] and ck.train_params["n_epochs"] == 1
    assert ck.metrics["recall@20"] == m["recall@20"]


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


def test_evaluate_table_and_other_ties(trained: Path, files: tuple[Path, Path]) -> None:
    _, test = files
    res = CliRunner().invoke(
        main, ["evaluate", "--model", str(trained), "--test", str(test), "--ties", "median"]
    )
    assert res.exit_code == 0, res.output
    assert "MRR@k" in res.output and "20" in res.output


def test_baseline_json(files: tuple[Path, Path]) -> None:
    train, test = files
    res = CliRunner().invoke(
        main, ["baseline", "--name", "pop", "--train", str(train), "--test", str(test), "--json"]
    )
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{") :])
    assert 0.0 <= got["recall@20"] <= 1.0


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
    assert len(PRESETS) == 6
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
