"""Checks that need CUDA: skipped without a GPU, run on the GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamrec.data.synthetic import generate_clicks
from streamrec.model.device import resolve_device
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.serving.served_model import ServingModel
from trainer.data import split_by_time
from trainer.evaluate import evaluate_next_item
from trainer.train import train_gru4rec

pytestmark = pytest.mark.gpu


def _params(device: str) -> dict[str, str]:
    return {"n_epochs": "2", "layers": "64", "n_sample": "128", "batch_size": "32",
            "device": device, "seed": "7"}  # fmt: skip


def test_auto_device_is_cuda() -> None:
    assert resolve_device("auto").type == "cuda"


def test_step_on_cuda_matches_cpu() -> None:
    model = GRU4Rec(GRU4RecConfig(n_items=500, layers=[48, 32]), seed=3).eval()
    ids = [str(i) for i in range(500)]
    cpu = ServingModel(model, ids, "v1", device="cpu", top_k=10)
    gpu = ServingModel(GRU4Rec(GRU4RecConfig(n_items=500, layers=[48, 32]), seed=3), ids, "v1",
                       device="cuda", top_k=10)  # fmt: skip
    rng = np.random.default_rng(0)
    states = cpu.initial_states(None, 64)
    for _ in range(5):
        rows = rng.integers(-1, 500, size=64)
        out_cpu, out_gpu = cpu.step(rows, states, None), gpu.step(rows, states, None)
        np.testing.assert_allclose(out_gpu.states, out_cpu.states, atol=1e-4)
        np.testing.assert_allclose(out_gpu.top_scores, out_cpu.top_scores, atol=1e-3)
        states = out_cpu.states


def test_training_on_cuda_is_deterministic_and_learns() -> None:
    df = generate_clicks(n_sessions=1500, n_items=150, seed=5)
    train, test = split_by_time(df, 1)
    first, ids, stats = train_gru4rec(train, _params("cuda"), progress=False)
    second, _, _ = train_gru4rec(train, _params("cuda"), progress=False)
    assert stats["device"].startswith("cuda")
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    index = {item: row for row, item in enumerate(ids)}
    metrics = evaluate_next_item(first, test, index, ks=(20,), device="cuda")
    counts = train["ItemId"].value_counts()
    top20 = set(counts.index[:20])
    pop_recall = float(np.mean([item in top20 for item in test.groupby("SessionId")["ItemId"]
                                .apply(lambda s: list(s)[1:]).explode().dropna()]))  # fmt: skip
    assert metrics["recall@20"] > pop_recall + 0.1
