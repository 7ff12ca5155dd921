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
#: what the vertical lines on the per-period plots are
_MARKS_CAPTION = (
    " (vertical lines: a retrained model starts; solid: swapped in, dotted: kept by the gate)"
)


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


def when(t: Any) -> str:
    """An event time as the page shows it: a UTC date and time, or the number of an ordinal
    log's time (never raw epoch seconds)."""
    if t is None:
        return ""
    t = float(t)
    if t >= EPOCH_TIMES_FROM:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")
    return f"{t:,.0f}"


def panel_ks(family: str, ks: Sequence[int]) -> list[int]:
    """The cut-offs drawn for a metric family: MRR@1 is Recall@1 by definition (the one
    next click is either first, 1/1, or not in the top-1, 0), so it is drawn once."""
    return [k for k in ks if not (family == "mrr" and k == 1)]


def _published(r: Mapping[str, Any]) -> bool:
    return bool(r.get("published", (r.get("decision") or {}).get("published")))


def retrain_marks(report: Mapping[str, Any]) -> list[tuple[Any, bool]]:
    """(x, swapped in) for each retrain between periods, at the x where the model it
    produced starts to serve: a period-start date, or half-way between periods' numbers."""
    x, _ = _period_x(report)
    dated = bool(x) and isinstance(x[0], datetime)
    marks: list[tuple[Any, bool]] = []
    for r in report.get("retrains", []):
        p = r.get("after_period")
        if p is None or p + 1 >= len(x):
            continue
        marks.append((x[p + 1] if dated else p + 1.5, _published(r)))
    return marks


#: (line width, marker) per arm: an arm drawn later is narrower and marked differently,
#: so where the arms' figures are equal (the same model) the one under it still shows
_ARM_STYLES: list[tuple[float, str]] = [(3.4, "o"), (1.8, "s"), (0.9, "^"), (0.5, "x")]


