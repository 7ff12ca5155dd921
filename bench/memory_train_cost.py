"""Training cost of the session memory: ``train_gru4rec`` with a published preset (the defaults:
memory on, held-out head fit) and its ``*_paper`` twin, same data and seed, alternating round by
round (each first in turn), after a short warm-up run of each. Per run: CPU seconds of this
process (one thread: what the training costs, less what other processes take from it on a
shared host) and wall seconds; the defaults' CPU over the paper's, per round and the median.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/memory_train_cost.py \
        --train rsc15_train_full.tsv --preset rsc15_xe_shared_100_best --rounds 2 \
        --out bench/results/accuracy-beyond-gru4rec-speed.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procstats import append_run

from streamrec.data.clicklog import load_clicks
from trainer.presets import make_params
from trainer.train import train_gru4rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--param", action="append", default=[], help="key=value for both arms")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--code", default="", help="what code ran (recorded with the results)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    train = load_clicks(str(a.train))
    arms = {"defaults": a.preset, "paper": f"{a.preset}_paper"}
    # the first training of a process pays one-time costs (allocator, kernels' first calls):
    # a short warm-up run of each arm, not counted
    for preset in arms.values():
        train_gru4rec(train, make_params(preset, ["device=cpu", "n_epochs=1", *a.param]),
                      progress=False, max_steps=200)  # fmt: skip
    runs: list[dict[str, object]] = []
    for r in range(a.rounds):
        order = list(arms.items()) if r % 2 == 0 else list(reversed(arms.items()))
        for arm, preset in order:
            p = make_params(preset, ["device=cpu", *a.param])
            c0, t0 = time.process_time(), time.perf_counter()
            _, _, stats = train_gru4rec(train, p, progress=False)
            run = {
                "round": r,
                "arm": arm,
                "cpu_s": round(time.process_time() - c0, 1),
                "wall_s": round(time.perf_counter() - t0, 1),
                "head_fit_s": round(stats["memory_head"]["seconds"], 1)
                if "memory_head" in stats
                else None,
            }
            print(run, flush=True)
            runs.append(run)
    cpu = {(int(str(x["round"])), str(x["arm"])): float(str(x["cpu_s"])) for x in runs}
    ratios = [round(cpu[(r, "defaults")] / cpu[(r, "paper")], 3) for r in range(a.rounds)]
    rec = {
        "bench": "memory_train_cost",
        "code": a.code,
        "train": str(a.train),
        "preset": a.preset,
        "params": a.param,
        "runs": runs,
        "cpu_defaults_over_paper": ratios,
        "median_ratio": statistics.median(ratios),
    }
    append_run(a.out, rec, load0)


if __name__ == "__main__":
    main()
