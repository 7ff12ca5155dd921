"""``trainer train|evaluate|baseline``: the offline command line.

Models plug in through two small tables: :data:`TRAINERS` (``--model NAME`` -> a function
``TrainJob -> TrainOutcome``) and :data:`EVALUATORS` (checkpoint ``model_name`` -> an
evaluation function); an unlisted model is evaluated next-item through the step API.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pandas as pd

from streamrec.errors import CommandGroup
from trainer import train_hier
from trainer.jobs import Evaluator, TrainJob, TrainOutcome

# ----------------------------------------------------------------------------- option helpers


#: options that take one or more values: ``--k 1 5 10 20`` (also ``--k 1 --k 5``)
MULTI_VALUE_OPTIONS = ("--k", "--param", "--column-map")


class MultiValueCommand(click.Command):
    """A command whose :data:`MULTI_VALUE_OPTIONS` take every plain value that follows them:
    the arguments are rewritten to click's repeated form before click parses them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        current: str | None = None  # the multi-value option being filled
        filled = False
        for arg in args:
            if arg.startswith("-"):
                current, filled = (arg, False) if arg in MULTI_VALUE_OPTIONS else (None, False)
                out.append(arg)
            elif current is not None and filled:
                out += [current, arg]  # a further value: repeat the option
            else:
                out.append(arg)
                filled = current is not None
        return super().parse_args(ctx, out)


