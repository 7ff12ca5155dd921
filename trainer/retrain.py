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
point estimates): ``streamrec.model.gate``, the rule of the workers' gate too.
A published checkpoint carries a held-out slice and its Recall@20 for the workers' own gate
(``trainer.holdout``). Every cycle appends one line to ``MODELS/retrain-log.jsonl``."""

from __future__ import annotations

import copy
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
import torch

from streamrec.data.clicklog import DAY, DataError
from streamrec.errors import StreamrecError
from streamrec.loop import registry
from streamrec.model.api import InnerProductScores, RegisteredModel, StepModel
from streamrec.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from streamrec.model.gate import HOLDOUT_KEY, gate
from streamrec.model.gru4rec import GRU4Rec
from streamrec.model.hrnn import HRNN
from streamrec.model.retrieval import publish_index
from trainer.archive_source import parse_duration, read_archive
from trainer.data import admit_new_items, restrict_to_items
from trainer.hier.params import HierParams, HRNNParams, PRNNParams, parse_hier_params
from trainer.holdout import gate_figures
from trainer.jobs import TrainJob
from trainer.models import TRAINERS, evaluator_for
from trainer.successors import publish_successors
from trainer.warmstart import FeatureMismatch, grow_gru4rec, train_hier_warm, warm_epochs

__all__ = ["RetrainConfig", "RetrainError", "grow_gru4rec", "run_cycle"]


class RetrainError(StreamrecError, RuntimeError):
    """A cycle that cannot run (no data, bad options); the message says why."""


@dataclass
class RetrainConfig:
    archive: str
    models: str
    window: str | None = "14d"
    #: the newest slice held out: a duration, or ``auto`` (:func:`holdout_seconds`)
    holdout: str = "auto"
    model_name: str = "gru4rec"
    preset: str | None = None
    params: list[str] = field(default_factory=list)
    cold: bool = False
    tolerance: float = 0.02  # relative: candidate >= current * (1 - tolerance) ...
    metric: str = "recall@20"
    keep: int = registry.DEFAULT_KEEP
    #: a new item (not in the published catalogue) enters it only with this many training
    #: events in the window (trainer.data.admit_new_items); 2 leaves out ids that never repeat
    #: (bench/results/item-admission.md: what higher thresholds cost on real logs)
    min_item_support: int = 2
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
    #: build the ANN retrieval index into the version before publishing it (auto / always /
    #: never; auto: catalogues that ``model.retrieval=auto`` serves through an index)
    retrieval_index: str = "auto"
    #: what a candidate that passes the gate becomes: the champion (published, the workers
    #: serve it) or the challenger (served beside the champion: A/B or shadow)
    publish_as: str = registry.CHAMPION


def _now() -> str:
    return datetime.now(UTC).isoformat()


#: ``--holdout auto`` on a young archive: the slice in which this share of the window's
#: sessions (the newest) start
AUTO_HOLDOUT_SHARE = 0.1


def holdout_seconds(holdout: str, df: pd.DataFrame) -> float:
    """``--holdout``: a duration, or ``auto``: a day, or less on a young archive (an hour of
    clicks): the slice in which the newest tenth of the window's sessions start, so nine
    tenths are left to train on."""
    if holdout.strip().lower() != "auto":
        try:
            value = parse_duration(holdout)
        except DataError as e:
            raise RetrainError(f"--holdout: {e} or auto") from None
        return DAY if value is None else value
    if len(df) == 0:
        return DAY
    starts = df.groupby("SessionId", sort=False)["Time"].min().to_numpy()
    newest_tenth = float(df["Time"].max()) - float(np.quantile(starts, 1 - AUTO_HOLDOUT_SHARE))
    return min(DAY, newest_tenth)


def _span(seconds: float) -> str:
    """A duration for a message: ``2.5 h``, ``40 min``, ``3.0 d``."""
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.1f} d"
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def _no_training_data(df: pd.DataFrame, before: int, holdout_s: float, cfg: RetrainConfig) -> str:
    """Why nothing is left to train on, with the option to change."""
    span = float(df["Time"].max() - df["Time"].min())
    if before == 0:
        return (
            f"the holdout (--holdout {cfg.holdout} = {_span(holdout_s)}) holds every session: "
            f"the window's {len(df):,} events span {_span(span)}; pass --holdout auto (the "
            f"default) or a shorter one, e.g. --holdout {max(1, int(span * 0.1 / 60))}m"
        )
    return (
        f"no training sessions of >= 2 events among the {before:,} events before the holdout "
        f"(the window spans {_span(span)}, --holdout {cfg.holdout} = {_span(holdout_s)}): "
        "archive more clicks, or lower --min-item-support"
    )


def _split_holdout(df: pd.DataFrame, holdout_s: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Holdout = sessions starting in the newest ``holdout_s`` of event time."""
    start = df.groupby("SessionId", sort=False)["Time"].transform("min")
    is_test = (start >= df["Time"].max() - holdout_s).to_numpy()
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def _evaluate(
    name: str, model: StepModel, test: pd.DataFrame, index: dict[str, int], train: pd.DataFrame
) -> dict[str, float]:
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


