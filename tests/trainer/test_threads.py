"""The trainer's CPU thread count: torch's default (one per core) made training on a busy
2-core machine 16-19x slower than one thread (bench/results/train-threads.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from streamrec.data.synthetic import generate_clicks
from trainer import threads
from trainer.cli import main


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    n = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(2)))
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    ("load", "torch_default", "want"),
    [(8.0, 2, 1), (1.2, 2, 1), (0.1, 2, 2), (0.1, 16, 2), (0.0, 1, 1)],
)
def test_the_default_takes_the_cores_the_load_leaves_idle(
    monkeypatch: pytest.MonkeyPatch, load: float, torch_default: int, want: int
) -> None:
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: torch_default)
    assert threads.choose_threads(None, load1=load) == want


def test_an_explicit_count_wins_and_so_does_omp_num_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert threads.choose_threads(3, load1=8.0) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)
    assert threads.choose_threads(None, load1=8.0) == 2


@pytest.mark.parametrize(("option", "want"), [([], 1), (["--threads", "2"], 2)])
def test_trainer_train_on_busy_cores_uses_one_thread_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: list[str], want: int
) -> None:
    """torch's default here is 2 threads; with the load average at 8 on 2 cores `trainer
    train` used both (fails without the default: '2 CPU thread(s)' for the plain command)."""
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    torch.set_num_threads(2)
    log = tmp_path / "train.tsv"
    generate_clicks(n_sessions=60, n_items=30, seed=1).to_csv(log, sep="\t", index=False)
    params = ["layers=8", "n_epochs=1", "batch_size=8", "n_sample=0"]
    args = ["train", "--train", str(log), "--out", str(tmp_path / "m"), "--no-progress"]
    res = CliRunner().invoke(main, [*args, "--param", *params, *option])
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == want
    assert f"events/s, {want} CPU thread(s))" in res.output