def _split_values(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(x for x in str(v).replace(",", " ").split() if x)
    return out


def parse_ks(values: Sequence[str]) -> tuple[int, ...]:
    if not values:
        return (1, 5, 10, 20)
    try:
        ks = tuple(sorted({int(x) for x in _split_values(values)}))
    except ValueError:
        raise click.BadParameter(f"--k takes positive integers, got {' '.join(values)}") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter("--k takes positive integers")
    return ks


def parse_column_map(values: Sequence[str]) -> dict[str, str] | None:
    """``SessionId=sess ItemId=product Time=ts`` (or comma separated) -> mapping."""
    if not values:
        return None
    out: dict[str, str] = {}
    for item in _split_values(values):
        if "=" not in item:
            raise click.BadParameter(f"--column-map entries are OURS=THEIRS, got {item!r}")
        ours, theirs = item.split("=", 1)
        if ours not in ("SessionId", "ItemId", "Time", "UserId"):
            raise click.BadParameter(
                f"--column-map: unknown column {ours!r} (SessionId, ItemId, Time, UserId)"
            )
        out[ours] = theirs
    return out


@dataclass
class LoadOptions:
    fmt: str | None = None
    column_map: dict[str, str] | None = None
    session_gap: float | None = None
    # event-time window of an ``archive:DIR`` source (trainer.archive_source)
    since: str | None = None
    until: str | None = None
    window: str | None = None


def load(path: str, opts: LoadOptions) -> pd.DataFrame:
    """Load a click file (``streamrec.data.clicklog.load_clicks``) or ``archive:DIR``
    (``trainer.archive_source``), sessionizing by a gap when asked."""
    from streamrec.data.clicklog import DataError, load_clicks
    from trainer.archive_source import PREFIX, load_archive
    from trainer.data import sessionize

    try:
        if path.startswith(PREFIX):
            df = load_archive(path, since=opts.since, until=opts.until, window=opts.window)
        elif opts.since or opts.until or opts.window:
            raise DataError("--since/--until/--window apply to an archive:DIR source only")
        else:
            df = load_clicks(path, column_map=opts.column_map, fmt=opts.fmt)
        if opts.session_gap is not None:
            df = sessionize(df, opts.session_gap)
    except DataError as e:
        raise click.ClickException(str(e)) from None
    return df


def restrict_to_items(test: pd.DataFrame, item_index: dict[str, int]) -> pd.DataFrame:
    """Keep test events of known items and sessions that still have >= 2 events."""
    n0 = len(test)
    test = test[test["ItemId"].astype(str).isin(item_index)]
    lens = test.groupby("SessionId", sort=False)["SessionId"].transform("size")
    test = test[lens >= 2].reset_index(drop=True)
    if len(test) < n0:
        click.echo(
            f"test: kept {len(test):,} of {n0:,} events (known items, sessions >= 2 events)",
            err=True,
        )
    if len(test) == 0:
        raise click.ClickException("no test events left after restricting to training items")
    return test


def print_metrics(metrics: dict[str, Any], title: str, ks: Sequence[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("k", justify="right")
    table.add_column("Recall@k", justify="right")
    table.add_column("MRR@k", justify="right")
    for k in ks:
        r, m = metrics.get(f"recall@{k}"), metrics.get(f"mrr@{k}")
        if r is not None:
            table.add_row(str(k), f"{r:.4f}", f"{m:.4f}")
    console = Console()
    console.print(table)
    extra = {k: v for k, v in metrics.items() if "@" not in k}
    if extra:
        console.print(
            "  ".join(
                f"{k}={v:,.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
            )
        )


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- model tables


def _train_gru4rec(job: TrainJob) -> TrainOutcome:
    from trainer.presets import ParamError, make_params
    from trainer.train import train_gru4rec

    unused = [k for k, v in job.options.items() if v not in (None, (), [])]
    if unused:
        raise click.UsageError(f"--model gru4rec does not take {', '.join(unused)}")
    try:
        params = make_params(job.preset, job.params)
    except ParamError as e:
        raise click.BadParameter(str(e), param_hint="--param/--preset") from None
    try:
        model, item_ids, stats = train_gru4rec(job.train_df, params, progress=job.progress)
    except ValueError as e:
        raise click.ClickException(f"training failed: {e}") from None
    return TrainOutcome(model, "gru4rec", item_ids, stats, params.to_dict())


def _eval_next_item(
    model: Any,
    test_df: pd.DataFrame,
    item_index: dict[str, int],
    ks: Sequence[int],
    ties: str,
    device: Any = None,
    train_df: pd.DataFrame | None = None,
) -> dict[str, float]:
    from trainer.evaluate import evaluate_next_item

    test_df = restrict_to_items(test_df, item_index)
    return evaluate_next_item(model, test_df, item_index, ks=ks, ties=ties, device=device)


#: ``--model NAME`` -> trainer.  HRNN / p-RNN register here.
TRAINERS: dict[str, Callable[[TrainJob], TrainOutcome]] = {
    "gru4rec": _train_gru4rec,
    "hrnn": train_hier.train_hrnn_job,
    "prnn": train_hier.train_prnn_job,
}
#: checkpoint ``model_name`` -> evaluator (default: next-item through the step API).
EVALUATORS: dict[str, Evaluator] = {
    "gru4rec": _eval_next_item,
    "hrnn": train_hier.evaluate_users_job,
    "prnn": train_hier.evaluate_users_job,
}


def evaluator_for(model_name: str) -> Evaluator:
    return EVALUATORS.get(model_name, _eval_next_item)


# ----------------------------------------------------------------------------- commands

_k_option = click.option("--k", "ks", multiple=True, help="cut-offs, e.g. --k 1 5 10 20 (default)")
_ties_option = click.option(
    "--ties",
    type=click.Choice(["standard", "conservative", "median"]),
    default="conservative",
    show_default=True,
    help="rank of the target among items with an equal score",
)


def _load_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--column-map",
        "column_map",
        multiple=True,
        help="OURS=THEIRS column names, e.g. SessionId=sess ItemId=product Time=ts",
    )(f)
    f = click.option(
        "--format",
        "fmt",
        type=click.Choice(["gru4rec", "yoochoose", "csv", "tsv", "parquet"]),
        default=None,
        help="input format (default: from the file name / first line)",
    )(f)
    f = click.option(
        "--session-gap",
        type=float,
        default=None,
        help="split each user's events into sessions at gaps longer than this (seconds)",
    )(f)
    return f


@click.group(cls=CommandGroup)
def main() -> None:
    """Offline GRU4Rec / HRNN / p-RNN: train, evaluate, baselines."""


@main.command(cls=MultiValueCommand)
@click.option("--train", "train_path", required=True, type=click.Path(dir_okay=False))
@click.option("--test", "test_path", type=click.Path(dir_okay=False), default=None)
@click.option("--model", "model_name", default="gru4rec", show_default=True)
@click.option(
    "--preset", default=None, help="published parameter set, e.g. yoochoose_xe_shared_best"
)
@click.option("--param", "params", multiple=True, help="key=value (official names)")
@_k_option
@_ties_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@_load_options
@click.option("--variant", default=None, help="HRNN variant (init, all)")
@click.option("--features", default=None, help="p-RNN item feature file(s)")
@click.option("--item-meta", default=None, help="item metadata file (p-RNN features)")
@click.option("--schedule", default=None, help="p-RNN training schedule")
@click.option(
    "--split",
    type=click.Choice(["last-session"]),
    default=None,
    help="hold out each user's last session of --train as the test set (instead of --test)",
)
@click.option("--since", default=None, help="archive:DIR: first event time (epoch s or ISO)")
@click.option("--until", default=None, help="archive:DIR: end event time (exclusive)")
@click.option(
    "--window", default=None, help="archive:DIR: e.g. 14d, back from the newest archived event"
)
@click.option("--progress/--no-progress", default=True)
def train(
    train_path: str,
    test_path: str | None,
    model_name: str,
    preset: str | None,
    params: tuple[str, ...],
    ks: tuple[str, ...],
    ties: str,
    out_dir: str,
    column_map: tuple[str, ...],
    fmt: str | None,
    session_gap: float | None,
    variant: str | None,
    features: str | None,
    item_meta: str | None,
    schedule: str | None,
    split: str | None,
    since: str | None,
    until: str | None,
    window: str | None,
    progress: bool,
) -> None:
    """Train a model, save the checkpoint to --out, evaluate on --test."""
    from streamrec.model.checkpoint import save_checkpoint
    from trainer.presets import ParamError, parse_kv

    if model_name not in TRAINERS:
        raise click.BadParameter(
            f"unknown model {model_name!r} (known: {', '.join(sorted(TRAINERS))})",
            param_hint="--model",
        )
    cut = parse_ks(ks)
    lopts = LoadOptions(fmt, parse_column_map(column_map), session_gap, since, until, window)
    param_list = _split_values(params)
    if model_name == "gru4rec":
        try:  # fail on a bad key before loading data
            for kv in param_list:
                parse_kv(kv)
        except ParamError as e:
            raise click.BadParameter(str(e), param_hint="--param") from None
    train_df = load(train_path, lopts)
    test_opts = LoadOptions(fmt, lopts.column_map, session_gap)
    test_df = load(test_path, test_opts) if test_path else None
    if split == "last-session":
        if test_df is not None:
            raise click.UsageError("give either --test or --split, not both")
        if "UserId" not in train_df.columns:
            raise click.UsageError("--split last-session needs a UserId column in --train")
        from trainer.data import split_last_session_out

        train_df, test_df = split_last_session_out(train_df)
        test_path = f"{train_path} (each user's last session)"
    job = TrainJob(
        train_df,
        preset,
        param_list,
        {"--variant": variant, "--features": features, "--item-meta": item_meta,
         "--schedule": schedule},
        progress,
    )  # fmt: skip
    outcome = TRAINERS[model_name](job)
    metrics: dict[str, Any] = {}
    if test_df is not None:
        index = {iid: r for r, iid in enumerate(outcome.item_ids)}
        t0 = time.perf_counter()
        metrics.update(
            evaluator_for(outcome.model_name)(
                outcome.model, test_df, index, cut, ties, None, train_df
            )
        )
        metrics["eval_seconds"] = time.perf_counter() - t0
    metrics["train_seconds"] = outcome.stats.get("train_seconds")
    metrics["train_events_per_s"] = outcome.stats.get("train_events_per_s")
    data_stats = {
        "train_path": str(train_path),
        "train_events": len(train_df),
        "train_sessions": int(train_df["SessionId"].nunique()),
        "n_items": len(outcome.item_ids),
    }
    if test_df is not None:
        from trainer.holdout import gate_figures

        data_stats["test_path"] = str(test_path)
        # a bounded slice of the test set and its Recall@20: the workers' relative gate
        slice_stats, slice_metrics = gate_figures(outcome.model, outcome.item_ids, test_df)
        data_stats.update(slice_stats)
        metrics.update(slice_metrics)
    out = save_checkpoint(
        out_dir,
        outcome.model,
        outcome.model_name,
        outcome.item_ids,
        train_params=outcome.train_params,
        data_stats=data_stats,
        metrics=_json_safe(metrics),
    )
    _write_json(out / "metrics.json", {"model": outcome.model_name, **metrics, "ties": ties})
    if test_df is not None:
        print_metrics(metrics, f"{outcome.model_name} on {test_path} (ties={ties})", cut)
    click.echo(
        f"checkpoint: {out}  ({outcome.stats.get('train_seconds', 0):.1f} s, "
        f"{outcome.stats.get('train_events_per_s', 0):,.0f} events/s)",
        err=True,
    )


@main.command(cls=MultiValueCommand)
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False))
@click.option("--test", "test_path", required=True, type=click.Path(dir_okay=False))
@click.option("--train", "train_path", default=None, help="training log (models with user state)")
@_k_option
@_ties_option
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if present)")
@_load_options
def evaluate(
    model_dir: str,
    test_path: str,
    train_path: str | None,
    ks: tuple[str, ...],
    ties: str,
    as_json: bool,
    device: str | None,
    column_map: tuple[str, ...],
    fmt: str | None,
    session_gap: float | None,
) -> None:
    """Evaluate a saved checkpoint next-item on --test."""
    from streamrec.model.checkpoint import CheckpointError, load_checkpoint
    from streamrec.model.device import resolve_device

    cut = parse_ks(ks)
    dev = resolve_device(device)
    try:
        ck = load_checkpoint(model_dir, dev)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    lopts = LoadOptions(fmt, parse_column_map(column_map), session_gap)
    test_df = load(test_path, lopts)
    train_df = load(train_path, lopts) if train_path else None
    metrics = evaluator_for(ck.model_name)(
        ck.model, test_df, ck.item_index, cut, ties, dev, train_df
    )
    if as_json:
        click.echo(json.dumps(_json_safe(dict(metrics)), indent=2))
    else:
        print_metrics(dict(metrics), f"{ck.model_name} {ck.version} (ties={ties})", cut)


