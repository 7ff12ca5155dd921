"""What the ``trainer`` commands share: options that take several values, ``--k`` and
``--ties``, the input options and loading, printing and writing metrics."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pandas as pd

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


def split_values(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(x for x in str(v).replace(",", " ").split() if x)
    return out


def parse_ks(values: Sequence[str]) -> tuple[int, ...]:
    if not values:
        return (1, 5, 10, 20)
    try:
        ks = tuple(sorted({int(x) for x in split_values(values)}))
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
    for item in split_values(values):
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
    from streamrec.data.clicklog import DataError, load_clicks, sessionize
    from trainer.archive_source import PREFIX, load_archive

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


def json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


k_option = click.option("--k", "ks", multiple=True, help="cut-offs, e.g. --k 1 5 10 20 (default)")
ties_option = click.option(
    "--ties",
    type=click.Choice(["standard", "conservative", "median"]),
    default="conservative",
    show_default=True,
    help="rank of the target among items with an equal score",
)


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int:
    from trainer.threads import use_threads

    return use_threads(value)


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    expose_value=False,
    callback=_set_threads,
    help="torch CPU threads (default: the cores the load average leaves idle, at most one "
    "per core; OMP_NUM_THREADS wins when set): threads on busy cores slow training down "
    "several times",
)


def load_options(f: Callable[..., Any]) -> Callable[..., Any]:
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
