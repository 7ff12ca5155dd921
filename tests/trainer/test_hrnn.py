"""HRNN: user-parallel batching, equivalence with GRU4Rec, init/all wiring, data protocol, and
learning planted per-user preferences."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from streamrec.data.clicklog import sessionize
from streamrec.data.synthetic import generate_clicks
from streamrec.model.checkpoint import load_checkpoint, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec
from streamrec.model.hrnn import HRNN
from streamrec.model.items import build_item_index
from streamrec.model.prnn import PRNN
from trainer.data import filter_users, split_last_session_out
from trainer.hier import (
    HierParams,
    HRNNParams,
    PopStepModel,
    advance_at_boundaries,
    evaluate_users,
    session_parallel_batches,
    train_hier,
    user_parallel_batches,
)
from trainer.hier.chain import UserChain

pytestmark = pytest.mark.usefixtures("one_thread")


def _log(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["UserId", "SessionId", "ItemId", "Time"])


# user a: sessions a1 (3 events), a2 (2); user b: b1 (2); user c: c1 (2), c2 (2)
TINY = _log(
    [
        ("a", "a1", "x", 1.0),
        ("a", "a1", "y", 2.0),
        ("a", "a1", "z", 3.0),
        ("b", "b1", "y", 1.5),
        ("b", "b1", "x", 2.5),
        ("a", "a2", "z", 10.0),
        ("a", "a2", "x", 11.0),
        ("c", "c1", "x", 20.0),
        ("c", "c1", "z", 21.0),
        ("c", "c2", "y", 30.0),
        ("c", "c2", "q", 31.0),  # q: unknown to the item index
    ]
)
INDEX = {"x": 0, "y": 1, "z": 2}


def test_user_parallel_batches_hand_made():
    b = user_parallel_batches(TINY, INDEX, batch_size=2)
    # users by first event: a (t=1), b (1.5), c (20); a -> slot 0, b -> slot 1, c takes slot 1
    # when b ends after 2 steps
    assert b.slot_of_user == {"a": 0, "b": 1, "c": 1}
    assert b.n_steps == 6
    np.testing.assert_array_equal(b.inputs[:, 0], [0, 1, 2, 2, 0, -1])
    np.testing.assert_array_equal(b.inputs[:, 1], [1, 0, 0, 2, 1, -1])  # c2's q unknown
    np.testing.assert_array_equal(b.targets[:, 0], [1, 2, -1, 0, -1, -1])
    np.testing.assert_array_equal(b.targets[:, 1], [0, -1, 2, -1, -1, -1])
    np.testing.assert_array_equal(b.session_start[:, 0], [1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(b.session_start[:, 1], [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(b.user_start[:, 0], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.user_start[:, 1], [1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(b.position[:, 0], [0, 1, 2, 0, 1, -1])
    np.testing.assert_array_equal(b.position[:, 1], [0, 1, 0, 1, 0, 1])


def test_user_state_advances_at_session_ends_and_resets_at_user_change():
    torch.manual_seed(0)
    m = _wake_user_path(HRNN(3, layers=[4], user_layers=[3], variant="init")).eval()
    b = user_parallel_batches(TINY, INDEX, batch_size=2)
    user: torch.Tensor | None = m.initial_user_state(2)
    state = m.initial_state(user, 2)
    users, states = [], []
    with torch.no_grad():
        for t in range(b.n_steps):
            assert user is not None
            prev_u, prev_s = user.clone(), state.clone()
            state, user = advance_at_boundaries(
                m,
                state,
                user,
                torch.from_numpy(b.session_start[t]),
                torch.from_numpy(b.user_start[t]),
            )
            assert user is not None
            users.append(user.clone())
            # user state changes only at session starts; at a user start it is the empty one
            for s in range(2):
                if b.user_start[t, s]:
                    assert torch.equal(user[s], torch.zeros(3))
                elif b.session_start[t, s]:
                    expect = m.end_session(prev_u[s : s + 1], prev_s[s : s + 1])[0]
                    assert torch.allclose(user[s], expect)
                    assert not torch.allclose(user[s], prev_u[s])
                else:
                    assert torch.equal(user[s], prev_u[s])
            state, _ = m.step(torch.from_numpy(b.inputs[t]), state, user)
            states.append(state.clone())
    # reference: each user alone, session by session, through the step API
    with torch.no_grad():
        for uid, sessions, steps in (
            ("a", [[0, 1, 2], [2, 0]], [0, 3]),
            ("c", [[0, 2], [1, -1]], [2, 4]),
        ):
            slot = b.slot_of_user[uid]
            us = m.initial_user_state(1)
            for items, t0 in zip(sessions, steps, strict=True):
                assert torch.allclose(users[t0][slot], us[0], atol=1e-6)
                st = m.initial_state(us, 1)
                for k, it in enumerate(items):
                    st, _ = m.step(torch.tensor([it]), st, us)
                    assert torch.allclose(states[t0 + k][slot], st[0], atol=1e-6)
                us = m.end_session(us, st)
    # an unknown item keeps the state (c2's "q" at step 5 of slot 1)
    assert torch.equal(states[5][1], states[4][1])


def test_hrnn_without_user_path_equals_gru4rec():
    g = GRU4Rec.from_config({"n_items": 25, "layers": [12]}, seed=3).eval()
    h = HRNN.from_gru4rec(g, variant="none").eval()
    rows = torch.randint(-1, 25, (6, 5))
    s_g, s_h = g.initial_state(None, 5), h.initial_state(h.initial_user_state(5), 5)
    with torch.no_grad():
        for r in rows:
            s_g, a = g.step(r, s_g)
            s_h, b = h.step(r, s_h, h.initial_user_state(5))
            assert torch.equal(a, b)
    # and the same per-user evaluation
    df = generate_clicks(n_sessions=60, n_items=25, n_users=10, seed=1)
    tr, te = split_last_session_out(df)
    idx = {str(i): i for i in range(25)}
    assert evaluate_users(g, tr, te, idx) == pytest.approx(evaluate_users(h, tr, te, idx))
    # first_n=1: one ranked event (the second click) per test session
    assert evaluate_users(h, tr, te, idx, first_n=1)["n_events"] == te["SessionId"].nunique()


def test_hrnn_variant_none_user_path_really_off():
    m = HRNN(10, layers=[6], user_layers=[5], variant="none").eval()
    u = torch.randn(2, 5)
    assert torch.equal(m.initial_state(u, 2), torch.zeros(2, 6))
    assert torch.equal(m.end_session(u, torch.randn(2, 6)), u)


def _wake_user_path(m: HRNN) -> HRNN:
    """Random weights where the user state enters (they start at zero: HRNN == GRU4Rec)."""
    with torch.no_grad():
        for name, q in m.named_parameters():
            if name.startswith("W_init") or name in ("G.0.weight_ih", "Wuy"):
                q.uniform_(-0.5, 0.5)
    return m


@pytest.mark.parametrize("variant", ["init", "all"])
def test_user_path_is_silent_at_init(variant):
    """At initialisation HRNN scores as the GRU4Rec with its session weights, whatever the
    user state: the user path can only add what training finds useful."""
    g = GRU4Rec.from_config({"n_items": 20, "layers": [8]}, seed=4).eval()
    torch.manual_seed(2)
    h = HRNN.from_gru4rec(g, variant=variant, user_layers=[5], user_to_output=True).eval()
    fresh = HRNN(20, layers=[8], user_layers=[5], variant=variant, user_to_output=True).eval()
    rows = torch.randint(0, 20, (4, 3))
    with torch.no_grad():
        for m in (h, fresh):
            for u in (torch.randn(3, 5), torch.randn(3, 5) * 3):
                assert torch.equal(m.initial_state(u, 3), torch.zeros(3, 8))
        s_g, s_h = g.initial_state(None, 3), h.initial_state(torch.randn(3, 5), 3)
        u = torch.randn(3, 5)
        for r in rows:
            s_g, a = g.step(r, s_g)
            s_h, b = h.step(r, s_h, u)
            assert torch.allclose(a, b, atol=1e-6)
        # and training moves it: a woken user path changes the scores
        _wake_user_path(h)
        a = h.step(rows[0], h.initial_state(u, 3), u)[1]
        b = h.step(rows[0], h.initial_state(u + 1, 3), u + 1)[1]
        assert not torch.allclose(a, b)


def test_session_gru_init_is_gru4recs():
    """Each gate block of the session GRU has GRU4Rec's own Glorot range (not one range over
    the stacked [3h, in] matrix); the user GRU likewise."""
    torch.manual_seed(0)
    m = HRNN(50, layers=[64], user_layers=[32], variant="init")
    ws = dict(m.named_parameters())
    for w, fan in ((ws["G.0.weight_ih"], 64 + 64), (ws["U.0.weight_ih"], 32 + 64)):
        bound = (6.0 / fan) ** 0.5
        for block in w.detach().chunk(3, 0):
            assert block.abs().max() <= bound
            assert block.abs().max() > 0.9 * bound  # the full range, not sqrt(6/(3h+in))


@pytest.mark.parametrize("variant", ["init", "all"])
def test_user_state_reaches_session_gru_only_in_all(variant):
    torch.manual_seed(0)
    m = _wake_user_path(HRNN(10, layers=[6], user_layers=[5], variant=variant)).eval()
    state = torch.randn(3, 6)
    user = torch.randn(3, 5, requires_grad=True)
    new, _ = m.forward_step(torch.tensor([1, 2, 3]), state, user)
    (g,) = torch.autograd.grad(new.sum(), user, allow_unused=True)
    reaches = g is not None and g.abs().sum() > 0
    assert reaches == (variant == "all")
    # perturbation: same session state, another user state
    with torch.no_grad():
        a, _ = m.step(torch.tensor([1, 2, 3]), state, user)
        b, _ = m.step(torch.tensor([1, 2, 3]), state, user + 1.0)
    assert torch.equal(a, b) == (variant == "init")
    # both variants initialise the session from the user state
    with torch.no_grad():
        assert not torch.allclose(m.initial_state(user, 3), m.initial_state(user + 1.0, 3))


def test_first_session_starts_from_learnt_init_of_empty_user():
    m = HRNN(10, layers=[6], user_layers=[5]).eval()
    with torch.no_grad():
        m.W_init.bias.fill_(0.5)
        s = m.initial_state(m.initial_user_state(2), 2)
    assert torch.allclose(s, torch.full((2, 6), float(np.tanh(0.5))))


def test_user_to_output_adds_user_term():
    m = HRNN(10, layers=[6], user_layers=[5], user_to_output=True).eval()
    out = torch.randn(2, 6)
    u = torch.randn(2, 5)
    with torch.no_grad():
        diff = m.score_items(out, u) - m.score_items(out, torch.zeros(2, 5))
    assert torch.allclose(diff, u @ m.Wuy.T, atol=1e-6)


def test_sessionize_and_last_session_out_hand_made():
    df = pd.DataFrame(
        {
            "UserId": ["u", "u", "u", "u", "v", "v", "v", "v"],
            "ItemId": ["a", "b", "b", "a", "b", "a", "a", "c"],
            "Time": [0.0, 100.0, 5000.0, 5050.0, 0.0, 10.0, 9000.0, 9001.0],
        }
    )
    s = sessionize(df, gap_seconds=1800)
    assert s["SessionId"].tolist() == ["u:0", "u:0", "u:1", "u:1", "v:0", "v:0", "v:1", "v:1"]
    tr, te = split_last_session_out(s)
    # v's last session (a, c) loses c, unseen in training, and with one event left is dropped
    assert te["SessionId"].tolist() == ["u:1", "u:1"]
    assert te["ItemId"].tolist() == ["b", "a"]
    assert set(tr["SessionId"]) == {"u:0", "v:0"}


def test_checkpoint_round_trip(tmp_path):
    m = HRNN(6, layers=[4], user_layers=[3], variant="all", user_to_output=True).eval()
    save_checkpoint(tmp_path / "ck", m, "hrnn", list("abcdef"))
    ck = load_checkpoint(tmp_path / "ck")
    assert isinstance(ck.model, HRNN)
    assert ck.model.variant == "all" and ck.model.user_to_output
    rows = torch.tensor([0, 3])
    u = torch.randn(2, 3)
    with torch.no_grad():
        a = m.step(rows, m.initial_state(u, 2), u)[1]
        b = ck.model.step(rows, ck.model.initial_state(u, 2), u)[1]
    assert torch.equal(a, b)


def test_hrnn_beats_pop_on_planted_user_preferences():
    df = generate_clicks(
        n_sessions=800, n_items=120, n_users=100, n_topics=8, seed=5, user_concentration=0.1
    )
    df = filter_users(df, min_sessions=3, min_session_length=2, min_item_support=2)
    tr, te = split_last_session_out(df)
    _, idx = build_item_index(tr["ItemId"])
    p = HierParams(n_epochs=3, batch_size=32, learning_rate=0.1, n_sample=32, seed=1)
    m = HRNN(len(idx), layers=[48], user_layers=[48], variant="init")
    stats = train_hier(m, tr, idx, p)
    assert stats["epoch_losses"][-1] < stats["epoch_losses"][0]
    res = evaluate_users(m, tr, te, idx, ks=(5, 20))
    pop = evaluate_users(PopStepModel.from_log(tr, idx), tr, te, idx, ks=(5, 20))
    assert res["n_events"] == pop["n_events"] > 100
    assert res["recall@20"] > pop["recall@20"] + 0.1, (res, pop)
    assert res["mrr@20"] > 1.5 * pop["mrr@20"], (res, pop)


def test_cli_train_and_evaluate_hrnn_and_prnn(tmp_path):
    import json

    from click.testing import CliRunner

    from trainer.cli import main

    df = generate_clicks(n_sessions=200, n_items=40, n_users=30, seed=2)
    tr, te = split_last_session_out(df)
    tr.to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    te.to_csv(tmp_path / "test.tsv", sep="\t", index=False)
    items = pd.DataFrame({"ItemId": [str(i) for i in range(40)], "Genres": ["a b"] * 40})
    items.to_csv(tmp_path / "items.tsv", sep="\t", index=False)
    common = ["--train", str(tmp_path / "train.tsv"), "--test", str(tmp_path / "test.tsv")]
    common += ["--k", "5", "20", "--no-progress"]
    runner = CliRunner()
    hrnn = ["--model", "hrnn", "--variant", "all", "--out", str(tmp_path / "h")]
    r = runner.invoke(
        main, ["train", *common, *hrnn, "--param", "n_epochs=1", "layers=16", "user_layers=8"]
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert m["model"] == "hrnn"
    ck = load_checkpoint(tmp_path / "h")
    assert isinstance(ck.model, HRNN) and ck.model.variant == "all"
    # the reported metrics are the kept model's, evaluated afresh per user
    want = evaluate_users(ck.model, tr, te, ck.item_index, ks=(5, 20))
    known = te[te["ItemId"].isin(ck.item_index)]
    assert m["n_events"] == want["n_events"] > 0
    assert want["n_events"] <= len(known) - known["SessionId"].nunique()
    for key in ("recall@5", "mrr@5", "recall@20", "mrr@20"):
        assert m[key] == pytest.approx(want[key], abs=1e-9), key
    prnn = ["--model", "prnn", "--item-meta", str(tmp_path / "items.tsv")]
    prnn += ["--schedule", "alternating", "--out", str(tmp_path / "p")]
    prnn += ["--param", "n_epochs=1", "id_hidden=8", "feature_hidden=4"]
    r = runner.invoke(main, ["train", *common, *prnn])
    assert r.exit_code == 0, r.output
    prnn_model = load_checkpoint(tmp_path / "p").model
    assert isinstance(prnn_model, PRNN) and prnn_model.arch == "parallel"
    bad = ["--model", "hrnn", "--param", "nope=1", "--out", str(tmp_path / "x")]
    r = runner.invoke(main, ["train", *common, *bad])
    assert r.exit_code != 0 and "nope" in r.output


def test_cli_holds_out_each_users_last_session(tmp_path):
    import json

    from click.testing import CliRunner

    from trainer.cli import main

    df = generate_clicks(n_sessions=200, n_items=40, n_users=30, seed=4)
    df.to_csv(tmp_path / "log.tsv", sep="\t", index=False)
    _, expected_test = split_last_session_out(df)
    args = ["train", "--train", str(tmp_path / "log.tsv"), "--split", "last-session"]
    args += ["--model", "hrnn", "--k", "20", "--no-progress", "--out", str(tmp_path / "h")]
    args += ["--param", "n_epochs=1", "layers=16", "user_layers=8"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "h" / "metrics.json").read_text())
    # every event of a held-out session after its first is ranked
    assert m["n_events"] == len(expected_test) - expected_test["SessionId"].nunique()
    both = CliRunner().invoke(main, [*args[:5], "--test", str(tmp_path / "log.tsv"), *args[5:]])
    assert both.exit_code != 0 and "either --test or --split" in both.output


def test_session_parallel_batches_hand_made():
    # sessions by start: a1 (t=1), b1 (1.5), a2 (10), c1 (20), c2 (30)
    b = session_parallel_batches(TINY, INDEX, batch_size=2)
    np.testing.assert_array_equal(b.user, [0, 1, 0, 2, 2])
    np.testing.assert_array_equal(b.tail, [2, 0, 0, 2, -1])  # c2 ends with the unknown q
    # slot 1 frees at step 1; a2's user is busy in slot 0 until step 2, so c1 goes first
    np.testing.assert_array_equal(b.session, [[0, 1], [0, 3], [2, 4]])
    np.testing.assert_array_equal(b.inputs, [[0, 1], [1, 0], [2, 1]])
    np.testing.assert_array_equal(b.targets, [[1, 0], [2, 2], [0, -1]])
    np.testing.assert_array_equal(b.start, [[1, 1], [0, 1], [1, 1]])
    np.testing.assert_array_equal(b.end, [[0, 1], [1, 1], [1, 1]])


def test_session_parallel_batches_keep_each_user_sequential():
    df = generate_clicks(n_sessions=400, n_items=40, n_users=15, seed=3)
    idx = {str(i): i for i in range(40)}
    b = session_parallel_batches(df, idx, batch_size=8)
    n_sess = len(b.user)
    t_of, s_of = np.nonzero(b.start)
    start = np.empty(n_sess, dtype=np.int64)
    start[b.session[t_of, s_of]] = t_of
    t_end, s_end = np.nonzero(b.end)
    end = np.empty(n_sess, dtype=np.int64)
    end[b.session[t_end, s_end]] = t_end
    for u in np.unique(b.user):
        j = np.flatnonzero(b.user == u)  # the user's sessions, in time order
        assert (start[j[1:]] > end[j[:-1]]).all()  # next starts after the previous ended
    # every next-item pair of the log is trained exactly once
    pairs = sum(len(g) - 1 for _, g in df.groupby("SessionId"))
    assert int((b.targets >= 0).sum()) == pairs
    # in time order, up to the deferrals of busy users; and the slots are kept busy
    assert np.corrcoef(np.arange(n_sess), start)[0, 1] > 0.95
    assert (b.session >= 0).mean() > 0.8


@pytest.mark.parametrize("variant", ["init", "all"])
def test_session_parallel_training_equals_user_parallel_for_sequential_users(variant):
    """With one slot and users one after the other, both batchings present the same events in
    the same order, so they must train the same weights (user state, lazy ``end_session``,
    tail input, sampling, dropout draws)."""
    rows = []
    for u, t0 in (("a", 0.0), ("b", 1000.0)):
        for s in range(3):
            for e in range(3 + s):
                rows.append((u, f"{u}{s}", str((e * 3 + s + ord(u)) % 7), t0 + 100 * s + e))
    df = _log(rows)
    _, idx = build_item_index(df["ItemId"])
    weights = []
    for batching in ("user", "session"):
        p = HRNNParams(
            batching=batching, n_epochs=2, batch_size=1, n_sample=4, layers=[6],
            user_layers=[5], seed=3, dropout_p_user=0.3, dropout_p_init=0.3, schedule="joint",
        )  # fmt: skip
        torch.manual_seed(3)
        m = HRNN(len(idx), variant=variant, **p.model_options())
        stats = train_hier(m, df, idx, p)
        weights.append((stats["epoch_losses"], {k: v.clone() for k, v in m.state_dict().items()}))
    (la, wa), (lb, wb) = weights
    assert la == pytest.approx(lb, rel=1e-6)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    # the user path was trained (it starts at zero)
    assert wb["W_init.weight"].abs().sum() > 0


def test_hrnn_none_trains_exactly_as_the_gru4rec_trainer():
    """Session batching without a user path is GRU4Rec's own training: from the same weights,
    on a log where every user has one session (no scheduling constraint), one epoch gives the
    same loss and the same weights as ``train_gru4rec``."""
    from trainer.presets import TrainParams
    from trainer.train import train_gru4rec

    df = generate_clicks(n_sessions=120, n_items=30, n_users=120, seed=1)
    df = df[df.groupby("SessionId")["ItemId"].transform("size") >= 2].copy()
    df["UserId"] = df["SessionId"].astype(str)
    kw: dict[str, Any] = dict(
        n_epochs=1, batch_size=8, n_sample=16, layers=[10], seed=5, device="cpu"
    )
    g, ids, st = train_gru4rec(df, TrainParams(**kw, session_memory=0), progress=False)
    h = HRNN.from_gru4rec(GRU4Rec.from_config(g.config_dict(), seed=5), variant="none")
    idx = {i: r for r, i in enumerate(ids)}
    hs = train_hier(h, df, idx, HRNNParams(**kw))
    assert hs["epoch_losses"] == pytest.approx(st["epoch_losses"], rel=1e-6)
    assert hs["n_steps_per_epoch"] == st["n_steps_per_epoch"]
    hw = h.state_dict()
    for k, v in g.state_dict().items():
        torch.testing.assert_close(hw[k], v, msg=k)


@pytest.mark.parametrize("variant", ["none", "init"])
def test_without_waiting_for_users_the_schedule_is_gru4recs(variant):
    """``wait_for_user=False``: GRU4Rec's schedule on a log where users have many sessions that
    overlap in the batch, so HRNN without its user path trains exactly as ``train_gru4rec``;
    with the user path, a session whose predecessor still runs starts from its stored pair."""
    from trainer.presets import TrainParams
    from trainer.train import train_gru4rec

    df = generate_clicks(n_sessions=150, n_items=30, n_users=6, seed=2)
    df = df[df.groupby("SessionId")["ItemId"].transform("size") >= 2].copy()
    kw: dict[str, Any] = dict(
        n_epochs=1, batch_size=8, n_sample=16, layers=[10], seed=5, device="cpu"
    )
    g, ids, st = train_gru4rec(df, TrainParams(**kw, session_memory=0), progress=False)
    idx = {i: r for r, i in enumerate(ids)}
    b = session_parallel_batches(df, idx, 8, wait_for_user=False)
    assert b.n_steps == st["n_steps_per_epoch"]
    strict = session_parallel_batches(df, idx, 8)
    assert strict.n_steps > b.n_steps  # 6 users in 8 slots: waiting costs steps
    t_s, s_s = np.nonzero(b.start)
    t_e, s_e = np.nonzero(b.end)
    start, end = np.empty(len(b.user), np.int64), np.empty(len(b.user), np.int64)
    start[b.session[t_s, s_s]], end[b.session[t_e, s_e]] = t_s, t_e
    overlap = [
        (start[j[1:]] <= end[j[:-1]]).any() for j in (np.flatnonzero(b.user == u) for u in range(6))
    ]
    assert any(overlap)  # a user's sessions run at once: the stored-pair path is exercised
    # exactly those sessions keep a pair across epochs; with waiting there are none
    m = HRNN(len(idx), layers=[10])
    chain = UserChain.make(m, b, torch.device("cpu"))
    has = b.prev >= 0
    np.testing.assert_array_equal(chain.ov_id >= 0, has & (start <= end[np.maximum(b.prev, 0)]))
    assert (UserChain.make(m, strict, torch.device("cpu")).ov_id < 0).all()
    h = HRNN.from_gru4rec(GRU4Rec.from_config(g.config_dict(), seed=5), variant=variant)
    hs = train_hier(h, df, idx, HRNNParams(**kw, wait_for_user=False, schedule="joint"))
    assert all(np.isfinite(hs["epoch_losses"]))
    if variant == "none":
        assert hs["epoch_losses"] == pytest.approx(st["epoch_losses"], rel=1e-6)
        hw = h.state_dict()
        for k, v in g.state_dict().items():
            torch.testing.assert_close(hw[k], v, msg=k)
    else:
        assert h.W_init.weight.abs().sum() > 0  # the user path trained


@pytest.mark.parametrize("variant", ["init", "all"])
def test_staged_schedule_trains_gru4rec_first_then_only_the_user_path(variant):
    """``schedule=residual``: the session network trains alone, user path off, exactly as
    ``train_gru4rec`` (GRU4Rec's schedule without ``wait_for_user``); then the user path
    (user GRU, ``W_init``, memory offset, in ``all`` the user columns of the first layer)
    trains on top of it, which does not move."""
    from trainer.presets import TrainParams
    from trainer.train import train_gru4rec

    df = generate_clicks(n_sessions=150, n_items=30, n_users=6, seed=2)
    df = df[df.groupby("SessionId")["ItemId"].transform("size") >= 2].copy()
    kw: dict[str, Any] = dict(
        n_epochs=1, batch_size=8, n_sample=16, layers=[10], seed=5, device="cpu", momentum=0.5
    )  # momentum: the frozen entries must not coast on the first stage's momentum
    g, ids, st = train_gru4rec(df, TrainParams(**kw, session_memory=0), progress=False)
    idx = {i: r for r, i in enumerate(ids)}
    h = HRNN.from_gru4rec(
        GRU4Rec.from_config(g.config_dict(), seed=5), variant=variant, user_layers=[4], memory=5
    )
    p = HRNNParams(**kw, schedule="residual", wait_for_user=False, memory=5)
    hs = train_hier(h, df, idx, p)
    assert hs["epochs"] == 2
    assert hs["epoch_losses"][0] == pytest.approx(st["epoch_losses"][0], rel=1e-6)
    hw = h.state_dict()
    for k, v in g.state_dict().items():
        if k == "G.0.weight_ih":
            torch.testing.assert_close(hw[k][:, : v.shape[1]], v, msg=k)
        else:
            torch.testing.assert_close(hw[k], v, msg=k)
    assert h.W_init.weight.abs().sum() > 0 and float(h.memory_bias.detach()) != 0.0
    if variant == "all":
        assert hw["G.0.weight_ih"][:, 10:].abs().sum() > 0  # the user columns trained
    assert all(q.requires_grad for q in h.parameters()) and h.user_path_on
    # with the user path off the trained HRNN is its GRU4Rec, whatever the user state
    h.eval().set_active(["session"])
    u = torch.randn(3, h.user_state_dim)
    with torch.no_grad():
        s_g, s_h = g.initial_state(None, 3), h.initial_state(u, 3)
        for r in torch.randint(0, len(idx), (3, 3)):
            s_g, a = g.step(r, s_g)
            s_h, b = h.step(r, s_h, u)
            torch.testing.assert_close(a, b)
