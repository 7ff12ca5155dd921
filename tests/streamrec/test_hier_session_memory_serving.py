"""An HRNN and a p-RNN with a fitted session memory through the core (no Kafka): the live
answers rank the held-out last sessions as ``trainer evaluate`` (per user) does, and ANN
retrieval keeps the session memory's offsets."""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hier_stream import N_ITEMS, hier_log

from streamrec.model.ann import AnnParams
from streamrec.model.checkpoint import save_checkpoint
from streamrec.model.hrnn import HRNN
from streamrec.model.prnn import PRNN
from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import RetrievalOptions, ServingModel
from streamrec.serving.state_store import StateStore
from trainer.hier import HRNNParams, PRNNParams, evaluate_users, train_hier

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = CoreConfig(session_gap_seconds=1800.0, top_k=20, recent_items=50, recent_sessions=10)


@pytest.fixture(scope="module", params=["hrnn", "prnn"])
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, HRNN | PRNN]:
    """A small HRNN (user path, user memory, session memory) or p-RNN (id subnet, session
    memory) trained with the head fitted."""
    torch.set_num_threads(1)
    train, _, _ = hier_log()
    ids = [str(j) for j in range(N_ITEMS)]
    options: dict[str, Any] = dict(
        n_epochs=2, batch_size=8, device="cpu", session_memory=8, memory_holdout=0.3
    )
    torch.manual_seed(11)
    model: HRNN | PRNN
    if request.param == "hrnn":
        p: HRNNParams | PRNNParams = HRNNParams(**options)
        assert isinstance(p, HRNNParams)
        model = HRNN(N_ITEMS, variant="all", **p.model_options())
    else:
        p = PRNNParams(**options)
        model = PRNN(N_ITEMS, arch="id", id_hidden=16, session_memory=8, memory_gate=True)
    stats = train_hier(model, train, {i: j for j, i in enumerate(ids)}, p)
    assert stats["memory_head"]["events"] > 0
    folder = tmp_path_factory.mktemp(request.param) / "ckpt"
    return save_checkpoint(folder, model.eval(), request.param, ids).path, model


def _live_ranks(model: ServingModel, values: list[tuple[str, bytes]], test_ids: set[str]) -> list:
    """The rank (0: not in the top 20) of every next click of the test sessions in the core's
    answers to the stream (keyed by user on 3 partitions, batches of 37 records)."""
    offsets = [0, 0, 0]
    records = []
    for user, value in values:
        part = zlib.crc32(user.encode()) % 3
        records.append(Record(value, user.encode(), "clicks", part, offsets[part]))
        offsets[part] += 1
    store, answers = StateStore(), []
    for lo in range(0, len(records), 37):
        res = process_batch(records[lo : lo + 37], store, model, CFG)
        assert not res.dead_letters
        answers += res.recommendations
    clicks = [json.loads(v) for _, v in values if json.loads(v)["type"] == "click"]
    got = {(a.session_id, a.event_time, a.item_id): a.items for a in answers}
    ranks = []
    for n, c in enumerate(clicks):
        nxt = next((d for d in clicks[n + 1 :] if d["session_id"] == c["session_id"]), None)
        if c["session_id"] in test_ids and nxt is not None:
            items = got[(c["session_id"], c["timestamp"], c["item_id"])]
            ranks.append(items.index(nxt["item_id"]) + 1 if nxt["item_id"] in items else 0)
    return ranks


def test_live_scores_equal_trainer_evaluate_with_the_session_memory(
    trained: tuple[Path, HRNN | PRNN],
) -> None:
    """The stream through the core (the session memory in the session state, each user's
    state carried across sessions) gives the per-user evaluation's Recall@20 and MRR@20 on
    the held-out last sessions, and the session memory changes them."""
    path, model = trained
    served = ServingModel.from_checkpoint(path, "cpu", top_k=20)
    train, test, values = hier_log()
    ranks = _live_ranks(served, values, set(test["SessionId"]))
    offline = evaluate_users(served.model, train, test, served.item_index, ks=(20,))
    assert len(ranks) == offline["n_events"] > 0
    assert np.mean([r > 0 for r in ranks]) == pytest.approx(offline["recall@20"], abs=1e-9)
    mrr = np.mean([1 / r if r else 0.0 for r in ranks])
    assert mrr == pytest.approx(offline["mrr@20"], abs=1e-6)
    silent = copy.deepcopy(model)
    with torch.no_grad():
        for p in silent.session_memory_parameters():
            p.zero_()
    index = served.item_index
    assert evaluate_users(silent, train, test, index) != evaluate_users(model, train, test, index)


def test_ann_retrieval_keeps_the_session_memory_offsets(tmp_path: Path) -> None:
    """Items of the session outrank everything through a large offset: ANN (which ranks by
    the inner product alone) must score them exactly (``offset_rows``)."""
    n = 5000
    torch.manual_seed(0)
    m = HRNN(n, layers=[16], user_layers=[8], session_memory=4)
    with torch.no_grad():
        m.session_memory_bias.fill_(100.0)
    ckpt = save_checkpoint(tmp_path / "h", m, "hrnn", [f"i{i}" for i in range(n)]).path
    ann = RetrievalOptions("ann", AnnParams(candidates=50))
    served = ServingModel.from_checkpoint(ckpt, "cpu", 20, retrieval=ann)
    assert served.retrieval == "ann"
    users = served.initial_user_states(2)
    states = served.initial_states(users, 2)
    states = served.step(np.array([4321, 17]), states, users).states
    out = served.step(np.array([2500, 17]), states, users)
    assert set(out.top_rows[0, :2].tolist()) == {4321, 2500}
    assert out.top_rows[1, 0] == 17