@main.command(cls=MultiValueCommand)
@click.option("--name", required=True, help="pop, spop, item-knn, bpr-mf")
@click.option("--train", "train_path", required=True, type=click.Path(dir_okay=False))
@click.option("--test", "test_path", required=True, type=click.Path(dir_okay=False))
@_k_option
@_ties_option
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON")
@click.option("--device", default=None)
@_load_options
def baseline(
    name: str,
    train_path: str,
    test_path: str,
    ks: tuple[str, ...],
    ties: str,
    as_json: bool,
    device: str | None,
    column_map: tuple[str, ...],
    fmt: str | None,
    session_gap: float | None,
) -> None:
    """Fit and evaluate a baseline (POP, S-POP, item-kNN, BPR-MF) with the same evaluation."""
    from trainer.baselines import run_baseline

    cut = parse_ks(ks)
    lopts = LoadOptions(fmt, parse_column_map(column_map), session_gap)
    train_df = load(train_path, lopts)
    test_df = load(test_path, lopts)
    index = {str(i): 0 for i in pd.unique(train_df["ItemId"].astype(str))}
    test_df = restrict_to_items(test_df, index)
    try:
        metrics = run_baseline(name, train_df, test_df, cut, ties, device=device)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(_json_safe(dict(metrics)), indent=2))
    else:
        print_metrics(dict(metrics), f"{name} on {test_path} (ties={ties})", cut)


def _register_retrain() -> None:
    from trainer.retrain import commands

    for cmd in commands():
        main.add_command(cmd)


_register_retrain()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
