"""GRU4Rec's session memory on HRNN's session part and on p-RNN (``session_memory`` > 0): the
scores, the state, the fit on held-out sessions in ``trainer.hier``, checkpoints, warm starts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from streamrec.data.synthetic import generate_clicks
from streamrec.model.checkpoint import load_checkpoint, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec
from streamrec.model.hrnn import HRNN
from streamrec.model.items import build_item_index
from streamrec.model.prnn import PRNN
from streamrec.model.session_memory import SessionMemory
from trainer.data import split_last_session_out
from trainer.hier import HRNNParams, PRNNParams, evaluate_users, train_hier
from trainer.hier.memory import HierMemoryHead, collect_held_out, held_out_sessions
from trainer.warmstart import train_hier_warm

pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS = 30
OPTS: dict[str, Any] = dict(
    layers=[12], user_layers=[6], variant="all", user_to_output=True, memory=5
)


def _hrnn(session_memory: int, seed: int = 3, **kw: Any) -> HRNN:
    torch.manual_seed(seed)
    return HRNN(N_ITEMS, **{**OPTS, **kw}, session_memory=session_memory, memory_gate=True)


def _loud(m: HRNN, seed: int = 1) -> HRNN:
    """``m`` with random weights where HRNN starts at zero (user path, both memories' offsets):
    every term of the scores counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("W_init", "Wuy", "memory_bias", "session_memory_", "By")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        g0 = m._cell(m.G, 0).weight_ih
        g0.copy_(torch.randn(g0.shape, generator=gen) * 0.3)
    return m.eval()


def _sessions(m: HRNN, rows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two sessions per slot (``rows`` ``[T, B]`` each): the score matrices and user states."""
    scores, users = [], []
    user = m.initial_user_state(rows.shape[1])
    with torch.no_grad():
        for _ in range(2):
            state = m.initial_state(user, rows.shape[1])
            for r in rows:
                state, s = m.step(r, state, user)
                scores.append(s)
            user = m.end_session(user, state)
            users.append(user)
    return scores, users


def _rows(seed: int = 0) -> torch.Tensor:
    """Clicks of 4 slots over 7 steps, many repeats, an unknown item (-1)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 8, (7, 4), generator=gen)
    rows[3, 1] = -1
    return rows


def _offsets_by_hand(
    paper: torch.Tensor, memory: SessionMemory, out: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """``paper`` scores plus each filled slot's offset on its item, one slot at a time."""
    want = paper.clone()
    offsets = memory.slot_offsets(out, slots)
    for b in range(slots.shape[0]):
        for k in range(slots.shape[1]):
            if slots[b, k] > 0:
                want[b, int(slots[b, k]) - 1] += offsets[b, k]
    return want


def test_a_silent_session_memory_scores_and_folds_as_without() -> None:
    """Offsets at zero: the same scores, and the same user states (the user memory folds the
    session's items, not the session memory's slots, at end_session)."""
    with_mem, without = _hrnn(6), _hrnn(0)
    with torch.no_grad():  # the same weights, the user path loud, the session memory silent
        _loud(without)
        for name, p in with_mem.named_parameters():
            if not name.startswith("session_memory_"):
                p.copy_(dict(without.named_parameters())[name])
    with_mem.eval()
    assert with_mem.state_dim == without.state_dim + 6
    a_scores, a_users = _sessions(with_mem, _rows())
    b_scores, b_users = _sessions(without, _rows())
    for a, b in zip(a_scores, b_scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(a_users, b_users, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_offsets_enter_every_scoring_path_alike() -> None:
    """step == the paper's scores plus the offsets of the session's items; score_rows gives
    score_all's scores of any rows; offset_rows names every row whose score is not the inner
    product (the user memory's and the session memory's)."""
    m = _loud(_hrnn(6))
    memory = m.session_memory()
    assert memory is not None
    user = m.end_session(m.initial_user_state(4), m.initial_state(None, 4))
    state = m.initial_state(user, 4)
    with torch.no_grad():
        for r in _rows():
            state, scores = m.step(r, state, user)
            out = m.output(state)
            paper = m.score_items(out, user)
            slots = m.memory_of(state)
            assert (slots > 0).any()
            torch.testing.assert_close(scores, _offsets_by_hand(paper, memory, out, slots))
            every = torch.arange(N_ITEMS).expand(4, -1)
            torch.testing.assert_close(m.score_rows(state, user, every), scores)
            inner = m.query_vectors(state, user) @ m.item_vectors().T
            off = m.offset_rows(user, state)
            assert off is not None
            differs = (scores - inner).abs() > 1e-5
            for b in range(4):
                named = set(off[b].tolist())
                assert set(differs[b].nonzero().squeeze(1).tolist()) <= named
                assert {int(x) - 1 for x in slots[b] if x > 0} <= named


def test_from_gru4rec_carries_the_session_memory() -> None:
    """Without a user path, the HRNN made from a GRU4Rec with a fitted session memory scores
    as that GRU4Rec (the offsets are the session memory's, not the user memory's)."""
    g = GRU4Rec.from_config({"n_items": N_ITEMS, "layers": [12], "session_memory": 6,
                             "memory_gate": True}, seed=3)  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        g.memory_bias.copy_(torch.randn(g.memory_bias.shape, generator=gen))
        g.memory_gate_weight.copy_(torch.randn(g.memory_gate_weight.shape, generator=gen))
    g.eval()
    h = HRNN.from_gru4rec(g, variant="none").eval()
    assert h.session_slots == 6 and h.memory_gate
    s_g, s_h = g.initial_state(None, 4), h.initial_state(h.initial_user_state(4), 4)
    with torch.no_grad():
        for r in _rows():
            s_g, a = g.step(r, s_g)
            s_h, b = h.step(r, s_h, h.initial_user_state(4))
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope="module")
def log() -> tuple[pd.DataFrame, pd.DataFrame]:
    return split_last_session_out(generate_clicks(150, N_ITEMS, 15, seed=4))


PARAMS: dict[str, Any] = dict(n_epochs=2, batch_size=8, n_sample=0, device="cpu", session_memory=6)


def _train(
    train: pd.DataFrame, log: list[str] | None = None, **kw: Any
) -> tuple[HRNN, dict[str, int], dict]:
    ids, index = build_item_index(train["ItemId"])
    torch.manual_seed(5)
    p = HRNNParams(**{**PARAMS, **kw})
    m = HRNN(len(ids), variant="init", **p.model_options())
    return m, index, train_hier(m, train, index, p, log=None if log is None else log.append)


def test_held_out_predictions_start_from_the_users_earlier_sessions(
    log: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    """What the head is fitted on: the predictions of the held-out sessions, each session
    from the user state of all its user's earlier sessions (as served and evaluated)."""
    train, _ = log
    ids, index = build_item_index(train["ItemId"])
    m = _loud(HRNN(len(ids), **OPTS, session_memory=6, memory_gate=True))
    held = held_out_sessions(train, 0.3, seed=1)
    data = collect_held_out(m, train, held, index)
    # by hand: every user's sessions in time order, the held-out ones' predictions kept
    want_out, want_target = [], []
    first_time = train.groupby("UserId")["Time"].transform("min")
    d = train.assign(_held=held, _first=first_time, _start=train.groupby("SessionId")["Time"]
                     .transform("min")).sort_values(["_first", "UserId", "_start", "SessionId",
                                                     "Time"], kind="stable")  # fmt: skip
    with torch.no_grad():
        for _, events in d.groupby("UserId", sort=False):
            user = m.initial_user_state(1)
            for _, sess in events.groupby("SessionId", sort=False):
                state = m.initial_state(user, 1)
                items = [index[str(i)] for i in sess["ItemId"]]
                for t, row in enumerate(items):
                    state, _ = m.forward_step(torch.tensor([row]), state, user)
                    if sess["_held"].iloc[0] and t + 1 < len(items):
                        want_out.append(m.output(state)[0])
                        want_target.append(items[t + 1])
                user = m.end_session(user, state)
    assert len(data) == len(want_out) > 20

    def in_order(outputs: torch.Tensor) -> torch.Tensor:  # the collector batches users
        keys = outputs[:, 0] * 1000 + outputs[:, 1]
        return outputs[torch.argsort(keys)]

    torch.testing.assert_close(in_order(data.output), in_order(torch.stack(want_out)))


def test_training_holds_sessions_out_then_fits_the_head(
    log: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    """Every epoch but the last trains without the held-out sessions; the head is fitted on
    them (its offsets move, the smooth reciprocal rank rises) and the loop's optimiser never
    touches it; evaluation scores with it."""
    train, test = log
    m = _hrnn(6)
    head = HierMemoryHead.build(m, train, 0.2, 7, n_epochs=3)
    assert head.kept is not None and head.held is not None
    assert len(head.frame(0)) == len(head.frame(1)) == int((~head.held).sum()) < len(train)
    assert head.frame(2) is train and head.due(2) and not head.due(1)
    lines: list[str] = []
    model, index, stats = _train(train, lines, memory_holdout=0.2)
    events = [int(line.split()[-1]) for line in lines if " events " in line]
    assert len(events) == 4  # residual: 2 stages of 2 epochs
    assert events[0] == events[1] == events[2] < events[3]  # the last on every session
    fit = stats["memory_head"]
    assert fit["events"] > 0 and fit["reciprocal_rank_after"] > fit["reciprocal_rank_before"]
    assert float(model.session_memory_bias.detach().abs().sum()) > 0
    assert all(p.requires_grad for p in model.parameters())
    silent = copy.deepcopy(model)
    with torch.no_grad():
        for p in silent.session_memory_parameters():
            p.zero_()
    assert evaluate_users(model, train, test, index) != evaluate_users(silent, train, test, index)


def test_without_the_holdout_the_memory_changes_nothing(
    log: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    """memory_holdout=0: the offsets stay 0 and training is the model's without the memory,
    to the bit in float64 (in float32 the wider state makes the GRU's inputs slices of another
    stride, which the matrix kernels round differently)."""
    train, test = log
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        idle, index, stats = _train(train, memory_holdout=0.0)
        paper, _, _ = _train(train, session_memory=0)
        same = evaluate_users(idle, train, test, index) == evaluate_users(paper, train, test, index)
    finally:
        torch.set_default_dtype(dtype)
    assert "memory_head" not in stats
    want = dict(paper.named_parameters())
    for name, p in idle.named_parameters():
        if name.startswith("session_memory_"):
            assert not p.any()
        else:
            torch.testing.assert_close(p, want[name], rtol=0, atol=0)
    assert same


def test_checkpoint_and_warm_start_keep_the_session_memory(
    log: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    train, test = log
    model, index, _ = _train(train)
    ids = list(index)
    save_checkpoint(tmp_path / "m", model, "hrnn", ids)
    back = load_checkpoint(tmp_path / "m").model
    assert isinstance(back, HRNN) and back.session_slots == 6
    assert evaluate_users(back, train, test, index) == evaluate_users(model, train, test, index)
    p = HRNNParams(**{**PARAMS, "n_epochs": 2})
    warm, _, stats, _ = train_hier_warm("hrnn", copy.deepcopy(model), ids, train, p)
    assert isinstance(warm, HRNN) and warm.session_slots == 6
    assert stats["memory_head"]["events"] > 0


def test_a_checkpoint_config_without_the_session_memory_loads() -> None:
    """Checkpoints written before the option have no ``session_memory`` in their config."""
    old = _hrnn(0).config_dict()
    for key in ("session_memory", "memory_gate"):
        old.pop(key)
    m = HRNN.from_config(old, seed=1)
    assert m.session_slots == 0 and m.state_dim == 12 + 5


def test_the_papers_hrnn_has_no_session_memory() -> None:
    """On by default (measured on a validation split), off in the papers' presets."""
    for cls in (HRNNParams, PRNNParams):
        assert cls().session_memory == 64 and cls().memory_holdout > 0 and cls().memory_gate
    assert HRNNParams.make("hrnn_paper_small").session_memory == 0
    assert HRNNParams.make("yoochoose_xe_shared_best_paper", ["session_memory=8"]).session_memory
    assert HRNNParams.make("yoochoose_xe_shared_best_paper").session_memory == 0


# ---------------------------------------------------------------------------------- p-RNN


def _prnn(session_memory: int, seed: int = 3) -> PRNN:
    torch.manual_seed(seed)
    feats = [torch.rand(N_ITEMS, 4, generator=torch.Generator().manual_seed(1))]
    return PRNN(N_ITEMS, [4], arch="parallel", id_hidden=8, feature_hidden=6,
                feature_values=feats, session_memory=session_memory,
                memory_gate=True).eval()  # fmt: skip


def test_prnn_with_a_silent_session_memory_scores_as_without() -> None:
    with_mem, without = _prnn(6), _prnn(0)
    assert with_mem.state_dim == without.state_dim + 6
    s_a, s_b = with_mem.initial_state(None, 4), without.initial_state(None, 4)
    with torch.no_grad():
        for r in _rows():
            s_a, a = with_mem.step(r, s_a)
            s_b, b = without.step(r, s_b)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(s_a[:, : without.state_dim], s_b, rtol=0, atol=0)


def test_prnn_offsets_enter_every_scoring_path_alike() -> None:
    m = _prnn(6)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.session_memory_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    memory = m.session_memory()
    assert memory is not None
    state = m.initial_state(None, 4)
    with torch.no_grad():
        for r in _rows():
            state, scores = m.step(r, state)
            out, slots = m.output(state), m.memory_of(state)
            want = _offsets_by_hand(m.score_items(out), memory, out, slots)
            torch.testing.assert_close(scores, want)
            every = torch.arange(N_ITEMS).expand(4, -1)
            torch.testing.assert_close(m.score_rows(state, None, every), scores)
            inner = m.query_vectors(state) @ m.item_vectors().T
            off = m.offset_rows(None, state)
            assert off is not None
            differs = (scores - inner).abs() > 1e-5
            for b in range(4):
                assert set(differs[b].nonzero().squeeze(1).tolist()) <= set(off[b].tolist())


def test_prnn_training_fits_the_head_and_a_checkpoint_keeps_it(
    log: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    train, test = log
    ids, index = build_item_index(train["ItemId"])
    p = PRNNParams(n_epochs=2, batch_size=8, n_sample=0, device="cpu", session_memory=6,
                   memory_holdout=0.2)  # fmt: skip
    torch.manual_seed(5)
    m = PRNN(len(ids), arch="id", id_hidden=12, session_memory=6, memory_gate=True)
    lines: list[str] = []
    stats = train_hier(m, train, index, p, log=lines.append)
    events = [int(line.split()[-1]) for line in lines if " events " in line]
    assert events[0] < events[1]  # the first epoch without the held-out sessions
    fit = stats["memory_head"]
    assert fit["events"] > 0 and fit["reciprocal_rank_after"] > fit["reciprocal_rank_before"]
    save_checkpoint(tmp_path / "p", m, "prnn", ids)
    back = load_checkpoint(tmp_path / "p").model
    assert isinstance(back, PRNN) and back.session_slots == 6
    assert evaluate_users(back, train, test, index) == evaluate_users(m, train, test, index)


@pytest.mark.parametrize("model_name", ["prnn", "hrnn"])
def test_a_one_epoch_run_trains_the_held_out_sessions_after_the_fit(
    log: tuple[pd.DataFrame, pd.DataFrame], model_name: str
) -> None:
    """With one epoch in the plan (a warm-start retrain), the head is fitted on sessions the
    model has not seen, then those sessions are trained on too: every event once."""
    train, _ = log
    ids, index = build_item_index(train["ItemId"])

    def run(holdout: float) -> tuple[list[int], dict]:
        torch.manual_seed(5)
        if model_name == "prnn":
            m: PRNN | HRNN = PRNN(len(ids), arch="id", id_hidden=12, session_memory=6)
            p: PRNNParams | HRNNParams = PRNNParams(
                n_epochs=1, batch_size=8, n_sample=0, device="cpu", memory_holdout=holdout
            )
        else:
            p = HRNNParams(**{**PARAMS, "schedule": "joint", "n_epochs": 1,
                              "memory_holdout": holdout})  # fmt: skip
            m = HRNN(len(ids), variant="init", **p.model_options())
        lines: list[str] = []
        stats = train_hier(m, train, index, p, log=lines.append)
        return [int(line.split()[-1]) for line in lines if " events " in line], stats

    whole, _ = run(0.0)
    split, stats = run(0.3)
    assert len(whole) == 1 and len(split) == 2
    kept, held = split
    assert 0 < held < kept and kept + held == whole[0] == stats["train_events"]
    assert stats["memory_head"]["events"] > 0
