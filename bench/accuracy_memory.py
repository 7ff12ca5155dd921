"""GRU4Rec with the session-memory head (the defaults) against the paper's model (the
``*_paper`` presets): train on a train file, evaluate next-item on a test file (conservative
ties, test items unknown to training and sessions left with one click dropped, as the
official evaluation), and append one JSON line per run to a results file.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/accuracy_memory.py \
        --data rsc15-100k --train TRAIN.tsv --test TEST.tsv --preset rsc15_xe_shared_100_best \
        --arm defaults --param seed=1 --out bench/results/accuracy-beyond-gru4rec-runs.jsonl

``--arm`` names the row (defaults, paper, or an ablation); the preset and ``--param``
overrides say what was trained. Figures: bench/results/accuracy-beyond-gru4rec.md.

``--model hrnn|prnn`` trains HRNN / p-RNN as ``trainer train --model ...`` does (data with a
``UserId``; ``--variant``, ``--item-meta`` as there; ``--preset`` optional) and evaluates per
user (``trainer.hier.evaluate_users``: the training sessions warm the user state).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procstats import append_run

from streamrec.data.clicklog import load_clicks
from trainer.evaluate import evaluate_next_item
from trainer.hier import evaluate_users, train_hrnn_job, train_prnn_job
from trainer.jobs import TrainJob
from trainer.presets import make_params
from trainer.train import train_gru4rec

KS = (1, 5, 10, 20)


def train_and_evaluate(
    a: argparse.Namespace, train: pd.DataFrame, test: pd.DataFrame
) -> tuple[dict[str, float], dict[str, Any], int, float]:
    """(metrics, training stats, seed, evaluation seconds) of the run ``a`` asks for."""
    if a.model == "gru4rec":
        p = make_params(a.preset, a.param)
        model, item_ids, stats = train_gru4rec(train, p, progress=False)
        index = {i: r for r, i in enumerate(item_ids)}
        test = test[test.ItemId.astype(str).isin(index)]
        test = test[test.groupby("SessionId").SessionId.transform("size") >= 2]
        t0 = time.perf_counter()
        metrics = evaluate_next_item(model, test, index, ties="conservative")
        return metrics, stats, p.seed, time.perf_counter() - t0
    options = {"--variant": a.variant, "--item-meta": a.item_meta}
    job = TrainJob(train, a.preset, a.param, options, progress=False)
    out = (train_hrnn_job if a.model == "hrnn" else train_prnn_job)(job)
    index = {i: r for r, i in enumerate(out.item_ids)}
    t0 = time.perf_counter()
    metrics = evaluate_users(out.model, train, test, index, ks=KS, ties="conservative")
    return metrics, out.stats, int(out.train_params["seed"]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="data set name for the record")
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--model", choices=("gru4rec", "hrnn", "prnn"), default="gru4rec")
    ap.add_argument("--variant", default=None, help="HRNN variant (init, all)")
    ap.add_argument("--item-meta", default=None, help="p-RNN item metadata file")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--arm", required=True)
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phase", default="final", help="final (a test split) or choice (validation)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    if a.model == "gru4rec" and a.preset is None:
        ap.error("--preset is required for gru4rec")
    train, test = load_clicks(str(a.train)), load_clicks(str(a.test))
    metrics, stats, seed, eval_seconds = train_and_evaluate(a, train, test)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    rec = {
        "phase": a.phase,
        "data": a.data,
        "model": a.model,
        "arm": a.arm,
        "seed": seed,
        "preset": a.preset,
        "overrides": a.param,
        "train": str(a.train),
        "test": str(a.test),
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/accuracy_memory.py "
        + shlex.join(sys.argv[1:]),
        "code": commit.stdout.strip(),
        "metrics": {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
        "train_seconds": round(stats["train_seconds"], 1),
        "train_events_per_s": round(stats["train_events_per_s"]),
        "memory_head": stats.get("memory_head"),
        "eval_seconds": round(eval_seconds, 1),
        "eval_events_per_s": round(metrics["n_events"] / max(eval_seconds, 1e-9)),
        "epoch_losses": [round(x, 5) for x in stats["epoch_losses"]],
    }
    append_run(a.out, rec, load0)


if __name__ == "__main__":
    main()
