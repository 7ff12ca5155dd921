"""Archive as a training source, warm start, the publish gate and the model registry."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from streamrec.data.clicklog import DataError
from streamrec.data.synthetic import generate_clicks
from streamrec.loop import registry
from streamrec.loop.archive import SCHEMA, Storage, file_name, hour_of, list_archive
from streamrec.model.api import InnerProductScores
from streamrec.model.checkpoint import CheckpointRecord, load_checkpoint, save_checkpoint
from streamrec.model.gate import gate
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.model.hrnn import HRNN
from streamrec.model.prnn import PRNN
from streamrec.serving.served_model import ModelHolder, ServingModel
from trainer.archive_source import parse_duration, read_archive
from trainer.retrain import RetrainConfig, RetrainError, grow_gru4rec, run_cycle
from trainer.train import train_gru4rec
from trainer.warmstart import grow_model, warm_epochs

PARAMS = ["layers=32", "n_epochs=3", "batch_size=32", "n_sample=0", "loss=cross-entropy"]
SMALL = {"layers": [16], "n_epochs": 1, "batch_size": 16, "n_sample": 0}


def write_archive(directory: Path, df: pd.DataFrame, partition: int = 0, start: int = 0) -> int:
    """``df`` as the archiver would write it: one file per event hour, contiguous offsets."""
    storage = Storage(str(directory))
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    offsets = np.arange(start, start + len(df))
    hours = df["Time"].map(hour_of)
    for hour, idx in df.groupby(hours, sort=True).groups.items():
        sub = df.loc[idx]
        offs = offsets[idx]
        table = pa.table(
            {
                "SessionId": sub["SessionId"].astype(str).tolist(),
                "ItemId": sub["ItemId"].astype(str).tolist(),
                "Time": sub["Time"].astype(float).tolist(),
                "UserId": sub["UserId"].astype(str).tolist()
                if "UserId" in sub
                else [None] * len(sub),
                "event_id": [f"e{o}" for o in offs],
                "partition": [partition] * len(sub),
                "offset": offs.tolist(),
            },
            schema=SCHEMA,
        )
        storage.write_atomic(file_name(partition, int(offs[0]), int(offs[-1]), hour), table)
    return start + len(df)


# ----------------------------------------------------------------------------- archive source


def test_window_is_event_time_back_from_newest_event(tmp_path: Path) -> None:
    df = generate_clicks(300, 50, seed=1, span_days=10)
    write_archive(tmp_path / "a", df)
    newest = df["Time"].max()
    sl = read_archive(str(tmp_path / "a"), window=parse_duration("3d"))
    assert sl.newest == newest
    assert len(sl.df) == int((df["Time"] >= newest + 1e-6 - 3 * 86400).sum())
    assert sl.df["Time"].min() >= newest - 3 * 86400
    # the whole archive, time ordered, nothing lost or repeated
    full = read_archive(str(tmp_path / "a"))
    assert len(full.df) == len(df)
    assert full.df["Time"].is_monotonic_increasing
    # --since / --until are event times too
    mid = float(df["Time"].median())
    part = read_archive(str(tmp_path / "a"), since=mid, until=newest)
    assert part.df["Time"].min() >= mid and part.df["Time"].max() < newest


@pytest.mark.slow
def test_train_cli_reads_archive_source(tmp_path: Path) -> None:
    from trainer.cli import main

    df = generate_clicks(200, 30, seed=2, span_days=5)
    write_archive(tmp_path / "a", df)
    out = CliRunner().invoke(
        main,
        ["train", "--train", f"archive:{tmp_path / 'a'}", "--window", "2d", "--out",
         str(tmp_path / "m"), "--no-progress", "--param", "layers=8", "n_epochs=1"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    meta = json.loads((tmp_path / "m" / "checkpoint.json").read_text())
    n_window = int((df["Time"] >= df["Time"].max() - 2 * 86400).sum())
    assert meta["data_stats"]["train_events"] == n_window < len(df)


def test_bad_archive_and_durations_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no files"):
        read_archive(str(tmp_path))
    with pytest.raises(DataError, match="bad duration"):
        parse_duration("fortnight")


# ----------------------------------------------------------------------------- warm start


def test_grow_keeps_every_old_tensor_bit_equal() -> None:
    old = GRU4Rec(GRU4RecConfig(n_items=20, layers=[8], embedding=4), seed=1)
    new = grow_gru4rec(old, 27, seed=2)
    for k, v in old.state_dict().items():
        w = new.state_dict()[k]
        assert torch.equal(w[: v.shape[0]], v), k
    assert new.n_items == 27 and new.Wy.shape[0] == 27
    with pytest.raises(ValueError):
        grow_gru4rec(old, 10)


def _models() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "gru4rec-onehot": GRU4Rec(GRU4RecConfig(n_items=20, layers=[8, 6]), seed=1),
        "hrnn": HRNN(20, [8], [6], embedding=5, variant="all", user_to_output=True),
        "prnn": PRNN(
            20,
            [3, 4],
            feature_values=[torch.rand(20, 3), torch.rand(20, 4)],
            id_hidden=8,
            feature_hidden=[5, 6],
            embedding=4,
        ),
        "prnn-concat": PRNN(20, [3], arch="concat", feature_values=[torch.rand(20, 3)]),
    }


@pytest.mark.parametrize("name", ["gru4rec-onehot", "hrnn", "prnn", "prnn-concat"])
def test_grow_model_keeps_every_old_tensor_bit_equal(name: str) -> None:
    """One function for every model: item tables (any tensor with a row per item: embeddings,
    outputs, HRNN's Wuy, p-RNN's feature buffers) keep their old rows bit-equal and grow;
    every other tensor is copied as it is."""
    old = _models()[name]
    snap = {k: v.clone() for k, v in old.state_dict().items()}
    new: Any = grow_model(old, 27, seed=3)
    assert type(new) is type(old) and new.n_items == 27
    assert new.config_dict() == {**old.config_dict(), "n_items": 27}
    grown = 0
    for k, v in snap.items():
        w = new.state_dict()[k]
        if w.shape == v.shape:
            assert torch.equal(w, v), k
        else:
            assert w.shape[0] == 27 and v.shape[0] == 20 and w.shape[1:] == v.shape[1:], k
            assert torch.equal(w[:20], v), k
            grown += 1
    assert grown >= (2 if name.startswith("gru4rec") else 3)
    assert all(torch.equal(v, snap[k]) for k, v in old.state_dict().items())  # old untouched
    x = torch.tensor([3, 7])  # known items score the same way after growing
    u = old.initial_user_state(2)
    s_old, sc_old = old.eval().step(x, old.initial_state(u, 2), u)
    s_new, sc_new = new.eval().step(x, new.initial_state(u, 2), u)
    assert torch.equal(s_old, s_new) and torch.equal(sc_old, sc_new[:, :20])
    with pytest.raises(ValueError, match="only grows"):
        grow_model(old, 10)
    # the new rows come from the seed: the same seed grows the same model
    again: Any = grow_model(old, 27, seed=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new.state_dict().items())


def test_warm_epochs_are_the_new_events_share() -> None:
    assert warm_epochs(10, None, 1000) == 10  # unknown: as configured
    assert warm_epochs(10, 1000, 1000) == 10
    assert warm_epochs(10, 250, 1000) == 3  # ceil(2.5)
    assert warm_epochs(3, 300, 96_000) == 1  # a barely grown window: one epoch
    assert warm_epochs(3, 0, 96_000) == 1


def test_a_warm_start_with_logq_stays_finite_when_old_items_have_no_new_events() -> None:
    # cross-entropy with logQ divides by the item counts of the new window: the published
    # model's items that are absent from it count 0 and must not turn the weights NaN
    xe = {**SMALL, "n_sample": 8, "loss": "cross-entropy", "logq": 1.0}
    df = generate_clicks(400, 30, seed=3)
    old, old_ids, _ = train_gru4rec(df, xe, progress=False)
    df2 = df[~df["ItemId"].isin(set(old_ids[:5]))]
    model, _, _ = train_gru4rec(df2, xe, progress=False, init=(old, old_ids))
    assert all(torch.isfinite(t).all() for t in model.parameters())


def test_warm_start_keeps_old_rows_and_grows_the_index() -> None:
    df = generate_clicks(400, 30, seed=3)
    old, old_ids, _ = train_gru4rec(df, SMALL, progress=False)
    # the new window: a few old items are gone, 5 items are new
    gone = set(old_ids[:5])
    df2 = df[~df["ItemId"].isin(gone)].copy()
    new_items = [f"new{j}" for j in range(5)]
    df2.loc[df2.index[::7], "ItemId"] = np.resize(new_items, len(df2.index[::7]))
    snap = {k: v.clone() for k, v in old.state_dict().items()}
    model, ids, _ = train_gru4rec(df2, SMALL, progress=False, init=(old, old_ids))
    assert ids[: len(old_ids)] == old_ids  # old items keep their rows
    assert sorted(ids[len(old_ids) :]) == sorted(new_items)  # the index grows
    rows = [old_ids.index(i) for i in gone]
    tables = [k for k, v in snap.items() if v.shape[0] == len(old_ids)]  # item tables
    assert "Wy" in tables and "By" in tables
    for name in tables:
        t = model.state_dict()[name]
        assert torch.equal(t[rows], snap[name][rows]), name  # untrained rows: bit-equal
        seen = [old_ids.index(i) for i in old_ids if i not in gone]
        assert not torch.equal(t[seen], snap[name][seen])  # trained rows did move
    assert all(torch.equal(v, snap[k]) for k, v in old.state_dict().items())  # old untouched


# ----------------------------------------------------------------------------- gate + registry


def shuffled_items(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["ItemId"] = np.random.default_rng(0).permutation(out["ItemId"].to_numpy())
    return out


@pytest.mark.slow
def test_first_cycle_publishes_then_gate_refuses_degenerate(tmp_path: Path) -> None:
    archive, models = tmp_path / "archive", tmp_path / "models"
    df = generate_clicks(1500, 60, seed=4, span_days=6)
    write_archive(archive, df)
    cfg = RetrainConfig(str(archive), str(models), "6d", "1d", params=PARAMS, progress=False)
    r1 = run_cycle(cfg, echo=lambda s: None)
    assert r1["decision"]["published"], r1
    v1 = registry.current_version(models)
    assert v1 == r1["decision"]["version"] and r1["current_version"] is None
    holder = ModelHolder(ServingModel.from_checkpoint(_published(models), "cpu"), watch_dir=models)
    assert holder.current.version == v1
    # a candidate trained on shuffled items: refused, the pointer and the worker stay on v1
    bad = RetrainConfig(**{**cfg.__dict__, "corrupt": shuffled_items})
    r2 = run_cycle(bad, echo=lambda s: None)
    assert not r2["decision"]["published"]
    assert "recall@20" in r2["decision"]["reason"]
    assert r2["metrics"]["candidate"]["recall@20"] < r2["metrics"]["current"]["recall@20"]
    assert registry.current_version(models) == v1
    assert not holder.maybe_reload() and holder.current.version == v1
    log = registry.read_log(models)
    assert [r["decision"]["published"] for r in log] == [True, False]
    # the published checkpoint carries the slice and figure of the workers' relative gate
    meta = holder.current.metadata
    sessions = meta["data_stats"]["holdout_sessions"]
    assert 0 < len(sessions) <= 200 and all(len(x) >= 2 for x in sessions)
    assert meta["metrics"]["holdout_recall@20"] == log[0]["metrics"]["slice"]["holdout_recall@20"]
    assert holder.current.holdout_recall(sessions) == meta["metrics"]["holdout_recall@20"]
    for r in log:
        assert set(r["seconds"]) == {"read", "train", "evaluate", "publish"}
        assert r["window"]["offsets"]["0"][0] == 0 and r["events"]["train"] > 0
    # new clicks with a new item: a warm cycle publishes a grown model, the holder follows
    df3 = generate_clicks(300, 60, seed=5, start_time=df["Time"].max() + 60, span_days=0.5)
    df3.loc[df3.index[::5], "ItemId"] = "brand-new"
    df3["SessionId"] = "n" + df3["SessionId"].astype(str)
    write_archive(archive, df3, start=len(df))
    warm = RetrainConfig(
        **{**cfg.__dict__, "tolerance": 1.0, "holdout": "2h", "min_holdout_events": 10_000}
    )
    kept = run_cycle(warm, echo=lambda s: None)  # 2h of holdout: too few events to decide
    assert not kept["decision"]["published"] and kept["warm_start"]
    assert f"fewer than {warm.min_holdout_events}" in kept["decision"]["reason"]
    assert kept["metrics"]["holdout_predictions"] < warm.min_holdout_events
    assert registry.current_version(models) == v1
    warm.min_holdout_events = 100
    r3 = run_cycle(warm, echo=lambda s: None)
    assert r3["decision"]["published"] and r3["warm_start"] and r3["new_items"] == 1
    # the warm start continued the parent's Adagrad state, saved beside its checkpoint
    assert (models / "versions" / v1 / "optimizer.safetensors").is_file()
    assert r3["optimizer_continued"] and not r1["optimizer_continued"]
    assert holder.maybe_reload()
    assert holder.current.version == r3["decision"]["version"]
    assert "brand-new" in holder.current.item_index
    assert holder.current.item_ids[: len(load_checkpoint(models / "versions" / v1).item_ids)] == (
        load_checkpoint(models / "versions" / v1).item_ids
    )


@pytest.mark.slow
def test_junk_item_ids_do_not_grow_the_catalogue(tmp_path: Path) -> None:
    """Issue 19, case 17: never-repeated junk item ids (here 2,000, beside the next day's
    clicks with one real new item) grew the published catalogue by their number. A new item
    now needs ``min_item_support`` events; the cycle's log and the checkpoint say what was
    left out, and a known item keeps training on however few events it has."""
    archive, models = tmp_path / "archive", tmp_path / "models"
    df = generate_clicks(1000, 40, seed=4, span_days=4)
    n = write_archive(archive, df)
    cfg = RetrainConfig(str(archive), str(models), "4d", "1d", params=PARAMS, progress=False)
    assert cfg.min_item_support > 1  # the default admits no never-repeated id
    assert run_cycle(cfg, echo=lambda s: None)["decision"]["published"]
    v1 = load_checkpoint(_published(models))
    t1 = float(df["Time"].max())
    day = generate_clicks(300, 40, seed=5, start_time=t1 + 60, span_days=0.5)
    day["SessionId"] = "d" + day["SessionId"].astype(str)
    day.loc[day.index[::7], "ItemId"] = "real-new"
    junk = pd.DataFrame(
        {
            "SessionId": np.repeat([f"junk{i}" for i in range(1000)], 2),
            "ItemId": [f"x{i}" for i in range(2000)],
            "Time": np.linspace(t1 + 120, t1 + 0.4 * 86400, 2000),
        }
    )
    write_archive(archive, pd.concat([day, junk], ignore_index=True), start=n)
    warm = RetrainConfig(
        **{**cfg.__dict__, "window": "2d", "holdout": "1h", "tolerance": 1.0,
           "min_holdout_events": 0}
    )  # fmt: skip
    r = run_cycle(warm, echo=lambda s: None)
    assert r["decision"]["published"], r
    v2 = load_checkpoint(_published(models))
    assert v2.item_ids == [*v1.item_ids, "real-new"] and r["new_items"] == 1
    left = r["left_out"]
    assert left["min_support"] == cfg.min_item_support
    assert left["items"] == 2000 and left["item_events"] == 2000
    assert left["events_dropped"] == 2000 and all(i.startswith("x") for i in left["examples"])
    assert v2.data_stats["left_out"] == left
    assert registry.read_log(models)[-1]["left_out"] == left


@pytest.mark.slow
def test_publish_as_challenger_leaves_the_champion_serving(tmp_path: Path) -> None:
    """``--publish-as challenger``: a candidate that passes the gate (against the champion)
    becomes the challenger; CURRENT and the workers' champion stay."""
    from trainer.cli import main

    archive, models = tmp_path / "archive", tmp_path / "models"
    write_archive(archive, generate_clicks(600, 40, seed=6, span_days=3))
    cfg = RetrainConfig(str(archive), str(models), "3d", "1d", params=PARAMS, progress=False)
    v1 = run_cycle(cfg, echo=lambda s: None)["decision"]["version"]
    out = CliRunner().invoke(
        main,
        ["retrain", "--archive", str(archive), "--models", str(models), "--once",
         "--window", "3d", "--holdout", "1d", "--tolerance", "1.0", "--no-progress",
         "--publish-as", "challenger", *[x for kv in PARAMS for x in ("--param", kv)]],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    r2 = registry.read_log(models)[-1]
    assert r2["decision"]["published"] and r2["decision"]["as"] == "challenger"
    assert r2["current_version"] == v1  # gated against the champion
    assert registry.current_version(models) == v1
    assert registry.alias_version(models, "challenger") == r2["decision"]["version"] != v1
    assert registry.read_alias_log(models)[-1]["by"] == "retrain"


def _published(models: Path) -> Path:
    path = registry.resolve(models)
    assert path is not None
    return path


def _ckpt(path: Path, seed: int) -> CheckpointRecord:
    model = GRU4Rec(GRU4RecConfig(n_items=5, layers=[4]), seed=seed)
    return save_checkpoint(path, model, "gru4rec", [f"i{j}" for j in range(5)])


def test_registry_keeps_k_rolls_back_and_cli(tmp_path: Path) -> None:
    from trainer.cli import main

    models = tmp_path / "models"
    versions = []
    for j in range(4):
        v = registry.add_version(models, _ckpt(registry.staging_dir(models, str(j)), j))
        registry.publish(models, v, keep=2)
        versions.append(v)
    held = [v.version for v in registry.list_versions(models)]
    assert held == versions[-2:]
    assert registry.current_version(models) == versions[-1]
    run = CliRunner()
    out = run.invoke(main, ["models", "list", "--models", str(models)])
    assert out.exit_code == 0 and f"* {versions[-1]}" in out.output
    out = run.invoke(main, ["models", "rollback", "--models", str(models), versions[-2]])
    assert out.exit_code == 0, out.output
    assert registry.current_version(models) == versions[-2]
    out = run.invoke(main, ["models", "rollback", "--models", str(models), versions[0]])
    assert out.exit_code != 0 and "no version" in out.output  # pruned
    assert f"(held: {versions[-2]}, {versions[-1]})" in out.output  # what can be rolled back to
    empty = tmp_path / "empty-registry"
    (empty / registry.VERSIONS).mkdir(parents=True)
    with pytest.raises(registry.RegistryError, match=r"\(held: none\)$"):
        registry.rollback(empty, versions[0])
    out = run.invoke(main, ["models", "show", "--models", str(models), "--json"])
    shown = json.loads(out.output)
    assert shown["version"] == versions[-2]
    assert shown["n_items"] == 5 and "item_ids" not in shown and shown["published"] is True
    assert Path(shown["path"]) == models / registry.VERSIONS / versions[-2]
    out = run.invoke(main, ["models", "show", "--models", str(models), versions[-1], "--json"])
    assert json.loads(out.output)["published"] is False
    # a worker's holder follows the pointer, rollbacks included
    holder = ModelHolder(ServingModel.from_checkpoint(_published(models), "cpu"), watch_dir=models)
    registry.rollback(models, versions[-1])
    assert holder.maybe_reload() and holder.current.version == versions[-1]
    assert list_archive(Storage(str(tmp_path / "empty"))) == []
    # every rollback is in the registry's log; the cycles are read apart from them
    log = registry.read_log(models)
    assert [(r["event"], r["from"], r["to"], r["by"]) for r in log] == [
        ("rollback", versions[-1], versions[-2], "rollback"),  # who: the default of both
        ("rollback", versions[-2], versions[-1], "rollback"),
    ]
    assert registry.read_cycles(models) == []


def test_models_commands_refuse_a_path_that_is_not_a_registry(tmp_path: Path) -> None:
    """A mistyped path is not an empty registry: list, show and rollback say what it is."""
    from trainer.cli import main

    models = tmp_path / "models"
    registry.publish(models, registry.add_version(models, _ckpt(models / "staged", 0)))
    plain = _ckpt(tmp_path / "plain-checkpoint", 1).path
    run = CliRunner()
    for cmd in (["list"], ["show"], ["rollback", "v"]):
        out = run.invoke(main, ["models", cmd[0], "--models", str(tmp_path / "modles"), *cmd[1:]])
        assert out.exit_code == 1 and out.output.splitlines() == [
            f"Error: {tmp_path / 'modles'}: no such directory (a model registry is made by "
            "`trainer retrain --models DIR`)"
        ], out.output
        out = run.invoke(main, ["models", cmd[0], "--models", str(plain), *cmd[1:]])
        assert out.exit_code == 1 and "is not a model registry" in out.output, out.output
    out = run.invoke(main, ["models", "list", "--models", str(models)])
    assert out.exit_code == 0 and out.output.startswith("* "), out.output


@pytest.mark.slow
def test_a_young_archive_retrains_with_the_defaults_and_the_cycle_says_what_it_did(
    tmp_path: Path,
) -> None:
    """The README's ``trainer retrain --archive A --models M --once`` on an archive of two
    hours (``--holdout auto``: a tenth of the span), a report that adds up and names its
    figures, and a clear refusal with ``--holdout 1d``."""
    from trainer.cli import main

    archive, models = tmp_path / "archive", tmp_path / "models"
    df = generate_clicks(600, 40, seed=8, span_days=2 / 24)
    write_archive(archive, df)
    base = ["retrain", "--archive", str(archive), "--models", str(models), "--once",
            "--no-progress", "--param", *PARAMS]  # fmt: skip
    out = CliRunner().invoke(main, [*base, "--holdout", "1d"])
    span_h = (df["Time"].max() - df["Time"].min()) / 3600
    assert out.exit_code == 1
    assert out.output.splitlines()[-1].startswith(
        f"Error: the holdout (--holdout 1d = 24.0 h) holds every session: the window's "
        f"{len(df):,} events span {span_h:.1f} h; pass --holdout auto (the default) or a "
        "shorter one"
    ), out.output
    out = CliRunner().invoke(main, base)  # the defaults
    assert out.exit_code == 0, out.output
    r1 = registry.read_cycles(models)[-1]
    ev = r1["events"]
    assert ev["window"] == ev["before_holdout"] + ev["holdout"] == len(df)
    assert 0 < ev["train"] <= ev["before_holdout"] and ev["holdout"] > 0
    # auto: the slice where the newest tenth of the sessions start
    starts = df.groupby("SessionId")["Time"].min()
    held = int((starts >= df["Time"].max() - r1["holdout_seconds"]).sum())
    assert held == pytest.approx(0.1 * len(starts), abs=2)
    lines = out.output.splitlines()
    assert f"{ev['holdout']:,} held out" in out.output and f"{ev['train']:,} train" in out.output
    cand = r1["metrics"]["candidate"]["recall@20"]
    n = r1["metrics"]["holdout_predictions"]
    assert lines[-2] == (
        f"published {r1['decision']['version']}: candidate recall@20 {cand:.4f} "
        f"(nothing was published before) on {n:,} holdout predictions"
    )
    assert "nan" not in out.output
    # a second cycle: both models' figures and the decision
    out = CliRunner().invoke(main, [*base, "--tolerance", "1", "--min-holdout-events", "0"])
    assert out.exit_code == 0, out.output
    r2 = registry.read_cycles(models)[-1]
    m = r2["metrics"]
    assert out.output.splitlines()[-2] == (
        f"published {r2['decision']['version']}: candidate recall@20 "
        f"{m['candidate']['recall@20']:.4f} vs current {m['current']['recall@20']:.4f} "
        f"({r1['decision']['version']}) on {m['holdout_predictions']:,} holdout predictions"
    )
    # `models show`: a summary that names the two figures apart; --json has everything
    out = CliRunner().invoke(main, ["models", "show", "--models", str(models)])
    assert out.exit_code == 0 and len(out.output.splitlines()) <= 12, out.output
    assert "recall@20" in out.output and "on the cycle's holdout" in out.output
    assert "gate slice" in out.output and "holdout_sessions" not in out.output
    full = json.loads(CliRunner().invoke(main, ["models", "show", "--models", str(models),
                                                "--json"]).output)  # fmt: skip
    assert full["data_stats"]["holdout_sessions"]


def test_a_kept_cycle_names_its_figures_first_and_then_why() -> None:
    """The gate's reason quotes the figures: in front of them it made the line say them
    twice; it now follows them after 'why:'."""
    reason = "candidate recall@20 0.5000 vs current 0.6000: not shown within the tolerance"
    record = {"metric": "recall@20", "current_version": "v1",
              "decision": {"published": False, "reason": reason},
              "metrics": {"candidate": {"recall@20": 0.5}, "current": {"recall@20": 0.6},
                          "holdout_predictions": 1234}}  # fmt: skip
    assert registry.cycle_summary(record) == (
        "kept v1: candidate recall@20 0.5000 vs current 0.6000 (v1) on 1,234 holdout "
        f"predictions; why: {reason}"
    )


def test_a_warm_start_keeps_the_published_models_shape(tmp_path: Path) -> None:
    """The demo publishes a 48-unit GRU4Rec; the README's `trainer retrain ... --once` (the
    default layers [100]) then stopped on torch's 'hidden0 has inconsistent hidden_size'."""
    archive, models = tmp_path / "archive", tmp_path / "models"
    df = generate_clicks(600, 40, seed=2, span_days=3)
    write_archive(archive, df)
    small = ["layers=12", "embedding=8", "n_epochs=1", "batch_size=16", "n_sample=0"]
    base = RetrainConfig(str(archive), str(models), "6d", params=small, progress=False,
                         tolerance=1.0, min_holdout_events=0)  # fmt: skip
    assert run_cycle(base, echo=lambda s: None)["decision"]["published"]
    plain = RetrainConfig(**{**base.__dict__, "params": ["n_epochs=1", "batch_size=16"]})
    r = run_cycle(plain, echo=lambda s: None)
    assert r["warm_start"] and r["decision"]["published"], r
    model = load_checkpoint(_published(models), "cpu").model
    assert isinstance(model, GRU4Rec)
    assert model.config.layers == [12] and model.config.embedding == 8
    wider = RetrainConfig(**{**base.__dict__, "params": ["layers=32", "n_epochs=1"]})
    with pytest.raises(RetrainError, match=r"--param layers=\[32\]: the published model has "
                       r"layers=\[12\].*--cold"):  # fmt: skip
        run_cycle(wider, echo=lambda s: None)
    cold = RetrainConfig(**{**wider.__dict__, "cold": True})
    assert not run_cycle(cold, echo=lambda s: None)["warm_start"]


def test_fsspec_memory_archive_and_clear_errors(tmp_path: Path) -> None:
    from trainer.cli import main

    df = generate_clicks(100, 20, seed=6, span_days=2)
    table = pa.table(
        {
            "SessionId": df["SessionId"].astype(str).tolist(),
            "ItemId": df["ItemId"].astype(str).tolist(),
            "Time": df["Time"].tolist(),
            "UserId": [None] * len(df),
            "event_id": [None] * len(df),
            "partition": [0] * len(df),
            "offset": list(range(len(df))),
        },
        schema=SCHEMA,
    )
    url = f"memory://archive-{tmp_path.name}"
    Storage(url).write_atomic(file_name(0, 0, len(df) - 1, hour_of(df["Time"].iloc[0])), table)
    got = read_archive(url).df
    assert len(got) == len(df) and set(got["ItemId"]) == set(df["ItemId"].astype(str))
    # an fsspec protocol without its package installed, an empty archive: clear messages
    from streamrec.loop.archive import ArchiveError

    with pytest.raises(ArchiveError, match="no fsspec implementation"):
        Storage("nosuchproto://bucket/archive")
    out = CliRunner().invoke(
        main,
        ["retrain", "--archive", str(tmp_path / "empty"), "--models", str(tmp_path / "m"),
         "--once", "--no-progress"],
    )  # fmt: skip
    assert out.exit_code == 1 and "holds no files" in out.output
    out = CliRunner().invoke(
        main, ["retrain", "--archive", "a", "--models", "m", "--once", "--every", "1h"]
    )
    assert out.exit_code == 2 and "exactly one of --once and --every" in out.output


@pytest.mark.slow
def test_hrnn_retrains_cold_through_the_same_cycle(tmp_path: Path) -> None:
    df = generate_clicks(600, 40, n_users=60, seed=1, span_days=10)
    write_archive(tmp_path / "a", df)
    cfg = RetrainConfig(
        str(tmp_path / "a"), str(tmp_path / "m"), "60d", "1d", model_name="hrnn",
        params=["n_epochs=1"], progress=False,
    )  # fmt: skip
    r = run_cycle(cfg, echo=lambda s: None)
    assert r["decision"]["published"] and not r["warm_start"]
    assert load_checkpoint(_published(tmp_path / "m")).model_name == "hrnn"


HIER_PARAMS = {
    "hrnn": ["layers=16", "user_layers=16", "n_epochs=2", "batch_size=16", "n_sample=0"],
    "prnn": ["id_hidden=16", "feature_hidden=8", "n_epochs=2", "batch_size=16", "n_sample=0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hrnn", "prnn"])
def test_retrain_cli_warm_starts_hrnn_and_prnn(tmp_path: Path, name: str) -> None:
    """``trainer retrain --once --model hrnn|prnn``: a cold first cycle publishes; the next
    cycle warm-starts from it: the index grows, rows of items the window no longer has stay
    bit-equal, p-RNN's new items get their features, and the candidate trains (loss falls)."""
    from trainer.cli import main

    archive, models = tmp_path / "a", tmp_path / "m"
    df = generate_clicks(600, 40, n_users=60, seed=1, span_days=10)
    n = write_archive(archive, df)
    new_items = [f"new{j}" for j in range(4)]
    rng = np.random.default_rng(0)
    all_items = sorted(set(df["ItemId"].astype(str))) + new_items
    vectors = {i: rng.random(3).round(4) for i in all_items}
    feats = tmp_path / "features.tsv"
    pd.DataFrame([[i, *v] for i, v in vectors.items()], columns=["ItemId", "a", "b", "c"]).to_csv(
        feats, sep="\t", index=False
    )
    base = ["retrain", "--archive", str(archive), "--models", str(models), "--once",
            "--model", name, "--no-progress", "--param", *HIER_PARAMS[name]]  # fmt: skip
    if name == "prnn":
        out = CliRunner().invoke(main, base)
        assert out.exit_code == 1 and "item features" in out.output, out.output
        base += ["--features", str(feats)]
    out = CliRunner().invoke(main, [*base, "--window", "60d", "--holdout", "1d"])
    assert out.exit_code == 0, out.output
    v1 = load_checkpoint(_published(models))
    # a day later: 4 new items, 5 old items gone; the window holds only the new day
    t0 = float(df["Time"].max()) + 2 * 86400
    df2 = generate_clicks(300, 40, n_users=60, seed=2, start_time=t0, span_days=0.9)
    gone = set(v1.item_ids[:5])
    df2 = df2[~df2["ItemId"].astype(str).isin(gone)].copy()
    df2.loc[df2.index[::6], "ItemId"] = np.resize(new_items, len(df2.index[::6]))
    df2["SessionId"] = "b" + df2["SessionId"].astype(str)
    write_archive(archive, df2, start=n)
    out = CliRunner().invoke(
        main,
        [*base, "--window", "1d", "--holdout", "3h", "--warm-epochs", "3", "--tolerance", "1",
         "--min-holdout-events", "0"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    r = registry.read_log(models)[-1]
    assert r["warm_start"] and r["warm_epochs"] == 3 and r["new_items"] == len(new_items), r
    assert r["decision"]["published"], r
    losses = r["train_stats"]["epoch_losses"]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses  # it trains from the weights
    v2 = load_checkpoint(_published(models))
    assert v2.version != v1.version and v2.model_name == name
    assert v2.item_ids[: len(v1.item_ids)] == v1.item_ids  # old items keep their rows
    assert sorted(v2.item_ids[len(v1.item_ids) :]) == new_items  # the index grows
    old_sd, new_sd = v1.model.state_dict(), v2.model.state_dict()
    rows = [v1.item_ids.index(i) for i in gone]
    tables = [k for k, v in old_sd.items() if v.shape[0] == len(v1.item_ids)]
    assert tables
    for k in tables:
        assert new_sd[k].shape[0] == len(v2.item_ids)
        assert torch.equal(new_sd[k][rows], old_sd[k][rows]), k  # untrained rows: bit-equal
    if name == "prnn":
        feat = new_sd["feat_0"]
        assert torch.equal(feat[: len(v1.item_ids)], old_sd["feat_0"])
        for i in new_items:  # the new items' features, then the missing flag (0: present)
            want = torch.tensor([*vectors[i], 0.0], dtype=feat.dtype)
            assert torch.equal(feat[v2.item_index[i]], want)
    else:
        assert v2.model.config_dict() == {**v1.model.config_dict(), "n_items": len(v2.item_ids)}
    # the warm cycle saved its Adagrad state beside its checkpoint; the next one continues it
    assert (_published(models) / "optimizer.safetensors").is_file()
    assert not r["optimizer_continued"]  # v1 was trained cold by `trainer train`'s job
    out = CliRunner().invoke(
        main,
        [*base, "--window", "1d", "--holdout", "3h", "--warm-epochs", "1", "--tolerance", "1",
         "--min-holdout-events", "0"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert registry.read_log(models)[-1]["optimizer_continued"]


def compare(cand: float, cur: float, n: int, tolerance: float, z: float) -> Any:
    """The retrain gate's comparison (``streamrec.model.gate.gate`` as ``run_cycle`` calls it)."""
    d = gate(cand, cur, tolerance=tolerance, n=n, z=z)
    return d.passed, d.lower, d.margin


def test_gate_is_non_inferiority_at_a_confidence() -> None:
    # a half-point drop on 100,000 predictions is shown to be within the 2 % tolerance ...
    assert compare(0.505, 0.51, 100_000, 0.02, 1.645)[0]
    # ... on 300 it is noise: not shown, the current model stays
    assert not compare(0.505, 0.51, 300, 0.02, 1.645)[0]
    # z = 0: the point estimates alone (the old rule)
    assert compare(0.505, 0.51, 300, 0.02, 0.0)[0]
    assert not compare(0.45, 0.51, 100_000, 0.02, 1.645)[0]  # clearly worse
    ok, lower, margin = compare(0.60, 0.50, 1000, 0.02, 1.645)
    assert ok and lower < 0.10 and margin == pytest.approx(-0.01)


def _shuffle_item_rows(model: Any, n_items: int) -> None:
    """Scramble which row belongs to which item (every item table the same way)."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.dim() >= 1 and t.shape[0] == n_items:
                t.copy_(t[perm])


def test_train_writes_gate_figures_and_worker_refuses_a_scrambled_model(tmp_path: Path) -> None:
    from streamrec.model.gate import HOLDOUT_METRIC
    from trainer.cli import main

    df = generate_clicks(900, 60, seed=7, span_days=9)
    cut = df["Time"].quantile(0.8)
    first = df.groupby("SessionId")["Time"].transform("min")
    df[first < cut].to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    df[first >= cut].to_csv(tmp_path / "test.tsv", sep="\t", index=False)
    out = CliRunner().invoke(
        main,
        ["train", "--train", str(tmp_path / "train.tsv"), "--test", str(tmp_path / "test.tsv"),
         "--out", str(tmp_path / "m"), "--no-progress", "--param", *PARAMS],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    ck = load_checkpoint(tmp_path / "m")
    sessions = ck.data_stats["holdout_sessions"]
    ref = ck.metrics[HOLDOUT_METRIC]
    assert 0 < len(sessions) <= 200 and all(2 <= len(x) <= 50 for x in sessions)
    assert all(i in ck.item_index for x in sessions for i in x)  # known items only
    assert ref > 0.3  # a learnt model: far above chance (20 / 60 items)
    holder = ModelHolder(ServingModel.from_checkpoint(_ckpt(tmp_path / "p", 0).path, "cpu"))
    assert holder.load_and_swap(tmp_path / "m")  # the model itself passes its own gate
    # the same model with its item rows scrambled: finite, varied scores, but far below the
    # checkpoint's own figure on the slice: the relative gate refuses it
    _shuffle_item_rows(ck.model, len(ck.item_ids))
    for path, metrics in (("bad", ck.metrics), ("bad-no-figure", {})):
        save_checkpoint(
            tmp_path / path, ck.model, "gru4rec", ck.item_ids,
            data_stats=ck.data_stats, metrics=metrics,
        )  # fmt: skip
    assert not holder.load_and_swap(tmp_path / "bad")
    assert holder.current.version == ck.version
    assert "quality gate" in next(iter(holder.rejected.values()))
    # without the figure there is no relative gate: the scrambled model would serve
    assert holder.load_and_swap(tmp_path / "bad-no-figure")


def test_progress_bars_count_archive_files_and_hide_without_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from trainer.retrain import _Bars

    df = generate_clicks(100, 20, seed=8, span_days=1)
    write_archive(tmp_path / "a", df)
    n_files = len(list_archive(Storage(str(tmp_path / "a"))))
    seen: list[int] = []
    calls: list[int] = []

    def bar(total: int) -> Any:
        seen.append(total)
        return calls.append

    sl = read_archive(str(tmp_path / "a"), progress=bar)
    assert seen == [sl.files] == [n_files] and sum(calls) == n_files > 1
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)  # not a terminal: no bar, no output
    with _Bars(True) as bars:
        bars.task("read", 3)(1)
    assert bars.progress is None and err.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    with _Bars(True) as bars:
        advance = bars.task("evaluate", 2)
        advance(1)
        advance(1)
    assert bars.progress is not None and bars.progress.tasks[0].completed == 2
    with _Bars(False) as bars:  # --no-progress
        assert bars.progress is None


def test_prnn_feature_rows_of_new_items_and_a_changed_feature_file() -> None:
    from trainer.features import FeatureMatrix
    from trainer.warmstart import FeatureMismatch, new_feature_rows

    old = _models()["prnn"]
    snap = old.feat_0.clone()
    grown: Any = grow_model(old, 23, seed=0)
    index = {f"i{j}": j for j in range(23)}

    def build(dims: list[int]) -> Any:
        def f(ix: dict[str, int], n: int) -> list[FeatureMatrix]:
            return [FeatureMatrix(f"f{d}", np.full((n, d), 7.0, np.float32), np.ones(n, bool))
                    for d in dims]  # fmt: skip

        return f

    new_feature_rows(grown, index, 20, build([3, 4]))
    assert torch.equal(grown.feat_0[:20], snap)  # old rows as they were
    assert bool((grown.feat_0[20:] == 7.0).all()) and bool((grown.feat_1[20:] == 7.0).all())
    with pytest.raises(FeatureMismatch, match=r"\(feature files changed\?\): use --cold$"):
        new_feature_rows(grown, index, 20, build([3, 5]))


def test_retrain_cli_refuses_bad_gate_options(tmp_path: Path) -> None:
    from trainer.cli import main

    base = ["retrain", "--archive", "a", "--models", "m", "--once"]
    out = CliRunner().invoke(main, [*base, "--warm-epochs", "zero"])
    assert out.exit_code == 2 and "--warm-epochs" in out.output
    out = CliRunner().invoke(main, [*base, "--tolerance", "1.5"])
    assert out.exit_code == 2 and "--tolerance" in out.output


def test_warm_start_continues_the_optimiser_state() -> None:
    """A warm start that continues the saved Adagrad accumulators takes small steps on what
    the parent learnt; with fresh accumulators its first epoch undoes part of the fit (higher
    loss than the parent's last epoch, on the same data)."""
    from trainer.optim import IndexedAdagradM

    df = generate_clicks(600, 40, seed=9)
    params = {"layers": [32], "n_epochs": 4, "batch_size": 16, "n_sample": 0,
              "loss": "cross-entropy", "learning_rate": 0.2}  # fmt: skip
    old, ids, st = train_gru4rec(df, params, progress=False, keep_optimizer=True)
    state = st["optimizer_state"]
    assert {"acc.Wy", "acc.By"} <= set(state) and state["acc.Wy"].shape == old.Wy.shape
    one = {**params, "n_epochs": 1}
    _, _, fresh = train_gru4rec(df, one, progress=False, init=(old, ids))
    _, _, cont = train_gru4rec(df, one, progress=False, init=(old, ids), init_optimizer=state)
    last = st["epoch_losses"][-1]
    assert fresh["epoch_losses"][0] > last  # the fresh optimiser's big first steps
    assert cont["epoch_losses"][0] < fresh["epoch_losses"][0]
    assert cont["epoch_losses"][0] < last * 1.02
    # grown tables: old rows take the saved state, new rows start fresh (zero)
    big = GRU4Rec(GRU4RecConfig(n_items=len(ids) + 3, layers=[32]), seed=0)
    opt = IndexedAdagradM(
        [q for n, q in big.named_parameters() if n not in ("Wy", "By")], [big.Wy, big.By]
    )
    assert opt.import_state(dict(big.named_parameters()), state) == len(state)
    assert torch.equal(opt.acc[big.Wy][: len(ids)], state["acc.Wy"])
    assert not opt.acc[big.Wy][len(ids) :].any()
    small = GRU4Rec(GRU4RecConfig(n_items=len(ids) - 1, layers=[32]), seed=0)
    opt2 = IndexedAdagradM([], [small.Wy])
    with pytest.raises(ValueError, match="does not fit"):
        opt2.import_state({"Wy": small.Wy}, state)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hrnn", "prnn"])
def test_hier_warm_start_continues_the_optimiser_state(name: str) -> None:
    """As GRU4Rec's: HRNN / p-RNN continued with the parent's Adagrad accumulators take
    smaller first steps than with fresh ones (a lower first-epoch loss on the same data)."""
    from trainer.hier import HRNNParams, PRNNParams, train_hier

    df = generate_clicks(400, 40, n_users=40, seed=9)
    ids = sorted(set(df["ItemId"].astype(str)))
    index = {i: r for r, i in enumerate(ids)}
    kw: dict[str, Any] = {"n_epochs": 4, "batch_size": 16, "n_sample": 0,
                          "loss": "cross-entropy", "learning_rate": 0.2}  # fmt: skip
    model: HRNN | PRNN
    if name == "hrnn":
        params: Any = HRNNParams(layers=[16], user_layers=[16], **kw)
        torch.manual_seed(0)
        model = HRNN(len(ids), [16], [16])
    else:
        params = PRNNParams(id_hidden=16, **kw)
        torch.manual_seed(0)
        model = PRNN(len(ids), arch="id", id_hidden=16)
    st = train_hier(model, df, index, params, keep_optimizer=True)
    state = st["optimizer_state"]
    assert state and all(k.startswith(("acc.", "mom.")) for k in state)
    one = dataclasses.replace(params, n_epochs=1)
    fresh = train_hier(copy.deepcopy(model), df, index, one)
    cont = train_hier(copy.deepcopy(model), df, index, one, init_optimizer=state)
    assert cont["epoch_losses"][0] < fresh["epoch_losses"][0]


def test_a_published_version_carries_the_windows_successor_table(tmp_path: Path) -> None:
    """retrieval_index=always: the index and the successor table of the training window are
    beside the version before it is visible (ann_index=head+successors serves from them)."""
    from streamrec.model.successors import load_table

    archive, models = tmp_path / "archive", tmp_path / "models"
    write_archive(archive, generate_clicks(600, 60, seed=8, span_days=3))
    cfg = RetrainConfig(str(archive), str(models), "3d", "1d", params=PARAMS, progress=False,
                        retrieval_index="always")  # fmt: skip
    assert run_cycle(cfg, echo=lambda s: None)["decision"]["published"]
    path = _published(models)
    served = ServingModel.from_checkpoint(path, "cpu")
    model = served.model
    assert isinstance(model, InnerProductScores)
    with torch.inference_mode():
        table = load_table(path, model.item_vectors(), 20)
    assert int((table.table[:, 0] >= 0).sum()) > 0
