"""``trainer retrain``: archive -> candidate -> gate -> publish, once or on a schedule.

One cycle: read the event-time window of the archive (``trainer.archive_source``), hold out
the sessions that start in its newest ``holdout`` slice, train a candidate on the rest
(GRU4Rec warm-starts from the published model unless ``cold``: known items keep their rows,
new items get new rows after them), evaluate candidate and published model on the same
holdout events (items both know), and publish through the registry
(``streamrec.registry``) only if the candidate is not degenerate and not worse than the
published model by more than ``tolerance``. Every cycle appends one line to
``MODELS/retrain-log.jsonl``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import torch

from streamrec import registry
from streamrec.clicklog import DAY, DataError
from streamrec.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec
from trainer.archive_source import parse_duration, read_archive


class RetrainError(RuntimeError):
    """A cycle that cannot run (no data, bad options); the message says why."""


def grow_gru4rec(old: GRU4Rec, n_items: int, seed: int | None = None) -> GRU4Rec:
    """A GRU4Rec with ``n_items >= old.n_items`` rows: every old tensor copied bit for bit
    (item tables into their first rows), the new rows initialised as a fresh model's."""
    if n_items < old.n_items:
        raise ValueError(f"the item index only grows: {n_items} < {old.n_items}")
    cfg = dict(old.config_dict())
    cfg["n_items"] = n_items
    new = GRU4Rec(cfg, seed=seed)
    old_sd = old.state_dict()
    with torch.no_grad():
        for k, v in new.state_dict().items():
            o = old_sd[k].detach().to("cpu")
            if o.shape == v.shape:
                v.copy_(o)
            elif o.shape[1:] == v.shape[1:] and o.shape[0] <= v.shape[0]:
                v[: o.shape[0]].copy_(o)  # an item table: old rows first
            else:
                raise ValueError(f"tensor {k}: shape {tuple(o.shape)} cannot grow to {v.shape}")
    return new


