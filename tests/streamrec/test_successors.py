"""The successor table (``model.ann_index=head+successors``): each item's most frequent next
items in the training sessions, scored exactly with the head's candidates, the same on the
worker's step, its deferred scoring and ``trainer evaluate``; a table whose hashes do not match
the weights or its contents is not used (the worker) or rebuilt (publishing)."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrec.model import GRU4Rec
from streamrec.model.ann import AnnParams, vectors_hash
from streamrec.model.checkpoint import save_checkpoint
from streamrec.model.successors import (
    TABLE_FILE,
    TABLE_META,
    SuccessorTable,
    SuccessorTableError,
    load_table,
    publish_table,
)
from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import RetrievalOptions, ServingModel
from streamrec.serving.state_store import StateStore
from streamrec.settings import Settings
from streamrec.testing import click
from trainer.evaluate import step_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

N = 4000
HEAD = 200
WIDTH = 5


def _sessions(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Encoded sessions in which each item is mostly followed by a few fixed items."""
    rng = np.random.default_rng(seed)
    follow = rng.integers(0, N, (N, 3))
    sessions = []
    for _ in range(1500):
        s = [int(rng.integers(0, N))]
        for _ in range(int(rng.integers(1, 8))):
            nxt = follow[s[-1], rng.integers(0, 3)] if rng.random() < 0.8 else rng.integers(0, N)
            s.append(int(nxt))
        if rng.random() < 0.1:
            s.append(s[-1])  # a repeat: not a successor
        sessions.append(s)
    offsets = np.cumsum([0] + [len(s) for s in sessions])
    return np.concatenate(sessions).astype(np.int64), offsets


def _expected(rows: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """The table by counting pairs in Python: most frequent first, then the lower row."""
    counts: dict[int, Counter[int]] = {}
    for a, b in itertools.pairwise(offsets):
        s = rows[a:b].tolist()
        for x, y in itertools.pairwise(s):
            if x != y:
                counts.setdefault(x, Counter())[y] += 1
    out = np.full((N, width), -1, dtype=np.int64)
    for x, c in counts.items():
        best = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:width]
        out[x, : len(best)] = [y for y, _ in best]
    return out


def _ckpt(path: Path, seed: int = 0) -> Path:
    m = GRU4Rec({"n_items": N, "layers": [16]}, seed=seed)
    with torch.no_grad():
        m.Wy.mul_(10.0)
        m.By.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return save_checkpoint(path, m, "gru4rec", [f"i{i}" for i in range(N)]).path


HEAD_ONLY = RetrievalOptions("ann", AnnParams(kind="head", head_items=HEAD))
OPTS = RetrievalOptions("ann", AnnParams(kind="head+successors", head_items=HEAD, successors=WIDTH))


def test_the_table_holds_each_items_most_frequent_next_items() -> None:
    rows, offsets = _sessions()
    table = SuccessorTable.build(rows, offsets, N, WIDTH, "h")
    assert np.array_equal(table.table.numpy(), _expected(rows, offsets, WIDTH))
    # no pair across sessions: two one-pair sessions give only their own successors
    two = SuccessorTable.build(np.array([1, 2, 3, 4]), np.array([0, 2, 4]), 5, 2, "h")
    assert two.table[2].tolist() == [-1, -1] and two.table[1].tolist() == [2, -1]
    cand = table.candidates(torch.tensor([7, -1]))
    assert cand[0].tolist() == [7, *table.table[7].tolist()]
    assert (cand[1] == -1).all()  # an unknown click adds nothing
    with pytest.raises(ValueError, match="item rows"):
        SuccessorTable.build(np.array([0, N]), np.array([0, 2]), N, WIDTH, "h")


def _served_answers(ckpt: Path, table: SuccessorTable) -> None:
    """The worker's step, its deferred scoring and a hand-made exact top-20 over the head,
    the clicked item and its successors: the same answers, some of them outside the head."""
    served = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=OPTS)
    ret = served.retriever
    assert ret is not None and ret.successors is not None
    model = served.model
    assert isinstance(model, GRU4Rec)
    rng = np.random.default_rng(3)
    clicked = rng.choice(np.flatnonzero(table.table[:, 0].numpy() >= 0), 64, replace=False)
    clicked[-1] = -1  # an unknown item: the head alone
    states = served.initial_states(None, len(clicked))
    out = served.step(clicked, states, None)
    top_deferred, _ = served.score(served.advance(clicked, states), None, clicked)
    assert np.array_equal(out.top_rows, top_deferred)
    with torch.inference_mode():
        v = model.item_vectors()
        head = torch.topk(v.norm(dim=1), HEAD).indices
        scores = model.score_items(model.output(torch.from_numpy(out.states)))
    outside = 0
    for i, c in enumerate(clicked.tolist()):
        allowed = set(head.tolist()) | ({c, *table.table[c].tolist()} - {-1} if c >= 0 else set())
        idx = torch.tensor(sorted(allowed))
        want = idx[torch.topk(scores[i, idx], 20).indices]
        assert set(out.top_rows[i].tolist()) == set(want.tolist())
        outside += len(set(out.top_rows[i].tolist()) - set(head.tolist()))
    assert outside > 0  # the successors reach items the head leaves out
    # trainer evaluate ranks through the same candidates: each served answer's first item
    # outside the head ranks where the worker put it
    in_head = torch.zeros(N, dtype=torch.bool)
    in_head[head] = True
    known = clicked[:-1]
    answers = torch.from_numpy(out.top_rows[:-1])
    pos = (~in_head[answers]).float().argmax(dim=1)
    has = ~in_head[answers].all(dim=1)
    assert int(has.sum()) > 0
    with torch.inference_mode():
        _, r = step_ranks(model, torch.from_numpy(known), torch.from_numpy(states[:-1]), None,
                          answers.gather(1, pos.unsqueeze(1)).squeeze(1), "conservative",
                          retriever=ret, k=20)  # fmt: skip
    assert torch.equal(r[has], (pos[has] + 1).to(r.dtype))


