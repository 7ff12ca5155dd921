"""``trainer retrain``: archive -> candidate -> gate -> publish, once or on a schedule.

One cycle: read the event-time window of the archive (``trainer.archive_source``), hold out
the sessions that start in its newest ``holdout`` slice, train a candidate on the rest
(GRU4Rec, HRNN and p-RNN warm-start from the published model of the same kind unless
``cold``: known items keep their rows, new items get new rows after them, and the epochs are
the new events' share, ``trainer.warmstart``), evaluate candidate and published model on the
same holdout events (items both know), and publish through the registry
(``streamrec.loop.registry``) only if the candidate is not degenerate and, with a published model,
the holdout is large enough to decide (``min_holdout_events``) and shows the candidate no
worse than the published model beyond ``tolerance`` (at confidence ``gate_z``, default 0: the
point estimates; :func:`compare`).
A published checkpoint carries a held-out slice and its Recall@20 for the workers' own gate
(``trainer.holdout``). Every cycle appends one line to ``MODELS/retrain-log.jsonl``."""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from streamrec.data.clicklog import DAY, DataError
from streamrec.errors import StreamrecError
from streamrec.loop import registry
from streamrec.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from streamrec.model.gru4rec import GRU4Rec
from trainer.archive_source import parse_duration, read_archive
from trainer.holdout import HOLDOUT_KEY, gate_figures
from trainer.warmstart import FeatureMismatch, grow_gru4rec, train_hier_warm, warm_epochs

__all__ = ["RetrainConfig", "RetrainError", "compare", "degenerate", "grow_gru4rec", "run_cycle"]


class RetrainError(StreamrecError, RuntimeError):
    """A cycle that cannot run (no data, bad options); the message says why."""


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
    tolerance: float = 0.02  # relative: candidate >= current * (1 - tolerance) ...
    metric: str = "recall@20"
    keep: int = registry.DEFAULT_KEEP
    min_item_support: int = 1
    progress: bool = True
    #: test hook: transform the training frame (e.g. shuffle items for a degenerate model)
    corrupt: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    #: ... at this one-sided confidence (z score; 0: the point estimates alone). Default 0:
    #: the bound uses the unpaired error of two proportions, far wider than the true (paired)
    #: one, and at 1.645 it refused every candidate of a monthly MovieLens backtest, better
    #: ones included (+0.012 Recall@20 on 737 predictions): bench/results/backtest-ml1m.md
    gate_z: float = 0.0
    #: with a published model, fewer holdout predictions than this: keep it, do not decide
    #: (below ~100 the normal bound of ``compare`` is not to be trusted; above it the bound
    #: itself weighs the holdout's size against the difference)
    min_holdout_events: int = 100
    #: epochs of a warm-start cycle; None: the new events' share (trainer.warmstart)
    warm_epochs: int | None = None
    # the model's own options, as ``trainer train`` takes them
    variant: str | None = None
    features: str | None = None
    item_meta: str | None = None
    schedule: str | None = None


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


def _new_events(train: pd.DataFrame, current: Checkpoint | None) -> int | None:
    """Training events newer than the parent's training data (None: the parent lacks it)."""
    if current is None:
        return None
    stats = current.data_stats or {}
    last = stats.get("train_last_event")
    if last is None:  # an older retrain checkpoint: its whole window (holdout included)
        last = (stats.get("window") or {}).get("last_event")
    if last is None:
        return None
    return int((train["Time"].to_numpy() > float(last)).sum())


def _feature_builder(cfg: RetrainConfig, params: Any) -> Callable[..., list[Any]] | None:
    if cfg.features is None and cfg.item_meta is None:
        return None
    from trainer.features import build_item_features

    def build(index: dict[str, int], n: int) -> list[Any]:
        return build_item_features(
            index, n, features_path=cfg.features, item_meta_path=cfg.item_meta,
            category_columns=params.category_columns, text_columns=params.text_columns,
            tfidf_dim=params.tfidf_dim, missing_flag=params.missing_flag,
        )  # fmt: skip

    return build


