"""Champion and challenger in the pipeline (no Kafka): the stable split of keys, A/B and
shadow answers, each arm's states and live metrics, the sweep by arm, the holders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from streamrec.data.synthetic import generate_clicks
from streamrec.serving.arms import ArmModels, Arms, arm_of, key_position
from streamrec.serving.config import CoreConfig
from streamrec.serving.expiry import sweep_idle
from streamrec.serving.live import KS, tally
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import ModelHolder, ServingModel
from streamrec.serving.state_store import StateStore, is_state_key
from streamrec.tools.replay import click_values

CFG = CoreConfig(session_gap_seconds=3600.0, top_k=5)


def test_a_stable_hash_puts_30_percent_of_keys_in_the_challenger_arm() -> None:
    keys = [f"user-{j}" for j in range(10_000)]
    share = sum(arm_of(k, 0.3) == "challenger" for k in keys) / len(keys)
    assert share == pytest.approx(0.3, abs=0.02)
    assert all(arm_of(k, 0.0) == "champion" for k in keys[:100])
    assert all(arm_of(k, 1.0) == "challenger" for k in keys[:100])
    # the same in another process, whatever its hash seed (a restart, another worker)
    code = (
        "from streamrec.serving.arms import key_position as p; "
        "print([p(f'user-{j}') for j in range(50)])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([key_position(f"user-{j}") for j in range(50)])


def _models(users: bool) -> tuple[pd.DataFrame, list[str], ServingModel, ServingModel]:
    import torch

    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
    from streamrec.model.hrnn import HRNN

    df = generate_clicks(80, 40, 16 if users else None, seed=8, span_days=0.05,
                         mean_click_gap=60.0, min_session_gap=1800.0)  # fmt: skip
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    items = sorted(df["ItemId"].astype(str).unique())
    out = []
    for seed, version in ((1, "champ"), (2, "chall")):
        torch.manual_seed(seed)
        net = (
            HRNN(len(items), layers=[16], user_layers=[8])
            if users
            else GRU4Rec(GRU4RecConfig(n_items=len(items), layers=[16]), seed=seed)
        )
        out.append(ServingModel(net.eval(), items, version, top_k=5))
    return df, items, out[0], out[1]


def _records(df: pd.DataFrame) -> list[Record]:
    return [Record(v, k, "clicks", 0, j, None, t) for j, (k, v, t) in enumerate(click_values(df))]


def _offline(model: ServingModel, df: pd.DataFrame, users: bool) -> dict[str, float]:
    index = model.item_index
    if users:
        from trainer.hier.evaluate import evaluate_users_job

        return evaluate_users_job(model.model, df, index, KS, "conservative")
    from trainer.evaluate import evaluate_next_item

    return evaluate_next_item(model.model, df, index, ks=KS)


def _run(records: list[Record], models: ArmModels) -> tuple[list, list, list]:
    store, recs, shadow, evals = StateStore(), [], [], []
    for lo in range(0, len(records), 7):
        res = process_batch(records[lo : lo + 7], store, models, CFG)
        recs += res.recommendations
        shadow += res.shadow
        evals += res.evaluations
    return recs, shadow, evals


@pytest.mark.parametrize("users", [False, True], ids=["gru4rec", "hrnn"])
def test_ab_each_key_in_one_arm_and_each_arm_measured_as_offline(users: bool) -> None:
    df, _, champion, challenger = _models(users)
    records = _records(df)
    recs, shadow, evals = _run(records, ArmModels(champion, challenger, share=0.3))
    assert shadow == [] and len(recs) == len(records)
    assert sorted(r.offset for r in recs) == list(range(len(records)))  # each click once
    key_of = (lambda r: r.user_id) if users else (lambda r: r.session_id)
    for r in recs:
        arm = arm_of(key_of(r), 0.3)
        assert r.arm == arm
        assert r.model_version == ("chall" if arm == "challenger" else "champ")
    counts = tally(evals)
    assert set(counts) == {("champion", "champ"), ("challenger", "chall")}
    key_col = "UserId" if users else "SessionId"
    in_challenger = df[key_col].astype(str).map(lambda k: arm_of(k, 0.3) == "challenger")
    for (arm, _), model, part in (
        (("champion", "champ"), champion, df[~in_challenger]),
        (("challenger", "chall"), challenger, df[in_challenger]),
    ):
        offline = _offline(model, part.reset_index(drop=True), users)
        live = counts[(arm, model.version)]
        assert live.n == offline["n_events"] > 0
        for k in KS:
            assert live.recall(k) == offline[f"recall@{k}"]
            assert live.mrr(k) == pytest.approx(offline[f"mrr@{k}"], abs=1e-12)


@pytest.mark.parametrize("users", [False, True], ids=["gru4rec", "hrnn"])
def test_shadow_publishes_the_champion_only_and_measures_both_on_every_click(users: bool) -> None:
    df, _, champion, challenger = _models(users)
    records = _records(df)
    recs, shadow, evals = _run(records, ArmModels(champion, challenger, shadow=True))
    assert len(recs) == len(shadow) == len(records)
    assert {(r.arm, r.model_version) for r in recs} == {("champion", "champ")}
    assert {(r.arm, r.model_version) for r in shadow} == {("challenger", "chall")}
    counts = tally(evals)
    for arm, model in (("champion", champion), ("challenger", challenger)):
        offline = _offline(model, df, users)
        live = counts[(arm, model.version)]
        assert live.n == offline["n_events"]
        for k in KS:
            assert live.recall(k) == offline[f"recall@{k}"]


def test_shadow_states_are_the_challengers_own_and_swept_with_its_model() -> None:
    from streamrec.testing import click

    champion = ServingModel(_tiny(1, user_dim=4), [f"i{j}" for j in range(30)], "champ", top_k=5)
    challenger = ServingModel(_tiny(2, user_dim=4), [f"i{j}" for j in range(30)], "chall", top_k=5)
    store = StateStore()
    values = [click("s", f"i{j}", user="u", t=1.7e9 + j) for j in range(3)]
    records = [Record(v, b"u", "c", 0, j) for j, v in enumerate(values)]
    process_batch(records, store, ArmModels(champion, challenger, shadow=True), CFG)
    mine, theirs = store.get_session("u:u"), store.get_session("cu:u")
    assert mine is not None and theirs is not None
    assert (mine.version, theirs.version) == ("champ", "chall")
    assert theirs.answer is not None and theirs.answer.arm == "challenger"
    # the sweep ends each session with its own arm's model: the users stay each arm's
    res = sweep_idle(store, ArmModels(champion, challenger, shadow=True), CFG, now=1.7e9 + 9999)
    assert res.sessions_ended == 2
    users = {k: store.get_user(k) for k in ("u:u", "cu:u")}
    assert {k: u.version for k, u in users.items() if u is not None} == {
        "u:u": "champ",
        "cu:u": "chall",
    }
    # the challenger's keys pass the changelog's layout check
    assert is_state_key(b"s/cu:u") and is_state_key(b"u/cu:u")
    assert is_state_key(b"s/ca:sess") and not is_state_key(b"s/xx:sess")


def _tiny(seed: int, user_dim: int = 0):
    from streamrec.testing import TinyStepModel

    return TinyStepModel(30, 8, user_dim, seed)


def test_without_a_challenger_every_key_is_the_champions(tmp_path: Path) -> None:
    from streamrec.testing import click

    champion = ServingModel(_tiny(1), [f"i{j}" for j in range(30)], "champ", top_k=5)
    values = [click(f"s{j}", "i1", t=1.7e9) for j in range(40)]
    records = [Record(v, f"s{j}".encode(), "c", 0, j) for j, v in enumerate(values)]
    res = process_batch(records, StateStore(), ArmModels(champion, None, share=0.5), CFG)
    assert {r.arm for r in res.recommendations} == {"champion"} and res.shadow == []
    with pytest.raises(ValueError):
        ArmModels(champion, None, share=1.5)
    # a challenger holder with nothing named yet
    holder = ModelHolder(None, watch_dir=tmp_path, alias="challenger")
    arms = Arms(ModelHolder(champion), holder, share=0.5)
    assert arms.models().challenger is None and not arms.prepare_reload()
    with pytest.raises(ValueError):
        ModelHolder(None)  # the champion always has a model


def test_live_counters_by_arm_and_version_are_the_evaluations_counts() -> None:
    """The Prometheus counters a worker exports (streamrec_live_*_total{arm, model_version,
    k}) add up each batch's evaluations; streamrec_arms names the versions served."""
    from prometheus_client import CollectorRegistry

    from streamrec.engines.live import LiveMetrics
    from streamrec.settings import Settings

    df, _, champion, challenger = _models(False)
    models = ArmModels(champion, challenger, share=0.3)
    reg = CollectorRegistry()
    live = LiveMetrics(Settings(), reg, {"bootstrap.servers": "unused:9"})
    live.set_arms(models)
    store, evals = StateStore(), []
    records = _records(df)
    for lo in range(0, len(records), 7):
        res = process_batch(records[lo : lo + 7], store, models, CFG)
        live.add(res)
        evals += res.evaluations
    counts = tally(evals)
    assert len(counts) == 2
    for (arm, version), c in counts.items():
        labels = {"arm": arm, "model_version": version}
        assert reg.get_sample_value("streamrec_live_predictions_total", labels) == c.n > 0
        for i, k in enumerate(KS):
            at_k = {**labels, "k": str(k)}
            assert reg.get_sample_value("streamrec_live_hits_total", at_k) == c.hits[i]
            rr = reg.get_sample_value("streamrec_live_reciprocal_rank_total", at_k)
            assert rr == pytest.approx(c.rr[i], abs=1e-9)
    info = {
        "champion": "champ",
        "challenger": "chall",
        "challenger_share": "0.3",
        "shadow": "false",
    }
    assert reg.get_sample_value("streamrec_arms_info", info) == 1.0