def test_head_and_successors_serve_the_clicked_items_successors(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path / "m")
    rows, offsets = _sessions()
    with torch.inference_mode():
        published = publish_table(ckpt, _vectors(ckpt), rows, offsets, WIDTH)
    assert (ckpt / TABLE_FILE).is_file() and (ckpt / TABLE_META).is_file()
    _served_answers(ckpt, published)


def _vectors(ckpt: Path) -> torch.Tensor:
    served = ServingModel.from_checkpoint(ckpt, "cpu", 20)
    assert isinstance(served.model, GRU4Rec)
    return served.model.item_vectors()


def test_the_workers_deferred_scoring_passes_the_clicked_items(tmp_path: Path) -> None:
    """``process_batch`` (a split-step model: advanced per round, scored per batch) answers
    with the clicked items' successors, as one ``step`` of each click does."""
    ckpt = _ckpt(tmp_path / "m")
    rows, offsets = _sessions()
    publish_table(ckpt, _vectors(ckpt), rows, offsets, WIDTH)
    served = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=OPTS)
    assert served.split
    assert served.retriever is not None and served.retriever.successors is not None
    table = served.retriever.successors.table
    clicked = np.random.default_rng(4).choice(
        np.flatnonzero(table[:, 0].numpy() >= 0), 200, replace=False
    )
    records = [
        Record(click(f"s{j}", f"i{x}"), f"s{j}".encode(), "c", 0, j, None)
        for j, x in enumerate(clicked.tolist())
    ]
    res = process_batch(records, StateStore(), served, CoreConfig())
    got = [r.items for r in res.recommendations]
    want = served.step(clicked, served.initial_states(None, len(clicked)), None).top_rows
    assert got == [served.ids(w).tolist() for w in want]
    # and they are not the head's alone (the test would not see a dropped row otherwise)
    head_only = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=HEAD_ONLY)
    alone = head_only.step(clicked, head_only.initial_states(None, len(clicked)), None).top_rows
    assert not np.array_equal(alone, want)


def test_a_table_that_does_not_match_is_not_served_and_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = _ckpt(tmp_path / "m")
    rows, offsets = _sessions()
    with torch.inference_mode():
        v = _vectors(ckpt)
        good = publish_table(ckpt, v, rows, offsets, WIDTH)
    arr = np.load(ckpt / TABLE_FILE)
    arr[0, 0] = (arr[0, 0] + 1) % N  # contents changed, record kept
    np.save(ckpt / TABLE_FILE, arr)
    with pytest.raises(SuccessorTableError, match="hash"):
        load_table(ckpt, v, WIDTH)
    with caplog.at_level(logging.WARNING, logger="streamrec.serving.served_model"):
        served = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=OPTS)
    assert served.retriever is not None and served.retriever.successors is None
    assert "successor table not used" in caplog.text
    rebuilt = publish_table(ckpt, v, rows, offsets, WIDTH)  # publishing replaces it
    assert torch.equal(rebuilt.table, good.table)
    assert torch.equal(load_table(ckpt, v, WIDTH).table, good.table)
    # new weights in the directory, the old table left behind: it belongs to other vectors
    old = {f: (ckpt / f).read_bytes() for f in (TABLE_FILE, TABLE_META)}
    _ckpt(tmp_path / "m", seed=1)
    for f, data in old.items():
        (ckpt / f).write_bytes(data)
    v1 = _vectors(ckpt)
    with pytest.raises(SuccessorTableError, match="other weights"):
        load_table(ckpt, v1, WIDTH)
    meta = json.loads((ckpt / TABLE_META).read_text())
    assert meta["vectors_sha256"] == vectors_hash(v) != vectors_hash(v1)
    with pytest.raises(SuccessorTableError, match="successors per item"):
        load_table(ckpt, v, WIDTH + 1)  # a wider table is wanted: build it


def test_successor_settings() -> None:
    s = Settings(model={"ann_index": "head+successors", "ann_successors": 30})
    opts = RetrievalOptions.from_settings(s.model)
    assert (opts.ann.kind, opts.ann.successors) == ("head+successors", 30)
    assert Settings().model.ann_successors == AnnParams.successors
    with pytest.raises(ValueError, match="ann_successors"):
        Settings(model={"ann_successors": 0})
