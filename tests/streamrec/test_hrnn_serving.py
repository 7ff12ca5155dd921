"""A trained HRNN through the core (no Kafka): users followed across several sessions, and a
session written under an older model version ended by the sweep.

An untrained HRNN's user path is zero (it scores as a GRU4Rec whatever the user state), so
these tests serve one trained for seconds (``hier_stream.train_small_hrnn``) and first check
that its user state changes the answers.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hier_stream import hier_log, hier_reference, later_session_clicks, user_path_changes_answers

from streamrec.model.checkpoint import load_checkpoint
from streamrec.serving.config import CoreConfig
from streamrec.serving.expiry import sweep_idle
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state_store import StateStore
from streamrec.testing import click

GAP = 1800.0
CFG = CoreConfig(session_gap_seconds=GAP, top_k=20, recent_items=50, recent_sessions=10)
PARTITIONS = 3


def _records(values: list[tuple[str, bytes]]) -> list[Record]:
    """The stream as a worker reads it: keyed by user, each user on one of 3 partitions."""
    offsets = [0] * PARTITIONS
    out = []
    for user, value in values:
        p = zlib.crc32(user.encode()) % PARTITIONS
        out.append(Record(value, user.encode(), "clicks", p, offsets[p]))
        offsets[p] += 1
    return out


def test_a_trained_hrnn_follows_each_user_across_sessions(trained_hrnn: Path) -> None:
    """Every answer equals the model's own step-by-step computation with each user's state
    carried from session to session (batches cut anywhere, sessions ended by a new session id
    or an explicit session_end); the held-out last sessions score as the offline per-user
    evaluator says."""
    from trainer.hier import evaluate_users

    model = ServingModel.from_checkpoint(trained_hrnn, "cpu", top_k=20)
    train, test, values = hier_log()
    assert user_path_changes_answers(model, values) > 0.5  # the user path matters here
    ref = hier_reference(model, values, GAP)
    store = StateStore()
    answers = []
    records = _records(values)
    for lo in range(0, len(records), 37):
        res = process_batch(records[lo : lo + 37], store, model, CFG)
        assert not res.dead_letters
        answers += res.recommendations
    clicks = [json.loads(v) for _, v in values if json.loads(v)["type"] == "click"]
    # one answer per click, in stream order per partition: match them by (session, time, item)
    index = {(c["session_id"], c["timestamp"], c["item_id"]): n for n, c in enumerate(clicks)}
    assert len(answers) == len(clicks) == len(index)
    got: dict[int, tuple[list[str], list[float]]] = {}
    for a in answers:
        got[index[(a.session_id, a.event_time, a.item_id)]] = (a.items, a.scores)
    later = later_session_clicks(values)
    assert sum(later) > 100
    for n, (items, scores) in sorted(got.items()):
        np.testing.assert_allclose(scores, ref[n][1], rtol=1e-4, atol=1e-5, err_msg=str(n))
        assert items == ref[n][0] or np.ptp(scores) == 0, n
    # the offline per-user evaluation of the held-out last sessions, from the live answers
    test_ids = set(test["SessionId"])
    rank = []
    for n, c in enumerate(clicks):
        nxt = next((d for d in clicks[n + 1 :] if d["session_id"] == c["session_id"]), None)
        if c["session_id"] in test_ids and nxt is not None:
            items = got[n][0]
            rank.append(items.index(nxt["item_id"]) + 1 if nxt["item_id"] in items else 0)
    offline = evaluate_users(model.model, train, test, model.item_index, ks=(20,))
    assert len(rank) == offline["n_events"] > 0
    assert np.mean([x > 0 for x in rank]) == pytest.approx(offline["recall@20"], abs=1e-9)
    mrr = np.mean([1 / x if x else 0.0 for x in rank])
    assert mrr == pytest.approx(offline["mrr@20"], abs=1e-6)


def _older_version(trained_hrnn: Path) -> ServingModel:
    """The same architecture with other weights: what served before the swap."""
    from streamrec.model.hrnn import HRNN

    net = load_checkpoint(trained_hrnn, "cpu").model
    assert isinstance(net, HRNN)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    new = ServingModel.from_checkpoint(trained_hrnn, "cpu", top_k=20)
    return ServingModel(net, list(new.item_ids), "older", device="cpu", top_k=20)


def test_the_sweep_reencodes_a_session_from_before_a_swap_then_ends_it(
    trained_hrnn: Path,
) -> None:
    """A user's sessions applied under an older version; then the new version is swapped in
    and the sweep ends the idle open session. The user's state must be what the new version
    makes of the same sessions (as if it had served them all): the user re-encoded from its
    past sessions, the open session from its items, then ended."""
    old = _older_version(trained_hrnn)
    new = ServingModel.from_checkpoint(trained_hrnn, "cpu", top_k=20)
    assert old.version != new.version
    t0 = 1.767e9
    sessions = {"a": ["3", "17", "8"], "b": ["25", "4"], "c": ["11", "30", "2", "9"]}
    values: list[Record] = []
    t = t0
    for sid, items in sessions.items():
        for item in items:
            values.append(Record(click(sid, item, user="u", t=t), b"u", "clicks", 0, len(values)))
            t += 60.0
    swept_at = t + GAP + 1

    def serve(model: ServingModel) -> StateStore:
        store = StateStore()
        process_batch(values, store, model, CFG)
        return store

    # the reference: the new version served every click, then swept
    expected = serve(new)
    assert sweep_idle(expected, new, CFG, now=swept_at).sessions_ended == 1
    want = expected.get_user("u:u")
    assert want is not None and want.version == new.version
    # the states as the older version left them, swept after the swap
    store = serve(old)
    before = store.get_session("u:u")
    assert before is not None and before.version == "older" and before.session_id == "c"
    res = sweep_idle(store, new, CFG, now=swept_at)
    assert res.sessions_ended == 1 and store.get_session("u:u") is None
    user = store.get_user("u:u")
    assert user is not None
    assert user.version == new.version
    assert user.sessions == [sessions["a"], sessions["b"], sessions["c"]]
    np.testing.assert_allclose(user.context, want.context, rtol=1e-5, atol=1e-5)
    # not vacuous: ending the stale state (as the older version left it) gives another user
    ctx = new.encode_users([[sessions["a"], sessions["b"]]])
    stale = new.end_session(ctx, before.hidden[None])[0]
    assert np.abs(stale - want.context).max() > 1e-2
    unswept = serve(old)
    sweep_idle(unswept, old, CFG, now=swept_at)
    old_user = unswept.get_user("u:u")
    assert old_user is not None and np.abs(old_user.context - want.context).max() > 1e-2