@dataclass
class Trained:
    model: Any
    item_ids: list[str]
    stats: dict[str, Any]
    train_params: dict[str, Any]
    warm: bool
    epochs: int | None = None
    note: str | None = None  # why a warm start fell back to cold
    #: the optimiser's accumulators after training, saved beside the checkpoint
    optimizer_state: dict[str, torch.Tensor] | None = None
    optimizer_continued: bool = False


#: the Adagrad accumulators of a published GRU4Rec, in its checkpoint directory
OPTIMIZER_FILE = "optimizer.safetensors"


def _saved_optimizer(path: Path | None) -> dict[str, torch.Tensor] | None:
    """A published model's optimiser state, or None (absent or unreadable: a fresh one)."""
    if path is None or not (path / OPTIMIZER_FILE).is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path / OPTIMIZER_FILE))
    except (OSError, SafetensorError):
        return None


def _train(
    cfg: RetrainConfig,
    train: pd.DataFrame,
    current: Checkpoint | None,
    echo: Callable[[str], None],
    current_path: Path | None = None,
) -> Trained:
    """Train the candidate: warm from ``current`` (same model kind, unless ``cfg.cold``), else
    from scratch through the model's ``trainer train`` job."""
    warm = not cfg.cold and current is not None and current.model_name == cfg.model_name
    epochs: int | None = None
    if cfg.model_name == "gru4rec":
        from trainer.presets import ParamError, make_params
        from trainer.train import train_gru4rec

        try:
            params = make_params(cfg.preset, cfg.params)
        except ParamError as e:
            raise RetrainError(f"--param/--preset: {e}") from None
        init = None
        saved = None
        if warm and current is not None:
            assert isinstance(current.model, GRU4Rec)
            init = (current.model.to("cpu"), current.item_ids)
            epochs = cfg.warm_epochs or warm_epochs(
                params.n_epochs, _new_events(train, current), len(train)
            )
            params.n_epochs = epochs
            saved = _saved_optimizer(current_path)
        bar = cfg.progress and sys.stderr.isatty()
        try:
            model, ids, stats = train_gru4rec(
                train, params, progress=bar, init=init, init_optimizer=saved, keep_optimizer=True
            )
        except ValueError as e:
            raise RetrainError(f"training failed: {e}") from None
        state = stats.pop("optimizer_state", None)
        return Trained(model, ids, stats, params.to_dict(), warm, epochs, None, state, bool(saved))
    from trainer.cli import TRAINERS
    from trainer.jobs import TrainJob

    if cfg.model_name not in TRAINERS:
        raise RetrainError(f"unknown model {cfg.model_name!r} (known: {', '.join(TRAINERS)})")
    note = None
    if warm and current is not None:
        from trainer.train_hier import HRNNParams, PRNNParams, parse_hier_params

        cls = HRNNParams if cfg.model_name == "hrnn" else PRNNParams
        try:
            p = parse_hier_params(cfg.params, cls, cfg.preset)
        except ValueError as e:
            raise RetrainError(f"--param/--preset: {e}") from None
        if cfg.model_name == "prnn":
            p.schedule = cfg.schedule or "joint"
        epochs = cfg.warm_epochs or warm_epochs(p.n_epochs, _new_events(train, current), len(train))
        p.n_epochs = epochs
        log = (lambda s: echo("      " + s)) if cfg.progress else None
        saved = _saved_optimizer(current_path)
        try:
            grown, ids, stats, tp = train_hier_warm(
                cfg.model_name, current.model, current.item_ids, train, p,
                variant=getattr(current.model, "variant", None),
                features=_feature_builder(cfg, p), log=log, init_optimizer=saved,
            )  # fmt: skip
            state = stats.pop("optimizer_state", None)
            return Trained(grown, ids, stats, tp, True, epochs, None, state, bool(saved))
        except FeatureMismatch as e:
            # the item features changed shape: the old input layers do not apply
            note = f"warm start impossible, trained cold: {e}"
            echo("      " + note)
        except ValueError as e:
            raise RetrainError(f"warm start: {e}") from None
    import click

    opts = {"--variant": cfg.variant, "--features": cfg.features, "--item-meta": cfg.item_meta,
            "--schedule": cfg.schedule}  # fmt: skip
    opts = {k: v for k, v in opts.items() if v is not None}
    try:
        out = TRAINERS[cfg.model_name](TrainJob(train, cfg.preset, cfg.params, opts, cfg.progress))
    except click.ClickException as e:  # the model's trainer refuses an option or the data
        raise RetrainError(f"--model {cfg.model_name}: {e.format_message()}") from None
    return Trained(out.model, out.item_ids, out.stats, out.train_params, False, None, note)


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


