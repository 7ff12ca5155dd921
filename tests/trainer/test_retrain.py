"""Archive as a training source, warm start, the publish gate and the model registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from streamrec import registry
from streamrec.archive import SCHEMA, Storage, file_name, hour_of, list_archive
from streamrec.clicklog import DataError
from streamrec.model.checkpoint import load_checkpoint, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.runtime import ModelHolder, ServingModel
from streamrec.synthetic import generate_clicks
from trainer.archive_source import parse_duration, read_archive
from trainer.retrain import RetrainConfig, grow_gru4rec, run_cycle
from trainer.train import train_gru4rec

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
    for r in log:
        assert set(r["seconds"]) == {"read", "train", "evaluate", "publish"}
        assert r["window"]["offsets"]["0"][0] == 0 and r["events"]["train"] > 0
    # new clicks with a new item: a warm cycle publishes a grown model, the holder follows
    df3 = generate_clicks(300, 60, seed=5, start_time=df["Time"].max() + 60, span_days=0.5)
    df3.loc[df3.index[::5], "ItemId"] = "brand-new"
    df3["SessionId"] = "n" + df3["SessionId"].astype(str)
    write_archive(archive, df3, start=len(df))
    warm = RetrainConfig(**{**cfg.__dict__, "tolerance": 1.0, "holdout": "2h"})
    r3 = run_cycle(warm, echo=lambda s: None)
    assert r3["decision"]["published"] and r3["warm_start"] and r3["new_items"] == 1
    assert holder.maybe_reload()
    assert holder.current.version == r3["decision"]["version"]
    assert "brand-new" in holder.current.item_index
    assert holder.current.item_ids[: len(load_checkpoint(models / "versions" / v1).item_ids)] == (
        load_checkpoint(models / "versions" / v1).item_ids
    )


def _published(models: Path) -> Path:
    path = registry.resolve(models)
    assert path is not None
    return path


def _ckpt(path: Path, seed: int) -> Path:
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
    out = run.invoke(main, ["models", "show", "--models", str(models)])
    assert json.loads(out.output)["version"] == versions[-2]
    # a worker's holder follows the pointer, rollbacks included
    holder = ModelHolder(ServingModel.from_checkpoint(_published(models), "cpu"), watch_dir=models)
    registry.rollback(models, versions[-1])
    assert holder.maybe_reload() and holder.current.version == versions[-1]
    assert list_archive(Storage(str(tmp_path / "empty"))) == []


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
    from streamrec.archive import ArchiveError

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