def _feature_builder(cfg: RetrainConfig, params: HierParams) -> Callable[..., list[Any]] | None:
    """The p-RNN item features of the cycle's --features/--item-meta (None: none given)."""
    if not isinstance(params, PRNNParams) or (cfg.features is None and cfg.item_meta is None):
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
    model: RegisteredModel
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


#: GRU4Rec parameters that fix the shape of a model's tensors
_GRU4REC_SHAPE = ("layers", "embedding", "constrained_embedding")


def _keep_published_shape(params: Any, published: GRU4Rec, explicit: list[str]) -> None:
    """A warm start continues the published model, so its shape wins over the defaults and a
    preset (the demo publishes 48 units; the README's retrain, with the default 100, stopped
    on a torch traceback). An explicit ``--param`` that changes the shape is refused."""
    from trainer.presets import parse_kv

    given = {parse_kv(kv)[0] for kv in explicit}
    for key in _GRU4REC_SHAPE:
        was, want = getattr(published.config, key), getattr(params, key)
        if want == was:
            continue
        if key in given:
            raise RetrainError(
                f"--param {key}={want}: the published model has {key}={was}, and a warm start "
                "keeps its shape; drop the option, or add --cold to train a new model"
            )
        setattr(params, key, copy.deepcopy(was))


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
            _keep_published_shape(params, current.model, cfg.params)
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
    if cfg.model_name not in TRAINERS:
        raise RetrainError(f"unknown model {cfg.model_name!r} (known: {', '.join(TRAINERS)})")
    note = None
    if warm and current is not None:
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
                variant=current.model.variant if isinstance(current.model, HRNN) else None,
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
    opts = {"--variant": cfg.variant, "--features": cfg.features, "--item-meta": cfg.item_meta,
            "--schedule": cfg.schedule}  # fmt: skip
    opts = {k: v for k, v in opts.items() if v is not None}
    try:
        out = TRAINERS[cfg.model_name](TrainJob(train, cfg.preset, cfg.params, opts, cfg.progress))
    except click.ClickException as e:  # the model's trainer refuses an option or the data
        raise RetrainError(f"--model {cfg.model_name}: {e.format_message()}") from None
    return Trained(out.model, out.item_ids, out.stats, out.train_params, False, None, note)


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


def _summary(cfg: RetrainConfig, rec: dict[str, Any]) -> str:
    """The cycle's line; a candidate published as the challenger says so."""
    summary = registry.cycle_summary(rec)
    version = rec["decision"]["version"]
    if version is not None and cfg.publish_as == registry.CHALLENGER:
        summary = summary.replace(f"published {version}", f"{version} is the challenger", 1)
    return summary


def _publish_as(cfg: RetrainConfig, version: str) -> list[str]:
    """Make a version added to the registry the champion (published) or the challenger
    (``--publish-as``); returns the versions pruned."""
    if cfg.publish_as == registry.CHALLENGER:
        registry.set_alias(cfg.models, registry.CHALLENGER, version, by="retrain")
        return registry.prune(cfg.models, cfg.keep)
    return registry.publish(cfg.models, version, cfg.keep, by="retrain")


def _publish_retrieval(
    path: Path, model: object, item_ids: list[str], train: pd.DataFrame, when: str
) -> bool:
    """The ANN index and the window's successor table (``ann_index=head+successors``)
    beside a staged version; whether they were built."""
    if publish_index(path, model, when=when) is None:
        return False
    if isinstance(model, InnerProductScores):
        publish_successors(path, model, item_ids, train)
    return True


