"""The backtest report: ``report.json`` and ``report.html`` with PNG plots (matplotlib).

The page refers to its PNGs by relative paths, so it opens from the disk with no server.
matplotlib is the optional extra ``report`` (``pip install 'streamrec[report]'``); without it
the JSON is still written and the page says the plots are missing.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamrec.data.clicklog import EPOCH_TIMES_FROM

#: the per-period metrics drawn, each with its axis label
_PERIOD_METRICS: list[tuple[str, str, str]] = [
    ("recall", "Recall@k per period", "Recall@k (share of next clicks, 0-1)"),
    ("mrr", "MRR@k per period", "MRR@k (mean 1/rank, 0-1)"),
]


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(dict(report)), indent=2) + "\n")
    tmp.replace(path)


def _arms(report: Mapping[str, Any]) -> list[str]:
    return list(report.get("overall", {}).keys())


def _period_x(report: Mapping[str, Any]) -> tuple[list[Any], str]:
    starts = [p["start"] for p in report["periods"]]
    if starts and min(starts) >= EPOCH_TIMES_FROM:
        return [datetime.fromtimestamp(s, UTC) for s in starts], "period start (UTC date)"
    return list(range(1, len(starts) + 1)), "period (number)"


def _values(report: Mapping[str, Any], arm: str, key: str) -> list[float]:
    out = []
    for p in report["periods"]:
        v = p.get(arm, {}).get(key) if arm else p.get(key)
        out.append(float("nan") if v is None else float(v))
    return out


def make_plots(out: Path, report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Write the PNGs into ``out``; returns (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = _arms(report)
    series = report.get("series", {})
    ks = list(report.get("ks", [1, 5, 10, 20]))
    x, xlabel = _period_x(report)
    marker = "o" if len(x) <= 60 else None
    files: list[tuple[str, str]] = []

    def save(fig: Any, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append((name, caption))

    for family, title, ylabel in _PERIOD_METRICS:
        cols = 2 if len(ks) > 1 else 1
        rows = (len(ks) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
        for ax in axes.flat[len(ks) :]:
            ax.set_visible(False)
        for ax, k in zip(axes.flat, ks, strict=False):
            for arm in arms:
                ax.plot(x, _values(report, arm, f"{family}@{k}"), marker=marker, label=arm)
            ax.set_title(f"{title.replace('@k', f'@{k}')}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel.replace("@k", f"@{k}"))
            ax.legend()
            ax.tick_params(axis="x", labelrotation=30)
        save(fig, f"{family}.png", title)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    ax = axes[0][0]
    for arm in arms:
        ax.plot(x, _values(report, arm, "coverage@20"), marker=marker, label=arm)
    ax.set_title("Catalogue coverage@20 per period")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of the log's items (0-1)")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=30)
    ax = axes[0][1]
    ax.plot(x, _values(report, "", "new_item_click_share"), marker=marker, color="black",
            label="clicks on items new in the period")  # fmt: skip
    for arm in arms:
        ax.plot(x, _values(report, arm, "new_item_rec_share@20"), marker=marker,
                linestyle="--", label=f"{arm}: top-20 slots given to new items")  # fmt: skip
    ax.set_title("New items per period")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share (0-1)")
    ax.legend(fontsize="small")
    ax.tick_params(axis="x", labelrotation=30)
    save(fig, "coverage_new_items.png", "Catalogue coverage and new items")

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        q = series.get(arm, {}).get("latency_ms_quantiles") or []
        if q:
            ax.plot(q, [i / (len(q) - 1) for i in range(len(q))], label=arm)
    ax.set_xscale("log")
    ax.set_title("Click-to-recommendation latency (CDF)")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("share of clicks answered within (0-1)")
    ax.legend()
    save(fig, "latency_cdf.png", "Latency CDF (compressed replay: queueing included)")

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in arms:
        tp = series.get(arm, {}).get("throughput")
        if not tp:
            continue
        width, counts = float(tp["bin_s"]), tp["counts"]
        xs = [i * width for i in range(len(counts) + 1)]
        ax.stairs([c / width for c in counts], xs, label=arm)
    ax.set_title("Throughput over the run (scored periods; gaps: retraining)")
    ax.set_xlabel("wall time since the first scored answer (s)")
    ax.set_ylabel("recommendations published (events/s)")
    ax.legend()
    save(fig, "throughput.png", "Throughput over time (wall clock)")
    return files


def _table(report: Mapping[str, Any]) -> str:
    arms = _arms(report)
    keys = [k for k in next(iter(report["overall"].values()), {}) if isinstance(
        next(iter(report["overall"].values()))[k], int | float | None)]  # fmt: skip
    rows = ["<tr><th>metric</th>" + "".join(f"<th>{html.escape(a)}</th>" for a in arms) + "</tr>"]
    for k in keys:
        cells = []
        for a in arms:
            v = report["overall"][a].get(k)
            cells.append("" if v is None else (f"{v:.4f}" if isinstance(v, float) else f"{v:,}"))
        rows.append(
            f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def write_html(
    out: Path, report: Mapping[str, Any], plots: Sequence[tuple[str, str]], note: str = ""
) -> None:
    figs = "".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(cap)}">'
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for name, cap in plots
    )
    swaps = "".join(
        f"<li>{html.escape(str(s.get('arm')))}: {html.escape(str(s.get('from')))} &rarr; "
        f"{html.escape(str(s.get('to')))} at event time {s.get('event_time')}</li>"
        for s in report.get("swaps", [])
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>streamrec backtest</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} img{{max-width:100%}}</style>
</head><body>
<h1>streamrec backtest</h1>
<p><code>{html.escape(str(report.get("command", "")))}</code></p>
<p>log {html.escape(str(report.get("log")))}: {report.get("events", 0):,} clicks,
{report.get("warmup_events", 0):,} of them warm-up (not scored), {len(report.get("periods", []))}
period(s); lost {report.get("lost")}, duplicated {report.get("duplicates")}.</p>
{note}
<h2>Overall</h2>{_table(report)}
<h2>Model swaps</h2><ul>{swaps or "<li>none</li>"}</ul>
<h2>Plots</h2>{figs or "<p>no plots (matplotlib is not installed)</p>"}
<p>Full figures: <a href="report.json">report.json</a>.</p>
</body></html>
"""
    (out / "report.html").write_text(page)


def write_report(out: Path, report: Mapping[str, Any]) -> None:
    """``out/report.json``, the PNG plots and ``out/report.html``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    note = ""
    try:
        plots = make_plots(out, report)
    except ImportError:
        plots = []
        note = "<p>matplotlib is not installed: pip install 'streamrec[report]' for the plots.</p>"
    write_html(out, report, plots, note)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m streamrec.tools.report DIR``: redraw DIR's plots and page from its
    report.json."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m streamrec.tools.report DIR")
    out = Path(args[0])
    write_report(out, json.loads((out / "report.json").read_text()))


if __name__ == "__main__":
    main()
