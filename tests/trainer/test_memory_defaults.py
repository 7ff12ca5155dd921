"""The session-memory head as a training default: on unless switched off, off in the
``*_paper`` presets (the authors' model, for the parity check), and live = offline with it on."""

from __future__ import annotations

import copy
import itertools
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.data.synthetic import generate_clicks
from streamrec.model.checkpoint import load_checkpoint, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec
from streamrec.model.topk import BLOCK_TOPK_MIN_ITEMS
from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state_store import StateStore
from streamrec.testing import click
from streamrec.tools.backtest_metrics import live_rank
from trainer.evaluate import evaluate_next_item
from trainer.presets import PRESETS, TrainParams, make_params
from trainer.train import train_gru4rec

TINY = {"layers": [16], "n_epochs": 3, "batch_size": 16, "n_sample": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    return generate_clicks(200, 60, 20, seed=3, span_days=28)


@pytest.fixture(scope="module")
def trained(log: pd.DataFrame) -> tuple[GRU4Rec, list[str], dict]:
    torch.set_num_threads(1)
    return train_gru4rec(log, dict(TINY, seed=5), progress=False)


def test_the_memory_is_on_by_default_and_off_in_the_paper_presets() -> None:
    assert TrainParams().session_memory > 0 and TrainParams().memory_holdout > 0
    published = [name for name in PRESETS if not name.endswith("_paper")]
    assert published
    for name in published:
        p, paper = make_params(name), make_params(f"{name}_paper")
        assert p.session_memory == TrainParams().session_memory
        assert paper.session_memory == 0
        others = [f.name for f in fields(TrainParams) if f.name != "session_memory"]
        assert [getattr(p, k) for k in others] == [getattr(paper, k) for k in others]


def test_default_training_fits_the_head(trained: tuple[GRU4Rec, list[str], dict]) -> None:
    model, _, stats = trained
    assert model.memory == TrainParams().session_memory
    fit = stats["memory_head"]
    assert fit["events"] > 0
    assert fit["reciprocal_rank_after"] > fit["reciprocal_rank_before"]
    assert float(model.memory_bias.detach().abs().sum()) > 0


@pytest.mark.parametrize("n_epochs", [1, 3])
def test_every_session_is_trained_on_and_the_held_out_ones_only_after_the_fit(
    log: pd.DataFrame, n_epochs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head is fitted on sessions the network has not seen; then they are trained on too:
    in the last epoch, or with one epoch (a warm-start retrain) in a pass of their own."""
    import trainer.train as train_module

    passes: list[set[object]] = []
    fits: list[int] = []
    run_epoch, fit = train_module._run_epoch, train_module.MemoryHeadSchedule._fit

    def spy_epoch(step: train_module.TrainStep, *args: object) -> float:
        passes.append(set(step.data.sessions.session_ids.tolist()))
        return run_epoch(step, *args)  # type: ignore[arg-type]  # the spy passes them through

    def spy_fit(self: train_module.MemoryHeadSchedule) -> None:
        fits.append(len(passes))
        fit(self)

    monkeypatch.setattr(train_module, "_run_epoch", spy_epoch)
    monkeypatch.setattr(train_module.MemoryHeadSchedule, "_fit", spy_fit)
    torch.set_num_threads(1)
    _, _, stats = train_gru4rec(log, dict(TINY, n_epochs=n_epochs, seed=5), progress=False)
    every = set().union(*passes)
    held = every - passes[0]
    assert held and len(held) < len(every) / 4  # memory_holdout = 0.1
    assert fits == [max(1, n_epochs - 1)]  # once, after the epochs without the held-out ones
    if n_epochs == 1:
        assert passes == [every - held, held]
    else:
        assert passes[:-1] == [every - held] * (n_epochs - 1) and passes[-1] == every
    per_epoch, trained = stats["n_events_per_epoch"], stats["events_trained"]
    if n_epochs == 1:
        assert trained == per_epoch
    else:
        assert per_epoch * (n_epochs - 1) < trained < per_epoch * n_epochs


def test_the_paper_model_trains_as_without_the_memory(log: pd.DataFrame) -> None:
    """session_memory=0 builds the paper's model (no memory tensors, the state is the GRU's);
    a memory that is not fitted (memory_holdout=0) changes neither training nor scores."""
    torch.set_num_threads(1)
    paper, ids, stats = train_gru4rec(log, dict(TINY, session_memory=0), progress=False)
    assert paper.memory == 0 and paper.state_dim == 16 and "memory_head" not in stats
    assert not [n for n, _ in paper.named_parameters() if n.startswith("memory_")]
    idle, ids2, _ = train_gru4rec(log, dict(TINY, memory_holdout=0.0), progress=False)
    assert ids2 == ids
    want = paper.state_dict()
    for k, v in idle.state_dict().items():
        if k.startswith("memory_"):
            assert not v.any()
        else:
            torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    index = {i: r for r, i in enumerate(ids)}
    assert evaluate_next_item(idle, log, index) == evaluate_next_item(paper, log, index)


def _live_ranks(model: GRU4Rec, ids: list[str], log: pd.DataFrame) -> np.ndarray:
    """The rank of each next click in the answers of the serving core (batches of 64 clicks,
    the memory in the session state) to the clicks of ``log`` in time order."""
    ordered = log.sort_values(["Time"], kind="stable")
    values = [
        click(str(s), str(i), t=float(t))
        for s, i, t in ordered[["SessionId", "ItemId", "Time"]].itertuples(index=False)
    ]
    cfg = CoreConfig(session_gap_seconds=1e9, recent_items=10, recent_sessions=3, top_k=21)
    serving = ServingModel(model, ids, "v1", device="cpu", top_k=21)
    store, answers = StateStore(), []
    for i in range(0, len(values), 64):
        batch = [
            Record(v, topic="clicks", partition=0, offset=i + j)
            for j, v in enumerate(values[i : i + 64])
        ]
        answers += process_batch(batch, store, serving, cfg).recommendations
    by_session: dict[str, list] = {}
    for r in answers:
        by_session.setdefault(r.session_id, []).append(r)
    live = []
    for recs in by_session.values():
        for a, b in itertools.pairwise(recs):
            live.append(live_rank(a.items, a.scores, b.item_id, 20))
    return np.array(live)


def _assert_same_metrics(ranks: np.ndarray, offline: dict[str, float]) -> None:
    assert len(ranks) == offline["n_events"]
    for k in (1, 5, 10, 20):
        assert (ranks <= k).mean() == pytest.approx(offline[f"recall@{k}"], abs=1e-12)
        mrr = np.where(ranks <= k, 1.0 / ranks, 0.0).mean()
        assert mrr == pytest.approx(offline[f"mrr@{k}"], abs=1e-12)


def test_live_scores_equal_trainer_evaluate_with_the_memory_on(
    log: pd.DataFrame, trained: tuple[GRU4Rec, list[str], dict]
) -> None:
    """The log through the serving core (the memory in the session state) gives the same
    Recall@k and MRR@k as trainer evaluate, and the memory changes them."""
    model, ids, _ = trained
    index = {i: r for r, i in enumerate(ids)}
    offline = evaluate_next_item(model, log, index)
    _assert_same_metrics(_live_ranks(model, ids, log), offline)
    silent = copy.deepcopy(model)
    with torch.no_grad():
        silent.memory_bias.zero_()
        silent.memory_gate_weight.zero_()
    assert evaluate_next_item(silent, log, index) != offline


def test_live_equals_trainer_evaluate_over_a_tiled_catalogue() -> None:
    """From BLOCK_TOPK_MIN_ITEMS items the worker takes the top-k tile by tile, the memory's
    offsets added to each tile (``GRU4Rec.state_topk``); trainer evaluate scores every item:
    the same Recall@k and MRR@k, on sessions where a third of the clicks repeat an item."""
    n_items = 5000
    assert n_items >= BLOCK_TOPK_MIN_ITEMS
    model = GRU4Rec({"n_items": n_items, "layers": [16], "session_memory": 8,
                     "memory_gate": True}, seed=4)  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.By.normal_(0.0, 0.3, generator=gen)
        model.memory_bias.copy_(torch.tensor([1.5, 0.5, -0.5, -2.0]))
        model.memory_gate_weight.normal_(0.0, 0.5, generator=gen)
    model.eval()
    rng = np.random.default_rng(4)
    sessions, items = np.repeat(np.arange(150), 8), rng.integers(0, n_items, 150 * 8)
    again = rng.random(len(items)) < 1 / 3
    for i in np.flatnonzero(again):
        if i % 8:  # an earlier click of the same session
            items[i] = items[i - 1 - rng.integers(0, i % 8)]
    log = pd.DataFrame({"SessionId": sessions, "ItemId": items.astype(str),
                        "Time": 1.7e9 + np.arange(len(items), dtype=float)})  # fmt: skip
    ids = [str(i) for i in range(n_items)]
    index = {i: r for r, i in enumerate(ids)}
    offline = evaluate_next_item(model, log, index)
    assert offline["recall@20"] > 0.1  # repeats found through the memory (random: 0.004)
    _assert_same_metrics(_live_ranks(model, ids, log), offline)


def test_checkpoint_and_warm_start_keep_the_memory(
    log: pd.DataFrame, trained: tuple[GRU4Rec, list[str], dict], tmp_path: Path
) -> None:
    """A checkpoint brings the fitted offsets back (the same scores); a warm start keeps the
    memory (the parent's architecture) and fits the head again."""
    model, ids, _ = trained
    index = {i: r for r, i in enumerate(ids)}
    save_checkpoint(tmp_path / "m", model, "gru4rec", ids)
    back = load_checkpoint(tmp_path / "m").model
    assert isinstance(back, GRU4Rec) and back.memory == model.memory
    assert evaluate_next_item(back, log, index) == evaluate_next_item(model, log, index)
    torch.set_num_threads(1)
    warm, _, stats = train_gru4rec(
        log, dict(TINY, n_epochs=2), progress=False, init=(copy.deepcopy(model), ids)
    )
    assert warm.memory == model.memory and stats["memory_head"]["events"] > 0
