"""`streamrec backtest` with a stand-in retrain cycle: the runs measured before the retraining
loop's commands existed.

The backtest's retrained arm runs ``streamrec archive --until-caught-up`` and
``trainer retrain --once`` after every period. Before those commands existed, this script ran
the same backtest (same workers, broker, barrier, swap wait, report) with a stand-in cycle:
``trainer train`` from scratch on every click published so far (warm-up included), written
as a new checkpoint directory into the folder the retrained arm's workers watch (the newest
checkpoint there is swapped in). Results made with it say so.

    python bench/backtest_standin.py LOG --out DIR --every 1d --warmup-until 0.5 \
        [--model gru4rec|hrnn] [--param k=v ...] [--session-gap S --state-gap S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from streamrec.processes import run_child, stop_signals
from streamrec.tools.backtest import BacktestOptions, parse_every, run_backtest


def make_cycle(model: str, params: list[str]) -> Any:
    def cycle(bt: Any, label: str) -> None:
        path = bt.work / f"published-{label}.tsv"
        bt.df.iloc[: bt.n_published].to_csv(path, sep="\t", index=False)
        out = bt.registry / f"v-{label}"
        cmd = [sys.executable, "-m", "trainer", "train", "--train", str(path), "--out", str(out)]
        cmd += ["--model", model, "--no-progress"]
        for kv in params:
            cmd += ["--param", kv]
        run_child(cmd, what="trainer train (stand-in cycle)", log=bt.work / "retrain.log")
        path.unlink()

    return cycle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", default=None)
    ap.add_argument("--warmup-until", default=None)
    ap.add_argument("--model", default="gru4rec")
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--session-gap", type=float, default=None)
    ap.add_argument("--state-gap", type=float, default=None)
    ap.add_argument("--no-frozen", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args()
    opts = BacktestOptions(
        log=a.log,
        out=a.out,
        every=parse_every(a.every),
        warmup_until=a.warmup_until,
        model=a.model,
        params=a.param,
        frozen=not a.no_frozen,
        session_gap=a.session_gap,
        state_gap=a.state_gap,
        timeout=a.timeout,
        progress=False,
        command=" ".join(["python", "bench/backtest_standin.py", *sys.argv[1:]]),
        retrain_cycle=make_cycle(a.model, a.param),
        retrainer="stand-in: trainer train from scratch on every click published so far",
    )
    with stop_signals(interrupt=True):  # SIGTERM cleans up as Ctrl-C does
        report = run_backtest(opts)
    report_note = "retrained arm: stand-in cycle (trainer train on all clicks so far)"
    for arm, fig in report["overall"].items():
        print(f"{arm:>10}: Recall@20 {fig['recall@20']:.4f} MRR@20 {fig['mrr@20']:.4f}")
    print(f"lost {report['lost']} duplicated {report['duplicates']}; {report_note}")


if __name__ == "__main__":
    main()