def run_cycle(cfg: RetrainConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """One retrain cycle; returns (and logs) its record. Raises RetrainError without data."""
    phases: dict[str, float] = {}
    rec: dict[str, Any] = {
        "time": _now(), "event": "retrain", "model": cfg.model_name, "archive": cfg.archive
    }  # fmt: skip
    try:
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
    df = sl.df
    if len(df) == 0:
        raise RetrainError(f"{cfg.archive}: no archived clicks in the window")
    holdout_s = holdout_seconds(cfg.holdout, df)
    before, test = _split_holdout(df, holdout_s)
    current_path = registry.resolve(cfg.models) if registry.is_registry(cfg.models) else None
    current = load_checkpoint(current_path) if current_path else None
    train, left_out = admit_new_items(
        before, current.item_ids if current else (), cfg.min_item_support, min_session_length=2
    )
    if cfg.corrupt is not None:
        train = cfg.corrupt(train)
    phases["read"] = time.perf_counter() - t
    rec["window"] = sl.summary()
    rec["holdout_seconds"] = holdout_s
    rec["events"] = {"window": len(df), "before_holdout": len(before), "train": len(train),
                     "holdout": len(test)}  # fmt: skip
    rec["left_out"] = left_out
    rec["current_version"] = current.version if current else None
    rec["metric"] = cfg.metric
    if len(train) == 0:
        raise RetrainError(_no_training_data(df, len(before), holdout_s, cfg))
    echo(
        f"      {len(df):,} events in {sl.files} files ({phases['read']:.1f} s): "
        f"{len(test):,} held out (sessions starting in the newest {_span(holdout_s)}), "
        f"{len(before):,} before them, of which {len(train):,} train "
        f"({len(before) - len(train):,} in sessions of one event or of rare items dropped)"
    )
    if left_out["items"]:
        echo(
            f"      {left_out['items']:,} new items with fewer than {cfg.min_item_support} "
            f"events left out ({left_out['events_dropped']:,} training events)"
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

    echo("[3/4] evaluating the candidate" + (
        " and the current model on the holdout" if current else " on the holdout (nothing "
        "published yet: it is published if it beats chance)"))  # fmt: skip
    t = time.perf_counter()
    cand_index = {iid: r for r, iid in enumerate(item_ids)}
    cur_index = current.item_index if current else {}
    gate_test = restrict_to_items(test, cand_index, *([cur_index] if current else []))
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

    # ---- the gate (streamrec.model.gate: the rule the workers' gate uses too)
    reason: str | None
    if not len(gate_test):
        reason = "no holdout events with items both models know: nothing to gate on"
    else:
        k = int(cfg.metric.split("@")[1]) if "@" in cfg.metric else 20
        decision = gate(
            cand_m.get(cfg.metric, math.nan),
            None if current is None else cur_m.get(cfg.metric, 0.0),
            tolerance=cfg.tolerance, n=n_gate, z=cfg.gate_z,
            chance=min(1.0, k / max(len(item_ids), 1)), min_n=cfg.min_holdout_events,
            name=f"candidate {cfg.metric}", against="current",
        )  # fmt: skip
        reason = decision.reason
        if decision.lower is not None:
            rec["metrics"]["gate"] = {
                "lower_bound": decision.lower, "margin": decision.margin, "z": cfg.gate_z
            }  # fmt: skip

    echo("[4/4] " + ("publishing" if reason is None else f"keeping the current model: {reason}"))
    t = time.perf_counter()
    version = None
    if reason is None:
        staging = registry.staging_dir(cfg.models, uuid.uuid4().hex[:8])
        candidate = save_checkpoint(
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
                "left_out": left_out,
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
        # the ANN index beside the weights before the version is visible: workers load it
        t_index = time.perf_counter()
        if _publish_retrieval(candidate.path, model, item_ids, train, cfg.retrieval_index):
            phases["index"] = time.perf_counter() - t_index
        version = registry.add_version(cfg.models, candidate)
        rec["pruned"] = _publish_as(cfg, version)
    phases["publish"] = time.perf_counter() - t
    rec["decision"] = {
        "published": reason is None,
        "version": version,
        "reason": reason,
        "as": cfg.publish_as,
    }
    rec["seconds"] = {k: round(v, 4) for k, v in phases.items()}
    rec["train_stats"] = {
        k: stats.get(k)
        for k in ("train_seconds", "train_events_per_s", "n_items", "epoch_losses")
        if k in stats
    }
    registry.append_log(cfg.models, rec)
    echo(_summary(cfg, rec))
    echo("      " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    return rec
