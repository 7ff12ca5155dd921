"""The served model's retrieval (model.retrieval): ANN answers from an index beside the
checkpoint, built at load when absent or stale; exact unchanged; auto by size and device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrec.model import HRNN, GRU4Rec
from streamrec.model.ann import AnnParams
from streamrec.model.checkpoint import save_checkpoint
from streamrec.serving.served_model import ModelHolder, RetrievalOptions, ServingModel
from streamrec.settings import Settings

pytestmark = pytest.mark.usefixtures("one_thread")

N = 5000
ANN = RetrievalOptions("ann", AnnParams(candidates=50))


def _gru4rec_ckpt(path: Path, seed: int = 0) -> Path:
    m = GRU4Rec({"n_items": N, "layers": [16]}, seed=seed)
    with torch.no_grad():  # rows of a trained model's size, a bias as large as the products
        m.Wy.mul_(10.0)
        m.By.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return save_checkpoint(path, m, "gru4rec", [f"i{i}" for i in range(N)]).path


def _planted(model: ServingModel, items: list[int]) -> np.ndarray:
    """GRU states at their largest norm (4 for 16 units) pointing along these items' rows."""
    assert isinstance(model.model, GRU4Rec)
    w = model.model.Wy.detach()[items]
    return (4.0 * w / w.norm(dim=1, keepdim=True)).numpy().astype(np.float32)


def _clear(scores: np.ndarray) -> np.ndarray:
    """States whose winner leads the runner-up by 10 %."""
    return scores[:, 0] - scores[:, 1] > 0.1 * np.abs(scores[:, 0])


def test_ann_serving_answers_as_exact_on_clear_cases_and_keeps_its_index(tmp_path: Path) -> None:
    ckpt = _gru4rec_ckpt(tmp_path / "m")
    exact = ServingModel.from_checkpoint(ckpt, "cpu", 20)
    ann = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=ANN)
    assert (exact.retrieval, ann.retrieval) == ("exact", "ann")
    meta = json.loads((ckpt / "retrieval.json").read_text())  # built at load, saved beside
    states = _planted(exact, list(range(0, N, 131)))
    top_exact, scores = exact.score(states)
    top_ann, _ = ann.score(states)
    clear = _clear(scores)
    assert clear.sum() >= 10
    assert (top_ann[clear, 0] == top_exact[clear, 0]).all()
    # the next load reuses the file
    again = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=ANN)
    assert again.retriever is not None and again.retriever.index is not None
    assert again.retriever.index.meta == meta


def test_a_stale_index_beside_new_weights_is_rebuilt_at_load(tmp_path: Path) -> None:
    ckpt = _gru4rec_ckpt(tmp_path / "m", seed=0)
    ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=ANN)
    old = json.loads((ckpt / "retrieval.json").read_text())
    index_file = (ckpt / "retrieval.usearch").read_bytes()
    _gru4rec_ckpt(tmp_path / "m", seed=1)  # new weights in the same directory
    (ckpt / "retrieval.usearch").write_bytes(index_file)  # the old index left behind
    (ckpt / "retrieval.json").write_text(json.dumps(old))
    served = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=ANN)
    assert served.retriever is not None and served.retriever.index is not None
    assert served.retriever.index.meta["vectors_sha256"] != old["vectors_sha256"]
    states = _planted(served, list(range(0, N, 97)))
    exact = ServingModel.from_checkpoint(ckpt, "cpu", 20)
    top_exact, scores = exact.score(states)
    top, _ = served.score(states)  # the new weights' answers, not the stale index's
    clear = _clear(scores)
    assert clear.sum() >= 10
    assert (top[clear, 0] == top_exact[clear, 0]).all()


def test_auto_serves_small_catalogues_exactly_and_validation_stays_bounded(tmp_path: Path) -> None:
    ckpt = _gru4rec_ckpt(tmp_path / "m")
    served = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=RetrievalOptions("auto"))
    assert served.retrieval == "exact"
    assert not (ckpt / "retrieval.json").exists()  # exact needs no index
    served.validate()


def test_hrnn_served_with_ann_keeps_the_memory_offset(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = HRNN(N, layers=[16], user_layers=[8], memory=3)
    with torch.no_grad():
        m.memory_bias.fill_(100.0)  # a remembered item outranks everything
    ckpt = save_checkpoint(tmp_path / "h", m, "hrnn", [f"i{i}" for i in range(N)]).path
    served = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=ANN)
    assert served.retrieval == "ann"
    users = served.initial_user_states(2)
    users[:, m.user_dim_total :] = [[4321, -1, -1], [17, 2500, -1]]
    states = served.initial_states(users, 2)
    out = served.step(np.array([5, 6]), states, users)
    assert out.top_rows[0, 0] == 4321
    assert set(out.top_rows[1, :2].tolist()) == {17, 2500}


def test_retrieval_settings() -> None:
    s = Settings(model={"retrieval": "ann", "ann_candidates": 64, "ann_expansion_search": 200})
    opts = RetrievalOptions.from_settings(s.model)
    assert (opts.mode, opts.ann.candidates, opts.ann.expansion_search) == ("ann", 64, 200)
    assert (opts.ann.kind, opts.ann.head_items) == ("hnsw", 130_000)
    head = Settings(model={"ann_index": "head", "ann_head_items": 5000})
    opts = RetrievalOptions.from_settings(head.model)
    assert (opts.ann.kind, opts.ann.head_items) == ("head", 5000)
    with pytest.raises(ValueError, match="ann_index"):
        Settings(model={"ann_index": "ivf"})
    assert Settings().model.retrieval == "auto"
    with pytest.raises(ValueError, match="retrieval"):
        Settings(model={"retrieval": "fast"})


def test_a_swap_builds_the_new_index_off_the_serving_path(tmp_path: Path) -> None:
    """prepare_reload (the loader thread's call) loads the new version with its index; the
    served model is untouched until install."""
    models = tmp_path / "models"
    a = _gru4rec_ckpt(models / "a", seed=0)
    first = ServingModel.from_checkpoint(a, "cpu", 20, retrieval=ANN)
    holder = ModelHolder(first, watch_dir=models, device="cpu", retrieval=ANN)
    b = _gru4rec_ckpt(models / "b", seed=1)
    new = holder.prepare_reload()
    assert new is not None and new.retrieval == "ann"
    assert holder.current is first  # still serving the old one
    assert (b / "retrieval.json").exists()
    holder.install(new)
    assert holder.current is new
