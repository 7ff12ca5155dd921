"""``trainer train|evaluate|baseline|retrain|models``: the offline command line. Nothing
imports it but the ``trainer`` entry point; the models it knows are ``trainer.models``."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import pandas as pd
import torch

from streamrec.errors import CommandGroup
from trainer.cli.models import models_group
from trainer.cli.options import (
    LoadOptions,
    MultiValueCommand,
    json_safe,
    k_option,
    load,
    load_options,
    parse_column_map,
    parse_ks,
    print_metrics,
    split_values,
    threads_option,
    ties_option,
    write_json,
)
from trainer.cli.retrain import retrain
from trainer.jobs import TrainJob
from trainer.models import TRAINERS, evaluator_for, known_items_test


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamrec", prog_name="trainer")
def main() -> None:
    """Offline GRU4Rec / HRNN / p-RNN: train, evaluate, baselines, retrain, the model registry."""


@main.command(cls=MultiValueCommand)
@click.option("--train", "train_path", required=True, type=click.Path(dir_okay=False))
@click.option("--test", "test_path", type=click.Path(dir_okay=False), default=None)
@click.option("--model", "model_name", default="gru4rec", show_default=True)
@click.option(
    "--preset", default=None, help="published parameter set, e.g. yoochoose_xe_shared_best"
)
@click.option("--param", "params", multiple=True, help="key=value (official names)")
@k_option
@ties_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@load_options
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
@threads_option
@click.option(
    "--retrieval-index",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="build the ANN retrieval index beside the checkpoint (auto: from "
    "streamrec.model.retrieval.AUTO_ANN_MIN_ITEMS items, where model.retrieval=auto uses it)",
)
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
    retrieval_index: str,
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
    param_list = split_values(params)
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
        evaluate = evaluator_for(outcome.model_name)
        try:
            metrics.update(evaluate(outcome.model, test_df, index, cut, ties, None, train_df))
        except ValueError as e:  # no test events left, no UserId for a per-user evaluation
            raise click.ClickException(str(e)) from None
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
        metrics=json_safe(metrics),
    ).path
    write_json(out / "metrics.json", {"model": outcome.model_name, **metrics, "ties": ties})
    if _publish_index(out, outcome.model, retrieval_index):
        _publish_successors(out, outcome.model, outcome.item_ids, train_df)
    if test_df is not None:
        print_metrics(metrics, f"{outcome.model_name} on {test_path} (ties={ties})", cut)
    device = outcome.stats.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = str(device).startswith("cpu")
    click.echo(
        f"checkpoint: {out}  ({outcome.stats.get('train_seconds', 0):.1f} s, "
        f"{outcome.stats.get('train_events_per_s', 0):,.0f} events/s"
        + (f", {torch.get_num_threads()} CPU thread(s))" if on_cpu else ")"),
        err=True,
    )


@main.command(cls=MultiValueCommand)
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False))
@click.option("--test", "test_path", required=True, type=click.Path(dir_okay=False))
@click.option("--train", "train_path", default=None, help="training log (models with user state)")
@k_option
@ties_option
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if present)")
@click.option(
    "--retrieval",
    type=click.Choice(["all", "exact", "ann", "auto"]),
    default="all",
    show_default=True,
    help="all: rank the target among every item; exact / ann / auto: rank it within the "
    "top-k the worker would answer with that model.retrieval (ann: the index beside the "
    "checkpoint, built and saved there when missing or stale)",
)
@click.option(
    "--ann-index",
    type=click.Choice(["hnsw", "head", "head+hnsw", "head+successors"]),
    default="hnsw",
    show_default=True,
    help="with --retrieval ann: the index (model.ann_index; head+successors: the table beside "
    "the checkpoint, built from --train and saved there when missing or stale)",
)
@click.option(
    "--successors",
    type=click.IntRange(min=1),
    default=None,
    help="with --ann-index head+successors: successors per item (model.ann_successors)",
)
@click.option(
    "--head-items",
    type=click.IntRange(min=1),
    default=None,
    help="with --ann-index head: items scored exactly (model.ann_head_items; default 130,000)",
)
@load_options
@threads_option
def evaluate(
    model_dir: str,
    test_path: str,
    train_path: str | None,
    ks: tuple[str, ...],
    ties: str,
    as_json: bool,
    device: str | None,
    retrieval: str,
    ann_index: str,
    head_items: int | None,
    successors: int | None,
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
    extra: dict[str, Any] = {}
    retriever = None
    if retrieval != "all":
        from streamrec.model.ann import AnnParams

        params = AnnParams(kind=ann_index)
        if head_items is not None:
            params = replace(params, head_items=head_items)
        if successors is not None:
            params = replace(params, successors=successors)
        retriever, extra = _retriever(ck.model, Path(model_dir), retrieval, dev, params)
        if retriever.mode == "ann" and params.kind == "head+successors":
            retriever.successors = _evaluate_successors(ck, Path(model_dir), train_df, params)
            extra["successors"] = params.successors
    t0 = time.perf_counter()
    try:
        metrics = evaluator_for(ck.model_name)(
            ck.model, test_df, ck.item_index, cut, ties, dev, train_df, retriever=retriever
        )
    except ValueError as e:  # no test events left, no UserId for a per-user evaluation
        raise click.ClickException(str(e)) from None
    metrics = {**metrics, **extra, "evaluate_seconds": round(time.perf_counter() - t0, 2)}
    if as_json:
        click.echo(json.dumps(json_safe(dict(metrics)), indent=2))
    else:
        print_metrics(dict(metrics), f"{ck.model_name} {ck.version} (ties={ties})", cut)


def _publish_index(out: Path, model: Any, when: str) -> bool:
    """The ANN index beside a new checkpoint (``--retrieval-index``); whether one was built."""
    from streamrec.model.retrieval import publish_index

    index = publish_index(out, model, when=when)
    if index is not None:
        click.echo(
            f"retrieval index: {index.n_items:,} items, {index.nbytes / 2**20:,.0f} MiB, "
            f"built in {index.meta['build_seconds']:.1f} s",
            err=True,
        )
    return index is not None


def _publish_successors(out: Path, model: Any, item_ids: Any, train_df: pd.DataFrame) -> None:
    """The successor table beside a new checkpoint whose index was published."""
    from trainer.successors import publish_successors

    t0 = time.perf_counter()
    table = publish_successors(out, model, item_ids, train_df)
    click.echo(
        f"successor table: {table.n_items:,} items x {table.width}, "
        f"built in {time.perf_counter() - t0:.1f} s",
        err=True,
    )


def _evaluate_successors(ck: Any, ckpt_dir: Path, train_df: Any, params: Any) -> Any:
    """The successor table ``trainer evaluate`` scores with: the one the worker would load,
    else (with --train) one built and saved the way ``trainer train`` publishes it."""
    from streamrec.model.successors import SuccessorTableError, load_table

    try:
        with torch.inference_mode():
            return load_table(ckpt_dir, ck.model.item_vectors(), params.successors)
    except SuccessorTableError as exc:
        if train_df is None:
            raise click.ClickException(f"{exc}; pass --train to build it") from None
    from trainer.successors import publish_successors

    return publish_successors(ckpt_dir, ck.model, ck.item_index, train_df, params.successors)


def _retriever(
    model: Any, ckpt_dir: Path, retrieval: str, device: Any, params: Any
) -> tuple[Any, dict[str, Any]]:
    """The retrieval ``trainer evaluate --retrieval`` ranks through, and what it cost."""
    import torch

    from streamrec.model.ann import load_or_build
    from streamrec.model.retrieval import Retriever, choose_retrieval

    try:
        mode = choose_retrieval(retrieval, int(model.n_items), device, model)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    extra: dict[str, Any] = {"retrieval": mode}
    if mode == "exact":
        return Retriever(model), extra
    t0 = time.perf_counter()
    with torch.inference_mode():
        index = load_or_build(ckpt_dir, model.item_vectors(), params)
    extra.update(
        index_seconds=round(time.perf_counter() - t0, 2),
        index_built_seconds=index.meta["build_seconds"],
        index_bytes=index.nbytes,
        index_params=index.meta["params"],
    )
    return Retriever(model, mode="ann", index=index, candidates=params.candidates), extra


@main.command(cls=MultiValueCommand)
@click.option("--name", required=True, help="pop, spop, item-knn, bpr-mf")
@click.option("--train", "train_path", required=True, type=click.Path(dir_okay=False))
@click.option("--test", "test_path", required=True, type=click.Path(dir_okay=False))
@k_option
@ties_option
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON")
@click.option("--device", default=None)
@load_options
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
    try:
        test_df = known_items_test(test_df, index)
        metrics = run_baseline(name, train_df, test_df, cut, ties, device=device)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(json_safe(dict(metrics)), indent=2))
    else:
        print_metrics(dict(metrics), f"{name} on {test_path} (ties={ties})", cut)


main.add_command(retrain)
main.add_command(models_group)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
