"""``trainer models list|show|rollback|alias|promote``: the model registry
(``streamrec.loop.registry``) as a person reads it: a line per version, a summary of one
version (``--json``: everything); the champion and challenger aliases."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import click

from streamrec.data.clicklog import EPOCH_TIMES_FROM
from streamrec.loop import registry
from streamrec.model.checkpoint import CheckpointError
from streamrec.model.gate import GATE_RATIO, HOLDOUT_KEY, HOLDOUT_METRIC

#: the checkpoint metrics of a retrain cycle's gate (``trainer.retrain``): the candidate's
#: figures on the cycle's whole holdout, named apart from the workers' slice figure
CYCLE_PREFIX = "gate_"


@click.group("models")
def models_group() -> None:
    """The model registry: list, show, rollback, alias, promote."""


models_opt = click.option("--models", required=True, help="Model registry directory.")


def _time(t: Any) -> str:
    """Event time for a person: a UTC date and time, or the number of an ordinal log."""
    if not isinstance(t, int | float):
        return "-"
    if t >= EPOCH_TIMES_FROM:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")
    return f"{t:,.0f}"


def _figure(metrics: Mapping[str, Any]) -> str:
    """The version's Recall@20 and where it was measured: the retrain cycle's holdout, or
    ``trainer train --test``'s test set."""
    cycle = metrics.get(f"{CYCLE_PREFIX}recall@20")
    if isinstance(cycle, int | float):
        n = metrics.get(f"{CYCLE_PREFIX}n_events")
        return f"recall@20 {cycle:.4f} on the cycle's holdout" + (
            f" ({int(n):,} predictions)" if isinstance(n, int | float) else "")  # fmt: skip
    test = metrics.get("recall@20")
    if isinstance(test, int | float):
        n = metrics.get("n_events")
        return f"recall@20 {test:.4f} on its test set" + (
            f" ({int(n):,} predictions)" if isinstance(n, int | float) else "")  # fmt: skip
    return ""


@models_group.command("list")
@models_opt
@click.option("--json", "as_json", is_flag=True, help="Every version's record as JSON.")
def list_cmd(models: str, as_json: bool) -> None:
    """Versions held, oldest first; * marks the published one."""
    registry.require_registry(models)
    vs = registry.list_versions(models)
    if as_json:
        click.echo(
            json.dumps([{**v.__dict__, "path": str(v.path)} for v in vs], indent=1, default=str)
        )
        return
    if not vs:
        click.echo(f"{models}: a registry with no versions yet", err=True)
    for v in vs:
        click.echo(
            f"{'*' if v.published else ' '} {v.version}  {v.model_name:<8} "
            f"{v.n_items:>8,} items  {v.created_at[:19]}  {_figure(v.metrics)}".rstrip()
            + (f"  [{', '.join(v.aliases)}]" if v.aliases else "")
        )


def _trained_on(stats: Mapping[str, Any]) -> list[str]:
    lines = []
    source = stats.get("source") or stats.get("train_path")
    if source is not None:
        what = f"{source}: {int(stats.get('train_events', 0)):,} events"
        if stats.get("train_sessions") is not None:
            what += f", {int(stats['train_sessions']):,} sessions"
        window = stats.get("window") or {}
        if window:
            what += (
                f"; window {_time(window.get('since'))} .. {_time(window.get('until'))}"
                f" (events {_time(window.get('first_event'))} .. "
                f"{_time(window.get('last_event'))})"
            )
        lines.append(what)
    if stats.get("parent"):
        start = "warm start" if stats.get("warm_start") else "cold start"
        epochs = stats.get("warm_epochs")
        lines.append(
            f"{start} after {stats['parent']}" + (f", {epochs} epoch(s)" if epochs else "")
        )
    return lines