def _arm_style(i: int, n_points: int) -> dict[str, Any]:
    width, marker = _ARM_STYLES[min(i, len(_ARM_STYLES) - 1)]
    return {
        "linewidth": width,
        "marker": marker,
        "markersize": 3 + width,
        "markevery": max(1, n_points // 30),
        "zorder": 3 + i,
    }


def _mark_retrains(ax: Any, marks: Sequence[tuple[Any, bool]]) -> None:
    """Vertical lines where a retrained model starts: solid if swapped in, dotted if the
    gate kept the old one."""
    seen: set[bool] = set()
    for xm, swapped in marks:
        label = "retrain: swapped in" if swapped else "retrain: kept (gate)"
        ax.axvline(xm, color="grey", linewidth=1.0, linestyle="-" if swapped else ":",
                   zorder=1, label="_nolegend_" if swapped in seen else label)  # fmt: skip
        seen.add(swapped)


def make_plots(out: Path, report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Write the PNGs into ``out``; returns (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = _arms(report)
    series = report.get("series", {})
    ks = list(report.get("ks", [1, 5, 10, 20]))
    x, xlabel = _period_x(report)
    marks = retrain_marks(report)
    marks_caption = _MARKS_CAPTION if marks else ""
    files: list[tuple[str, str]] = []

    def save(fig: Any, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append((name, caption))

    def draw_arms(ax: Any, key: str, label: str = "{arm}") -> None:
        for i, arm in enumerate(arms):
            ax.plot(x, _values(report, arm, key), label=label.format(arm=arm),
                    **_arm_style(i, len(x)))  # fmt: skip
        _mark_retrains(ax, marks)
        ax.set_xlabel(xlabel)
        ax.tick_params(axis="x", labelrotation=30)

    for family, title, ylabel in _PERIOD_METRICS:
        fks = panel_ks(family, ks)
        cols = 2 if len(fks) > 1 else 1
        rows = (len(fks) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
        for ax in axes.flat[len(fks) :]:
            ax.set_visible(False)
        for ax, k in zip(axes.flat, fks, strict=False):
            draw_arms(ax, f"{family}@{k}")
            ax.set_title(f"{title.replace('@k', f'@{k}')}")
            ax.set_ylabel(ylabel.replace("@k", f"@{k}"))
            ax.legend(fontsize="small")
        save(fig, f"{family}.png", title + marks_caption)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    ax = axes[0][0]
    draw_arms(ax, "coverage@20")
    ax.set_title("Catalogue coverage@20 per period")
    ax.set_ylabel("share of the log's items (0-1)")
    ax.legend(fontsize="small")
    ax = axes[0][1]
    # the log's own share under the arms' lines: it is a reference, not an arm
    ax.plot(x, _values(report, "", "new_item_click_share"), color="black", linewidth=1.0,
            linestyle="--", marker=".", zorder=2,
            label="clicks on items new in the period")  # fmt: skip
    draw_arms(ax, "new_item_rec_share@20", "{arm}: top-20 slots given to new items")
    ax.set_title("New items per period")
    ax.set_ylabel("share (0-1)")
    ax.legend(fontsize="small")
    save(fig, "coverage_new_items.png", "Catalogue coverage and new items" + marks_caption)

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


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return f"{v:,}" if isinstance(v, int) else html.escape(str(v))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Cells already escaped or formatted."""
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _decision(r: Mapping[str, Any]) -> str:
    """What a retrain cycle did, in words."""
    if _published(r):
        return "swapped in" if "after_period" in r else "published (the first model)"
    reason = (r.get("decision") or {}).get("reason")
    return "kept (gate)" + (f": {reason}" if reason else "")


def _retrains_table(report: Mapping[str, Any]) -> str:
    """One row per retrain cycle: when, what it decided and why, both figures, the seconds
    of each phase."""
    retrains = list(report.get("retrains") or [])
    if not retrains:
        return "<p>none</p>"
    phases: list[str] = []
    for r in retrains:
        phases += [k for k in r.get("phase_seconds") or {} if k not in phases]
    header = ["cycle", "at event time", "version", "decision", "candidate", "current"]
    header += ["holdout predictions", "total s"] + [f"{k} s" for k in phases]
    rows = []
    for r in retrains:
        secs = r.get("phase_seconds") or {}
        row = [html.escape(str(r.get("label", ""))), when(r.get("event_time"))]
        row += [_cell(r.get("version")), html.escape(_decision(r))]
        row += [_cell(r.get("candidate")), _cell(r.get("current"))]
        row += [_cell(r.get("holdout_predictions")), _seconds(r.get("seconds"))]
        rows.append(row + [_seconds(secs.get(k)) for k in phases])
    return _html_table(header, rows)


def _seconds(v: Any) -> str:
    return "" if v is None else f"{float(v):.1f}"


def _periods_table(report: Mapping[str, Any]) -> str:
    """One row per period: its span, clicks, each arm's figures at the largest k, and the
    retrain that followed it."""
    arms = _arms(report)
    k = max(report.get("ks") or [20])
    after = {r["after_period"]: r for r in report.get("retrains") or [] if "after_period" in r}
    header = ["period", "start", "end", "clicks", "new-item clicks"]
    header += [f"{a} {m}@{k}" for a in arms for m in ("recall", "mrr")]
    header += ["then retrained"]
    rows = []
    for i, p in enumerate(report.get("periods") or []):
        row = [str(i + 1), when(p.get("start")), when(p.get("end")), _cell(p.get("events"))]
        row.append(_cell(p.get("new_item_click_share")))
        row += [_cell((p.get(a) or {}).get(f"{m}@{k}")) for a in arms for m in ("recall", "mrr")]
        r = after.get(i)
        done = "" if r is None else f"{_decision(r).split(':')[0]} {r.get('version') or ''}"
        rows.append([*row, html.escape(done.strip())])
    return _html_table(header, rows)


def _live_list(report: Mapping[str, Any]) -> str:
    """The workers' own live figures per arm and model version (every answered click)."""
    items = []
    for arm, fig in report.get("overall", {}).items():
        for version, live in (fig.get("live") or {}).items():
            r, m = live.get("recall@20"), live.get("mrr@20")
            shown = "no predictions" if r is None else f"Recall@20 {r:.4f}, MRR@20 {m:.4f}"
            items.append(
                f"<li>{html.escape(str(arm))} {html.escape(str(version))}: {shown} "
                f"({live.get('n_scored', 0):,} predictions)</li>"
            )
    return "".join(items) or "<li>none</li>"


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
        f"{html.escape(str(s.get('to')))} at event time {when(s.get('event_time'))}</li>"
        for s in report.get("swaps", [])
    )
    warm = report.get("warmup_until")
    until = "" if warm is None else f", until {when(warm)}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>streamrec backtest</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} img{{max-width:100%}}</style>
</head><body>
<h1>streamrec backtest</h1>
<p><code>{html.escape(str(report.get("command", "")))}</code></p>
<p>log {html.escape(str(report.get("log")))}: {report.get("events", 0):,} clicks,
{report.get("warmup_events", 0):,} of them warm-up (not scored{until}),
{len(report.get("periods", []))} period(s); lost {report.get("lost")}{_dead_letters(report)},
duplicated {report.get("duplicates")}.</p>
{note}
<h2>Overall</h2>{_table(report)}
<h2>The workers' own live metrics</h2>
<p>Every click the workers answered (warm-up included), each scored against the answer to its
session's previous click, by the same code as the figures above.</p><ul>{_live_list(report)}</ul>
<h2>Model swaps</h2><ul>{swaps or "<li>none</li>"}</ul>
<h2>Retrain cycles</h2>{_retrains_table(report)}
<h2>Per period</h2>{_periods_table(report)}
<h2>Plots</h2>{figs or "<p>no plots (matplotlib is not installed)</p>"}
<p>Full figures: <a href="report.json">report.json</a>.</p>
</body></html>
"""
    (out / "report.html").write_text(page)


def _dead_letters(report: Mapping[str, Any]) -> str:
    dead = report.get("dead_letters") or {}
    parts = ", ".join(f"{n:,} {html.escape(str(reason))}" for reason, n in dead.items())
    return f" (dead-lettered: {parts})" if parts else ""


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