@dataclass
class RetrainConfig:
    archive: str
    models: str
    window: str | None = "14d"
    holdout: str = "1d"
    model_name: str = "gru4rec"
    preset: str | None = None
    params: list[str] = field(default_factory=list)
    cold: bool = False
    tolerance: float = 0.02  # relative: candidate >= current * (1 - tolerance)
    metric: str = "recall@20"
    keep: int = registry.DEFAULT_KEEP
    min_item_support: int = 1
    progress: bool = True
    #: test hook: transform the training frame (e.g. shuffle items for a degenerate model)
    corrupt: Callable[[pd.DataFrame], pd.DataFrame] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _split_holdout(df: pd.DataFrame, holdout_s: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Holdout = sessions starting in the newest ``holdout_s`` of event time."""
    start = df.groupby("SessionId", sort=False)["Time"].transform("min")
    is_test = (start >= df["Time"].max() - holdout_s).to_numpy()
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def _restrict(test: pd.DataFrame, *indexes: dict[str, int]) -> pd.DataFrame:
    known = np.ones(len(test), dtype=bool)
    for ix in indexes:
        known &= test["ItemId"].isin(ix).to_numpy()
    test = test[known]
    lens = test.groupby("SessionId", sort=False)["SessionId"].transform("size")
    return test[lens >= 2].reset_index(drop=True)


def _evaluate(
    name: str, model: Any, test: pd.DataFrame, index: dict[str, int], train: pd.DataFrame
) -> dict[str, float]:
    from trainer.cli import evaluator_for

    m = evaluator_for(name)(model, test, index, (5, 20), "conservative", None, train)
    return {k: float(v) for k, v in m.items()}


def _train(
    cfg: RetrainConfig, train: pd.DataFrame, current: Checkpoint | None
) -> tuple[Any, list[str], dict[str, Any], dict[str, Any], bool]:
    """(model, item_ids, stats, train_params, warm)."""
    if cfg.model_name == "gru4rec":
        from trainer.presets import ParamError, make_params
        from trainer.train import train_gru4rec

        try:
            params = make_params(cfg.preset, cfg.params)
        except ParamError as e:
            raise RetrainError(f"--param/--preset: {e}") from None
        warm = (
            not cfg.cold and current is not None and current.model_name == "gru4rec"
        )  # fmt: skip
        init = None
        if warm and current is not None:
            assert isinstance(current.model, GRU4Rec)
            init = (current.model.to("cpu"), current.item_ids)
        model, ids, stats = train_gru4rec(train, params, progress=cfg.progress, init=init)
        return model, ids, stats, params.to_dict(), warm
    from trainer.cli import TRAINERS
    from trainer.jobs import TrainJob

    if cfg.model_name not in TRAINERS:
        raise RetrainError(f"unknown model {cfg.model_name!r} (known: {', '.join(TRAINERS)})")
    # HRNN / p-RNN: cold start each cycle (warm start is implemented for GRU4Rec)
    out = TRAINERS[cfg.model_name](TrainJob(train, cfg.preset, cfg.params, {}, cfg.progress))
    return out.model, out.item_ids, out.stats, out.train_params, False


def degenerate(metrics: dict[str, float], metric: str, n_items: int) -> str | None:
    """Why a candidate is unusable, or None."""
    v = metrics.get(metric)
    if v is None or not math.isfinite(v):
        return f"{metric} is not a number"
    k = int(metric.split("@")[1]) if "@" in metric else 20
    chance = min(1.0, k / max(n_items, 1))
    if v <= chance:
        return f"{metric} {v:.4f} is no better than chance ({chance:.4f})"
    return None


def run_cycle(cfg: RetrainConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """One retrain cycle; returns (and logs) its record. Raises RetrainError without data."""
    phases: dict[str, float] = {}
    rec: dict[str, Any] = {"time": _now(), "model": cfg.model_name, "archive": cfg.archive}
    try:
        holdout_s = parse_duration(cfg.holdout) or DAY
        window_s = parse_duration(cfg.window) if cfg.window else None
    except DataError as e:
        raise RetrainError(str(e)) from None

    echo("[1/4] reading the archive")
    t = time.perf_counter()
    try:
        sl = read_archive(cfg.archive, window=window_s)
    except DataError as e:
        raise RetrainError(str(e)) from None
    from trainer.data import preprocess

    df = sl.df
    if len(df) == 0:
        raise RetrainError(f"{cfg.archive}: no archived clicks in the window")
    train, test = _split_holdout(df, holdout_s)
    train = preprocess(train, min_item_support=cfg.min_item_support, min_session_length=2)
    if cfg.corrupt is not None:
        train = cfg.corrupt(train)
    current_path = registry.resolve(cfg.models) if registry.is_registry(cfg.models) else None
    current = load_checkpoint(current_path) if current_path else None
    phases["read"] = time.perf_counter() - t
    rec["window"] = sl.summary()
    rec["events"] = {"window": len(df), "train": len(train), "holdout": len(test)}
    rec["current_version"] = current.version if current else None
    if len(train) == 0:
        raise RetrainError("no training sessions (>= 2 events) before the holdout slice")
    echo(
        f"      {len(df):,} events ({len(train):,} train, {len(test):,} holdout) in "
        f"{sl.files} files, {phases['read']:.1f} s"
    )

    echo("[2/4] training the candidate" + (" (warm start)" if current and not cfg.cold else ""))
    t = time.perf_counter()
    model, item_ids, stats, train_params, warm = _train(cfg, train, current)
    phases["train"] = time.perf_counter() - t
    old_ids = set(current.item_ids) if current else set()
    rec["warm_start"] = warm
    rec["items"] = len(item_ids)
    rec["new_items"] = sum(1 for i in item_ids if i not in old_ids)

    echo("[3/4] evaluating candidate and current model on the holdout")
    t = time.perf_counter()
    cand_index = {iid: r for r, iid in enumerate(item_ids)}
    cur_index = current.item_index if current else {}
    gate_test = _restrict(test, cand_index, *([cur_index] if current else []))
    cand_m: dict[str, float] = {}
    cur_m: dict[str, float] = {}
    if len(gate_test):
        cand_m = _evaluate(cfg.model_name, model, gate_test, cand_index, train)
        if current is not None:
            cur_m = _evaluate(current.model_name, current.model, gate_test, cur_index, train)
    phases["evaluate"] = time.perf_counter() - t
    rec["metrics"] = {"candidate": cand_m, "current": cur_m, "holdout_events": len(gate_test)}

    # ---- the gate
    reason: str | None
    if not len(gate_test):
        reason = "no holdout events with items both models know: nothing to gate on"
    else:
        reason = degenerate(cand_m, cfg.metric, len(item_ids))
        if reason is None and current is not None:
            c, o = cand_m[cfg.metric], cur_m.get(cfg.metric, 0.0)
            if c < o * (1.0 - cfg.tolerance):
                reason = (
                    f"candidate {cfg.metric} {c:.4f} < current {o:.4f} beyond the "
                    f"tolerance {cfg.tolerance:.0%}"
                )

    echo("[4/4] " + ("publishing" if reason is None else f"keeping the current model: {reason}"))
    t = time.perf_counter()
    version = None
    if reason is None:
        staging = registry.staging_dir(cfg.models, uuid.uuid4().hex[:8])
        save_checkpoint(
            staging,
            model,
            cfg.model_name,
            item_ids,
            train_params=train_params,
            data_stats={
                "source": f"archive:{cfg.archive}",
                "window": sl.summary(),
                "train_events": len(train),
                "n_items": len(item_ids),
                "new_items": rec["new_items"],
                "warm_start": warm,
                "parent": current.version if current else None,
            },
            metrics={f"holdout_{k}": v for k, v in cand_m.items()},
        )
        version = registry.add_version(cfg.models, staging)
        rec["pruned"] = registry.publish(cfg.models, version, cfg.keep)
    phases["publish"] = time.perf_counter() - t
    rec["decision"] = {"published": reason is None, "version": version, "reason": reason}
    rec["seconds"] = {k: round(v, 4) for k, v in phases.items()}
    rec["train_stats"] = {
        k: stats.get(k) for k in ("train_seconds", "train_events_per_s", "n_items") if k in stats
    }
    registry.append_log(cfg.models, rec)
    echo(
        ("published " + str(version) if version else "kept " + str(rec["current_version"]))
        + f" ({', '.join(f'{k} {v:.1f} s' for k, v in phases.items())})"
    )
    return rec


# ----------------------------------------------------------------------------- commands


def commands() -> list[Any]:
    """``trainer retrain`` and ``trainer models``, registered by trainer.cli."""
    import json
    import sys

    import click

    from trainer.cli import MultiValueCommand, _split_values

    @click.command("retrain", cls=MultiValueCommand)
    @click.option("--archive", required=True, help="Archive directory or URL (streamrec archive).")
    @click.option("--models", required=True, help="Model registry directory.")
    @click.option("--window", default="14d", show_default=True, help="Event-time window.")
    @click.option("--holdout", default="1d", show_default=True, help="Newest slice held out.")
    @click.option("--every", default=None, help="Run a cycle every e.g. 1h (a loop).")
    @click.option("--once", is_flag=True, help="Run one cycle and exit.")
    @click.option("--model", "model_name", default="gru4rec", show_default=True)
    @click.option("--preset", default=None)
    @click.option("--param", "params", multiple=True, help="key=value (official names)")
    @click.option("--cold", is_flag=True, help="Train from scratch (default: warm start).")
    @click.option("--tolerance", default=0.02, show_default=True, help="Relative gate tolerance.")
    @click.option("--metric", default="recall@20", show_default=True)
    @click.option("--keep", default=registry.DEFAULT_KEEP, show_default=True, help="Versions kept.")
    @click.option("--min-item-support", default=1, show_default=True)
    @click.option("--progress/--no-progress", default=True)
    def retrain(
        archive: str,
        models: str,
        window: str,
        holdout: str,
        every: str | None,
        once: bool,
        model_name: str,
        preset: str | None,
        params: tuple[str, ...],
        cold: bool,
        tolerance: float,
        metric: str,
        keep: int,
        min_item_support: int,
        progress: bool,
    ) -> None:
        """Retrain from the click archive; publish the candidate if it passes the gate."""
        if once == bool(every):
            raise click.UsageError("give exactly one of --once and --every")
        cfg = RetrainConfig(
            archive, models, window, holdout, model_name, preset, _split_values(params), cold,
            tolerance, metric, keep, min_item_support, progress,
        )  # fmt: skip
        echo = lambda s: click.echo(s, err=True)  # noqa: E731
        if once:
            try:
                run_cycle(cfg, echo)
            except RetrainError as e:
                raise click.ClickException(str(e)) from None
            return
        try:
            period = parse_duration(every if every and every[-1].isalpha() else f"{every}s")
        except DataError as e:
            raise click.BadParameter(str(e), param_hint="--every") from None
        assert period is not None
        while True:
            start = time.monotonic()
            try:
                run_cycle(cfg, echo)
            except RetrainError as e:  # unattended: say why, try again next period
                echo(f"cycle skipped: {e}")
            except Exception as e:  # a failed cycle must not stop the loop
                echo(f"cycle failed: {type(e).__name__}: {e}")
            time.sleep(max(0.0, period - (time.monotonic() - start)))

    @click.group("models")
    def models_group() -> None:
        """The model registry: list, show, rollback."""

    models_opt = click.option("--models", required=True, help="Model registry directory.")

    @models_group.command("list")
    @models_opt
    @click.option("--json", "as_json", is_flag=True)
    def list_cmd(models: str, as_json: bool) -> None:
        """Versions held, oldest first; * marks the published one."""
        vs = registry.list_versions(models)
        if as_json:
            click.echo(
                json.dumps([{**v.__dict__, "path": str(v.path)} for v in vs], indent=1, default=str)
            )
            return
        if not vs:
            click.echo(f"{models}: no versions", err=True)
        for v in vs:
            r = v.metrics.get("holdout_recall@20")
            click.echo(
                f"{'*' if v.published else ' '} {v.version}  {v.model_name:<8} "
                f"{v.n_items:>8,} items  {v.created_at[:19]}  "
                + (f"holdout recall@20 {r:.4f}" if isinstance(r, float) else "")
            )

    @models_group.command("show")
    @models_opt
    @click.argument("version", required=False)
    def show_cmd(models: str, version: str | None) -> None:
        """One version's metadata (default: the published one)."""
        version = version or registry.current_version(models)
        if version is None:
            raise click.ClickException(f"{models}: nothing published")
        try:
            click.echo(json.dumps(registry.show(models, version), indent=1, default=str))
        except Exception as e:
            raise click.ClickException(str(e)) from None

    @models_group.command("rollback")
    @models_opt
    @click.argument("version")
    def rollback_cmd(models: str, version: str) -> None:
        """Publish an older version again (the workers follow)."""
        try:
            registry.rollback(models, version)
        except registry.RegistryError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"published {version}", err=True)

    del sys
    return [retrain, models_group]