def _gate_lines(meta: Mapping[str, Any]) -> list[str]:
    metrics, stats = meta.get("metrics") or {}, meta.get("data_stats") or {}
    lines = []
    figure = _figure(metrics)
    if figure:
        lines.append(("holdout     " if CYCLE_PREFIX + "recall@20" in metrics else "test        ")
                     + figure)  # fmt: skip
    slice_recall = metrics.get(HOLDOUT_METRIC)
    if isinstance(slice_recall, int | float):
        n = len(stats.get(HOLDOUT_KEY) or [])
        lines.append(
            f"gate slice  recall@20 {slice_recall:.4f} on {n:,} held-out sessions: a worker "
            f"swaps it in when it scores at least model.gate_ratio ({GATE_RATIO}) of that"
        )
    return lines


def summary(meta: Mapping[str, Any]) -> str:
    """What ``trainer models show`` prints for one version (``registry.show``'s record)."""
    stats = meta.get("data_stats") or {}
    config = meta.get("model_config") or {}
    layers = config.get("layers")
    new = stats.get("new_items")
    lines = [
        f"{meta['version']}" + ("  (published)" if meta.get("published") else ""),
        f"model       {meta.get('model_name')}, {int(meta.get('n_items', 0)):,} items"
        + (f" ({int(new):,} new)" if new is not None else "")
        + (f", layers {layers}" if layers is not None else ""),
        f"created     {str(meta.get('created_at', ''))[:19].replace('T', ' ')} UTC",
    ]
    lines += [("trained on  " if i == 0 else "            ") + text
              for i, text in enumerate(_trained_on(stats))]  # fmt: skip
    lines += _gate_lines(meta)
    params = meta.get("train_params") or {}
    if params:
        shown = " ".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, dict | list)
                         or k == "layers")  # fmt: skip
        lines.append(f"params      {shown}")
    lines.append(f"path        {meta.get('path')}")
    return "\n".join(lines)


@models_group.command("show")
@models_opt
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True, help="The whole record (held-out sessions too).")
def show_cmd(models: str, version: str | None, as_json: bool) -> None:
    """One version (default: the published one): a summary, or --json for everything."""
    registry.require_registry(models)
    version = version or registry.current_version(models)
    if version is None:
        raise click.ClickException(f"{models}: nothing published")
    try:
        meta = registry.show(models, version)
    except CheckpointError as e:
        held = ", ".join(v.version for v in registry.list_versions(models)) or "none"
        raise click.ClickException(f"{e} (held: {held})") from None
    click.echo(json.dumps(meta, indent=1, default=str) if as_json else summary(meta))


@models_group.command("rollback")
@models_opt
@click.argument("version")
@click.option("--reason", default=None, help="Why (recorded in registry-log.jsonl).")
def rollback_cmd(models: str, version: str, reason: str | None) -> None:
    """Publish an older version again (the workers follow); the registry's log records it."""
    record = registry.rollback(models, version, reason=reason)
    click.echo(f"published {version} (was {record['from']}); logged in {registry.LOG}", err=True)


@models_group.command("alias")
@models_opt
@click.argument("alias", type=click.Choice([registry.CHAMPION, registry.CHALLENGER]))
@click.argument("version", required=False)
@click.option("--clear", is_flag=True, help="Remove the alias (the challenger only).")
@click.option("--reason", default=None, help="Why (recorded in registry-log.jsonl).")
def alias_cmd(
    models: str, alias: str, version: str | None, clear: bool, reason: str | None
) -> None:
    """Point ALIAS (champion, challenger) at VERSION; the workers follow both."""
    if clear == (version is not None):
        raise click.UsageError("give a VERSION, or --clear")
    registry.require_registry(models)
    registry.set_alias(models, alias, version, by="alias", reason=reason)
    click.echo(f"{alias}: {version or 'none'}", err=True)


@models_group.command("promote")
@models_opt
@click.option("--reason", default=None, help="Why (recorded in registry-log.jsonl).")
def promote_cmd(models: str, reason: str | None) -> None:
    """The challenger becomes the champion (the rollback guard then watches it)."""
    registry.require_registry(models)
    record = registry.promote(models, reason=reason)
    click.echo(f"champion: {record['version']} (was {record['previous']})", err=True)
