"""Render the Grafana dashboard's panels without Grafana: each panel's PromQL queries run on a
Prometheus HTTP API (``/api/v1/query_range``), drawn as SVG line charts in one HTML page
(optionally screenshotted with headless Chromium). How docs/dashboard.png was made:
docs/dashboard.md.

    python deploy/dashboard_preview.py --prometheus http://127.0.0.1:9090 --minutes 10 \\
        --out runs/preview.html [--png docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).parent / "grafana/dashboards/streamrec-overview.json"
COLOURS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#b877d9", "#f2495c", "#8ab8ff"]
W, H, PAD = 560, 220, 36


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    return list(body["data"]["result"])


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def chart(series: list[tuple[str, list[tuple[float, float]]]], unit: str) -> str:
    points = [p for _, s in series for p in s if math.isfinite(p[1])]
    if not points:
        return f'<svg width="{W}" height="{H}"><text x="20" y="40" fill="#888">no data</text></svg>'
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    lo, hi = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    hi = hi if hi > lo else lo + 1

    def xy(t: float, v: float) -> str:
        x = PAD + (W - 2 * PAD) * ((t - t0) / max(t1 - t0, 1e-9))
        y = H - PAD - (H - 2 * PAD) * ((v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg width="{W}" height="{H}" style="background:#181b1f">']
    for frac in (0, 0.5, 1):
        v = lo + frac * (hi - lo)
        y = H - PAD - (H - 2 * PAD) * frac
        parts.append(f'<line x1="{PAD}" x2="{W - PAD}" y1="{y}" y2="{y}" stroke="#333"/>')
        parts.append(f'<text x="2" y="{y + 4}" fill="#aaa" font-size="10">{v:.3g} {unit}</text>')
    minutes = (t1 - t0) / 60
    parts.append(f'<text x="{W - PAD - 60}" y="{H - 8}" fill="#aaa" font-size="10">')
    parts.append(f"{minutes:.0f} min</text>")
    for i, (name, s) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(xy(t, v) for t, v in s if math.isfinite(v))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(
            f'<text x="{PAD + 150 * (i % 3)}" y="{14 + 12 * (i // 3)}" fill="{colour}" '
            f'font-size="11">{html.escape(name[:28])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render(prom: str, minutes: float, step: float) -> str:
    dash = json.loads(DASHBOARD.read_text())
    end = time.time()
    start = end - 60 * minutes
    cells = []
    for panel in dash["panels"]:
        series = []
        for target in panel["targets"]:
            for r in query_range(prom, target["expr"], start, end, step):
                name = legend(target.get("legendFormat", ""), r["metric"]) or target["expr"]
                series.append((name, [(float(t), float(v)) for t, v in r["values"]]))
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        title = html.escape(panel["title"])
        cells.append(f"<div class='p'><h3>{title}</h3>{chart(series, unit)}</div>")
    return (
        "<html><body style='background:#111217;color:#ddd;font-family:sans-serif'>"
        f"<h2>{html.escape(dash['title'])} (panels of {DASHBOARD.name}, from Prometheus)</h2>"
        "<style>.p{display:inline-block;margin:6px}h3{margin:2px;font-size:14px}</style>"
        + "".join(cells)
        + "</body></html>"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--step", type=float, default=5.0)
    ap.add_argument("--out", type=Path, required=True, help="the HTML page")
    ap.add_argument("--png", type=Path, help="a screenshot of it (headless Chromium)")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(render(a.prometheus, a.minutes, a.step))
    if a.png:
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--screenshot={a.png.resolve()}", "--window-size=1180,1260",
             a.out.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


if __name__ == "__main__":
    main()
