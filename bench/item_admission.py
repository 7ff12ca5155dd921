"""What a minimum number of events for a new item does: on junk ids, and on real logs.

Part 1, the issue's case (issue 19, case 17): a retrain registry publishes a GRU4Rec of a
synthetic log over 120 items; then 40,000 never-repeated junk item ids arrive (20,000
sessions of two junk clicks each) beside the next day's real clicks, and a warm retrain
cycle runs (``trainer.retrain.run_cycle``, the real one) with ``--min-item-support`` 1 (what
main did) and with the default. Reported: the published catalogue, the checkpoint's size,
and what the cycle recorded as left out.

Part 2, what the threshold costs on real logs. The retrain loop is simulated over each
log's time: every ``period`` a cycle takes the trailing ``window`` of events and admits into
the catalogue (which only grows) what ``trainer.data.admit_new_items`` admits (the cycle's
own rule; the holdout slice is not split off here). For each N: the catalogue after the last
cycle, and *unservable*: the share of the next period's events whose item is not in the
catalogue yet (the worker can neither recommend it nor predict a click on it), beside N = 1.
No model is trained in part 2. Read the logs from their paths (never copied):

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/item_admission.py \
        [--shared ../shared/data] [--part junk|logs|all] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

DAY = 86400.0
THRESHOLDS = (1, 2, 3, 5, 10)
JUNK_ITEMS = 40_000


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"ItemId": str, "SessionId": str, "UserId": str})


def simulate(
    df: pd.DataFrame, *, period: float, window: float, first: float, threshold: int
) -> dict[str, float]:
    """Cycles every ``period`` from ``first`` on; returns the catalogue size and the share of
    the following periods' events whose item was not in the catalogue yet."""
    from trainer.data import admit_new_items

    times = df["Time"].to_numpy()
    items = df["ItemId"].astype(str).to_numpy()
    end = float(times.max())
    catalogue: set[str] = set()
    unservable = total = 0
    t = first
    while t < end:
        win = df[(times >= t - window) & (times < t)]
        admitted, _ = admit_new_items(win, catalogue, threshold)
        catalogue.update(admitted["ItemId"].astype(str))
        nxt_items = items[(times >= t) & (times < t + period)]
        total += len(nxt_items)
        unservable += int((~pd.Series(nxt_items).isin(catalogue)).sum())
        t += period
    return {"catalogue": len(catalogue), "unservable": unservable / max(total, 1)}


def datasets(shared: Path | None) -> list[tuple[str, pd.DataFrame, float, float, float]]:
    """(name, log, period, window, first cycle time) per log."""
    from streamrec.data.clicklog import sessionize
    from streamrec.data.synthetic import generate_clicks

    out = []
    if shared is not None:
        rsc = _read(shared / "rsc15-100k" / "train_full.tsv.gz")
        rsc = pd.concat([rsc, _read(shared / "rsc15-100k" / "test.tsv.gz")], ignore_index=True)
        t0 = float(rsc["Time"].min())
        out.append(("rsc15-100k (7 days; daily, 14 d window)", rsc, DAY, 14 * DAY, t0 + DAY))
        yc = _read(shared / "yoochoose-1_64" / "train.tsv.gz")
        # Time is an ordinal: 20 equal slices of the order, a window of 5 slices
        lo, hi = float(yc["Time"].min()), float(yc["Time"].max())
        step = (hi - lo) / 20
        out.append(
            ("yoochoose-1_64 (20 slices, 5-slice window)", yc, step, 5 * step, lo + 2 * step)
        )
        ml = sessionize(_read(shared / "movielens-1m" / "ratings.tsv.gz"), 3600)
        t0 = float(ml["Time"].min())
        out.append(
            (
                "movielens-1m (1 h sessions; monthly, 6-month window)",
                ml,
                30 * DAY,
                180 * DAY,
                t0 + 30 * DAY,
            )
        )
    # the demo's log (streamrec demo --retrain: 2,000 sessions over 300 items, then 1,000)
    demo = generate_clicks(2000, 300, seed=0, span_days=20)
    more = generate_clicks(
        1000, 300, seed=1, start_time=float(demo["Time"].max()) + 60, span_days=5
    )
    demo = pd.concat([demo, more], ignore_index=True)
    t0 = float(demo["Time"].min())
    out.append(("demo synthetic (daily, 14 d window)", demo, DAY, 14 * DAY, t0 + 3 * DAY))
    return out


def _write_archive(directory: Path, df: pd.DataFrame, start: int) -> int:
    """``df`` as the archiver writes it: one file per event hour, contiguous offsets."""
    import pyarrow as pa

    from streamrec.loop.archive import SCHEMA, Storage, file_name, hour_of

    storage = Storage(str(directory))
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    offsets = np.arange(start, start + len(df))
    for hour, idx in df.groupby(df["Time"].map(hour_of), sort=True).groups.items():
        sub, offs = df.loc[idx], offsets[idx]
        cols = {
            "SessionId": sub["SessionId"].astype(str).tolist(),
            "ItemId": sub["ItemId"].astype(str).tolist(),
            "Time": sub["Time"].astype(float).tolist(),
            "UserId": [None] * len(sub),
            "event_id": [f"e{o}" for o in offs],
            "partition": [0] * len(sub),
            "offset": offs.tolist(),
        }
        table = pa.table(cols, schema=SCHEMA)
        storage.write_atomic(file_name(0, int(offs[0]), int(offs[-1]), hour), table)
    return start + len(df)


