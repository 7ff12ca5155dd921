"""The backtest report as a reader sees it: dates, the retrain cycles on the plots and in a
table, a table per period, no panel drawn twice, no arm's line hidden under another's."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.tools import report as rp

DAY = 86400.0
T0 = 874_800_000.0  # 1997-09-21


def _report(dated: bool = True) -> dict[str, Any]:
    """Four weekly periods, two arms with equal figures (the same model) in the first two,
    a retrain after periods 1 (swapped in) and 2 (kept by the gate)."""
    t0 = T0 if dated else 1000.0
    arms = ("retrained", "frozen")
    periods: list[dict[str, Any]] = []
    for p in range(4):
        fig = {f"{m}@{k}": 0.1 * (k**0.5) for m in ("recall", "mrr") for k in (1, 5, 10, 20)}
        fig.update({"coverage@20": 0.5, "new_item_rec_share@20": 0.0, "n_scored": 50})
        periods.append({
            "start": t0 + p * 7 * DAY, "end": t0 + (p + 1) * 7 * DAY, "events": 60,
            "new_item_click_share": 0.0 if p % 2 else 0.02,
            **{a: dict(fig) for a in arms},
        })  # fmt: skip
    periods[3]["retrained"]["recall@20"] = 0.9
    retrains = [
        {"label": "warmup", "seconds": 3.0, "event_time": t0, "version": "v1",
         "phase_seconds": {"archive": 1.0, "read": 0.1, "train": 1.5, "evaluate": 0.2,
                           "publish": 0.1}, "decision": {"published": True}},
        {"label": "p0", "seconds": 4.0, "after_period": 0, "event_time": t0 + 7 * DAY,
         "published": True, "version": "v2", "candidate": 0.61, "current": 0.6,
         "holdout_predictions": 400, "events": {"train": 1000},
         "phase_seconds": {"archive": 1.2, "read": 0.1, "train": 2.2, "evaluate": 0.3,
                           "publish": 0.1}},
        {"label": "p1", "seconds": 4.5, "after_period": 1, "event_time": t0 + 14 * DAY,
         "published": False, "version": "v2", "candidate": 0.5, "current": 0.6,
         "decision": {"published": False, "reason": "candidate recall@20 0.5000 vs current "
                      "0.6000: not shown within the tolerance"}},
    ]  # fmt: skip
    return {
        "command": "streamrec backtest log.tsv --out bt " + "--param x=1 " * 30,
        "log": "log.tsv", "events": 300, "warmup_events": 60, "warmup_until": t0,
        "every_s": 7 * DAY, "ks": [1, 5, 10, 20], "periods": periods,
        "overall": {a: {"recall@20": 0.5, "n_scored": 200, "lost": 0} for a in arms},
        "retrains": retrains,
        "swaps": [{"arm": "retrained", "from": "v1", "to": "v2",
                   "event_time": t0 + 7 * DAY + 3600}],
        "series": {a: {"latency_ms_quantiles": [1.0, 2.0, 5.0],
                       "throughput": {"bin_s": 1.0, "counts": [5, 6]}} for a in arms},
        "lost": 0, "duplicates": 0,
    }  # fmt: skip


def test_the_page_shows_dates_retrain_cycles_and_a_table_per_period(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rep = _report()
    rp.write_report(tmp_path, rep)
    page = (tmp_path / "report.html").read_text()
    # times are dates, never raw epoch seconds
    assert "at event time 1997-09-28 01:00" in page
    assert f"{T0 + 7 * DAY + 3600}" not in page and "874800000" not in page
    # the retrain cycles: decision and why, both figures, the seconds of each phase
    section = page.split("<h2>Retrain cycles</h2>")[1].split("<h2>")[0]
    for text in ("swapped in", "kept (gate): candidate recall@20 0.5000", "0.6100", "train s",
                 "archive s", "2.2", "1997-10-05 00:00"):  # fmt: skip
        assert text in section, text
    # one row per period, with the retrain that followed it
    table = page.split("<h2>Per period</h2>")[1].split("<h2>")[0]
    assert table.count("<tr>") == 1 + len(rep["periods"])
    assert "1997-09-21 00:00" in table and "0.9000" in table and "swapped in" in table


def test_no_panel_is_drawn_twice() -> None:
    assert rp.panel_ks("recall", [1, 5, 10, 20]) == [1, 5, 10, 20]
    assert rp.panel_ks("mrr", [1, 5, 10, 20]) == [5, 10, 20]  # MRR@1 == Recall@1


@pytest.mark.parametrize("dated", [True, False], ids=["dates", "ordinal-log"])
def test_retrain_cycles_are_marked_where_the_new_model_starts(dated: bool) -> None:
    rep = _report(dated)
    marks = rp.retrain_marks(rep)
    if dated:
        starts = [datetime.fromtimestamp(rep["periods"][p]["start"], UTC) for p in (1, 2)]
        assert marks == [(starts[0], True), (starts[1], False)]
    else:
        assert marks == [(1.5, True), (2.5, False)]  # between the periods' numbers


def test_every_arms_line_stays_visible_where_the_arms_are_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On every per-period panel an arm drawn later is narrower than the one under it and
    marked differently, and the new-items panel's click share lies under the arms' lines; the
    retrain cycles are vertical lines, solid (swapped in) and dotted (kept)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures: dict[str, Figure] = {}
    real_savefig = Figure.savefig

    def keep(fig: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        figures[Path(str(fname)).name] = fig
        real_savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    rp.make_plots(tmp_path, _report())
    for name in ("recall.png", "mrr.png", "coverage_new_items.png"):
        for ax in figures[name].axes:
            if not ax.get_visible():
                continue
            lines = {str(ln.get_label()): ln for ln in ax.get_lines()}
            arms = [ln for label, ln in lines.items() if label.startswith(("retrained", "frozen"))]
            assert len(arms) == 2, (name, list(lines))
            under, over = sorted(arms, key=lambda ln: ln.get_zorder())
            assert over.get_linewidth() < under.get_linewidth() / 1.5, name
            assert over.get_marker() != under.get_marker(), name
            xs = [(ln, np.asarray(ln.get_xdata()).tolist()) for ln in ax.get_lines()]
            verticals = [ln for ln, xd in xs if len(set(xd)) == 1]
            assert sorted(ln.get_linestyle() for ln in verticals) == ["-", ":"], name
            share = lines.get("clicks on items new in the period")
            if share is not None:
                assert share.get_zorder() < under.get_zorder()
    assert len([ax for ax in figures["mrr.png"].axes if ax.get_visible()]) == 3