def compare(
    cand: float, cur: float, n: int, tolerance: float, z: float
) -> tuple[bool, float, float]:
    """Non-inferiority of the candidate on ``n`` holdout predictions:
    ``(passes, lower bound of cand - cur, margin)``.

    The candidate passes when the one-sided lower confidence bound of ``cand - cur`` (at
    ``z`` standard errors) is at least ``-tolerance * cur``: the data must show it is not
    worse beyond the tolerance, so a small holdout, whose differences are noise, keeps the
    current model. The standard error is that of two independent proportions,
    ``sqrt((c(1-c) + o(1-o)) / n)``: the two models are scored on the same events, whose
    hits are positively correlated, so the paired error is smaller and this one errs toward
    keeping the current model.
    """
    se = math.sqrt(max(cand * (1 - cand) + cur * (1 - cur), 0.0) / max(n, 1))
    lower = (cand - cur) - z * se
    margin = -tolerance * cur
    return lower >= margin, lower, margin


class _Bars:
    """Progress bars for the read and evaluate phases (rich, on stderr); nothing when off or
    stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.progress: Any = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=Console(stderr=True),
            )  # fmt: skip

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A bar; the returned function advances it by n."""
        if self.progress is None:
            return lambda n: None
        tid = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(tid, n)


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
        with _Bars(cfg.progress) as bars:
            sl = read_archive(
                cfg.archive, window=window_s, progress=lambda total: bars.task("read", total)
            )
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
    tr = _train(cfg, train, current, echo, current_path)
    model, item_ids, stats, warm = tr.model, tr.item_ids, tr.stats, tr.warm
    phases["train"] = time.perf_counter() - t
    old_ids = set(current.item_ids) if current else set()
    rec["warm_start"] = warm
    rec["warm_epochs"] = tr.epochs
    rec["optimizer_continued"] = tr.optimizer_continued
    rec["new_train_events"] = _new_events(train, current)
    if tr.note:
        rec["note"] = tr.note
    rec["items"] = len(item_ids)
    rec["new_items"] = sum(1 for i in item_ids if i not in old_ids)

    echo("[3/4] evaluating candidate and current model on the holdout")
    t = time.perf_counter()
    cand_index = {iid: r for r, iid in enumerate(item_ids)}
    cur_index = current.item_index if current else {}
    gate_test = _restrict(test, cand_index, *([cur_index] if current else []))
    cand_m: dict[str, float] = {}
    cur_m: dict[str, float] = {}
    with _Bars(cfg.progress) as bars:
        advance = bars.task("evaluate", 3 if current is not None else 2)
        if len(gate_test):
            cand_m = _evaluate(cfg.model_name, model, gate_test, cand_index, train)
            advance(1)
            if current is not None:
                cur_m = _evaluate(current.model_name, current.model, gate_test, cur_index, train)
                advance(1)
        # the slice and figure a worker's relative gate checks this checkpoint against
        slice_stats, slice_metrics = gate_figures(model, item_ids, test)
        advance(1)
    phases["evaluate"] = time.perf_counter() - t
    n_gate = int(min(cand_m.get("n_events", 0), cur_m.get("n_events", 0) if cur_m else 1 << 62))
    rec["metrics"] = {
        "candidate": cand_m,
        "current": cur_m,
        "holdout_events": len(gate_test),
        "holdout_predictions": n_gate,
        "slice": {"sessions": len(slice_stats.get(HOLDOUT_KEY, [])), **slice_metrics},
    }

    # ---- the gate
    reason: str | None
    if not len(gate_test):
        reason = "no holdout events with items both models know: nothing to gate on"
    else:
        reason = degenerate(cand_m, cfg.metric, len(item_ids))
        if reason is None and current is not None and n_gate < cfg.min_holdout_events:
            reason = (
                f"the holdout has {n_gate} predictions (items both models know), fewer than "
                f"{cfg.min_holdout_events}: too few to compare, not deciding"
            )
        elif reason is None and current is not None:
            c, o = cand_m[cfg.metric], cur_m.get(cfg.metric, 0.0)
            ok, lower, margin = compare(c, o, n_gate, cfg.tolerance, cfg.gate_z)
            rec["metrics"]["gate"] = {"lower_bound": lower, "margin": margin, "z": cfg.gate_z}
            if not ok:
                reason = (
                    f"candidate {cfg.metric} {c:.4f} vs current {o:.4f} on {n_gate} "
                    f"predictions: not shown within the tolerance {cfg.tolerance:.0%} "
                    f"(lower bound of the difference {lower:+.4f} < {margin:+.4f})"
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
            train_params=tr.train_params,
            data_stats={
                "source": f"archive:{cfg.archive}",
                "window": sl.summary(),
                "train_events": len(train),
                "train_last_event": float(train["Time"].max()),
                "n_items": len(item_ids),
                "new_items": rec["new_items"],
                "warm_start": warm,
                "warm_epochs": tr.epochs,
                "parent": current.version if current else None,
                **slice_stats,
            },
            metrics={**{f"gate_{k}": v for k, v in cand_m.items()}, **slice_metrics},
        )
        if tr.optimizer_state:
            from safetensors.torch import save_file

            # beside the checkpoint (workers never read it): the next warm start continues it
            save_file(tr.optimizer_state, str(staging / OPTIMIZER_FILE))
        version = registry.add_version(cfg.models, staging)
        rec["pruned"] = registry.publish(cfg.models, version, cfg.keep)
    phases["publish"] = time.perf_counter() - t
    rec["decision"] = {"published": reason is None, "version": version, "reason": reason}
    rec["seconds"] = {k: round(v, 4) for k, v in phases.items()}
    rec["train_stats"] = {
        k: stats.get(k)
        for k in ("train_seconds", "train_events_per_s", "n_items", "epoch_losses")
        if k in stats
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
    @click.option(
        "--gate-z",
        default=0.0,
        show_default=True,
        help="Confidence of the gate: the candidate must be shown within the tolerance at "
        "this one-sided z (0: compare the point estimates; e.g. 1.645 for 95%).",
    )
    @click.option(
        "--min-holdout-events",
        default=100,
        show_default=True,
        help="With a published model, fewer holdout predictions than this keep it.",
    )
    @click.option(
        "--warm-epochs",
        default="auto",
        show_default=True,
        help="Epochs of a warm start: N, or auto (the new events' share of n_epochs).",
    )
    @click.option("--min-item-support", default=1, show_default=True)
    @click.option("--variant", default=None, help="HRNN variant (init, all), as trainer train")
    @click.option("--features", default=None, help="p-RNN item feature file, as trainer train")
    @click.option("--item-meta", default=None, help="p-RNN item metadata, as trainer train")
    @click.option("--schedule", default=None, help="p-RNN training schedule")
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
        gate_z: float,
        min_holdout_events: int,
        warm_epochs: str,
        min_item_support: int,
        variant: str | None,
        features: str | None,
        item_meta: str | None,
        schedule: str | None,
        progress: bool,
    ) -> None:
        """Retrain from the click archive; publish the candidate if it passes the gate."""
        if once == bool(every):
            raise click.UsageError("give exactly one of --once and --every")
        if warm_epochs != "auto" and not (warm_epochs.isdigit() and int(warm_epochs) > 0):
            raise click.BadParameter("a positive integer or auto", param_hint="--warm-epochs")
        if gate_z < 0 or min_holdout_events < 0 or not 0 <= tolerance <= 1:
            raise click.UsageError("--gate-z, --min-holdout-events >= 0; --tolerance in [0, 1]")
        cfg = RetrainConfig(
            archive, models, window, holdout, model_name, preset, _split_values(params), cold,
            tolerance, metric, keep, min_item_support, progress, None, gate_z,
            min_holdout_events, None if warm_epochs == "auto" else int(warm_epochs), variant,
            features, item_meta, schedule,
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