def _published(models: Path) -> Path:
    from streamrec.loop import registry

    path = registry.resolve(models)
    assert path is not None, f"{models}: nothing published"
    return path


def junk_case() -> list[str]:
    """Part 1: the published catalogue after 40,000 junk ids, N = 1 against the default."""
    from streamrec.data.synthetic import generate_clicks
    from streamrec.model.checkpoint import load_checkpoint
    from trainer.retrain import RetrainConfig, run_cycle

    params = ["layers=32", "n_epochs=2", "batch_size=32", "n_sample=0", "loss=cross-entropy"]
    default = RetrainConfig("", "").min_item_support
    lines = [
        f"Part 1: {JUNK_ITEMS:,} junk item ids (20,000 sessions of two), then a warm cycle",
        "",
        "| --min-item-support | catalogue before | catalogue after | checkpoint before | "
        "checkpoint after | left out (items / training events) | cycle |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive, models = root / "archive", root / "models"
        df = generate_clicks(1500, 120, seed=4, span_days=6)
        n = _write_archive(archive, df, 0)
        cfg = RetrainConfig(str(archive), str(models), "6d", "1d", params=params, progress=False)
        r1 = run_cycle(cfg, echo=lambda s: None)
        assert r1["decision"]["published"], r1
        v1 = load_checkpoint(_published(models))
        size1 = sum(f.stat().st_size for f in v1.path.iterdir())
        t1 = float(df["Time"].max())
        day = generate_clicks(400, 120, seed=5, start_time=t1 + 60, span_days=0.9)
        day["SessionId"] = "d" + day["SessionId"].astype(str)
        rng = np.random.default_rng(0)
        junk = pd.DataFrame(
            {
                "SessionId": np.repeat([f"junk{i}" for i in range(JUNK_ITEMS // 2)], 2),
                "ItemId": [f"x{i:06d}" for i in range(JUNK_ITEMS)],
                "Time": np.sort(rng.uniform(t1 + 60, t1 + 0.5 * DAY, JUNK_ITEMS)),
            }
        )
        _write_archive(archive, pd.concat([day, junk], ignore_index=True), n)
        for support in (1, default):
            mdir = root / f"models-{support}"
            shutil.copytree(models, mdir)
            warm = RetrainConfig(
                **{**cfg.__dict__, "models": str(mdir), "window": "2d", "holdout": "3h",
                   "tolerance": 1.0, "min_holdout_events": 0, "min_item_support": support}
            )  # fmt: skip
            t = time.perf_counter()
            r = run_cycle(warm, echo=lambda s: None)
            secs = time.perf_counter() - t
            v2 = load_checkpoint(_published(mdir))
            size2 = sum(f.stat().st_size for f in v2.path.iterdir())
            left = r["left_out"]
            lines.append(
                f"| {support}{' (default)' if support == default else ''} | "
                f"{len(v1.item_ids):,} | {len(v2.item_ids):,} | {size1 / 1e3:,.0f} kB | "
                f"{size2 / 1e3:,.0f} kB ({size2 / size1:.1f}x) | "
                f"{left['items']:,} / {left['events_dropped']:,} | "
                f"{'published' if r['decision']['published'] else 'kept'}, {secs:.0f} s |"
            )
            print(lines[-1], file=sys.stderr)
    return lines


def cost_on_logs(shared: Path | None) -> list[str]:
    lines = [
        "Part 2: what the threshold leaves out of real logs",
        "",
        "| log | N | catalogue | unservable next-period events | vs N=1 |",
        "|---|---|---|---|---|",
    ]
    for name, df, period, window, first in datasets(shared):
        base = None
        for n in THRESHOLDS:
            t = time.perf_counter()
            r = simulate(df, period=period, window=window, first=first, threshold=n)
            base = r if base is None else base
            lines.append(
                f"| {name} | {n} | {r['catalogue']:,} | {100 * r['unservable']:.2f} % | "
                f"+{100 * (r['unservable'] - base['unservable']):.2f} pt |"
            )
            print(lines[-1], f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, help="the shared data folder (without: demo only)")
    ap.add_argument("--out", type=Path, help="append the result tables to this file")
    ap.add_argument("--part", choices=["junk", "logs", "all"], default="all")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from procstats import machine_line

    load0 = os.getloadavg()
    lines = []
    if args.part in ("junk", "all"):
        lines += [*junk_case(), ""]
    if args.part in ("logs", "all"):
        lines += [*cost_on_logs(args.shared), ""]
    text = "\n".join([*lines, machine_line(load0)])
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
