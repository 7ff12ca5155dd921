"""The authors' GRU4Rec (hidasib/GRU4Rec_PyTorch_Official, a local copy: this project does not
ship it) with one of its published parameter files, trained and evaluated with its own run.py
(conservative ties, cut-offs 1 5 10 20), one JSON line per run in the results file.

    git clone https://github.com/hidasib/GRU4Rec_PyTorch_Official /tmp/official
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/official_gru4rec.py \
        --official /tmp/official --data rsc15-100k --train TRAIN.tsv --test TEST.tsv \
        --paramfile rsc15_xe_shared_100_best --seed 1 \
        --out bench/results/accuracy-beyond-gru4rec-runs.jsonl

The official code seeds numpy (weights) itself but not torch (negative samples, dropout):
``--seed`` seeds torch before run.py starts, so that a run can be repeated. It needs joblib
(``pip install joblib``; not a dependency of this project).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procstats import append_run

LINE = re.compile(r"Recall@(\d+): ([0-9.]+) MRR@\d+: ([0-9.]+)")
# Two shims for newer libraries, neither changes a value: numpy >= 2 computes the official
# initial weights (float32 array times a float64 scalar) in float64, which Tensor.set_ refuses
# (numpy 1, the authors', kept float32: cast back); this torch no longer reads a pandas Series
# in torch.tensor (logq's item counts): hand it the Series' array.
LAUNCH = (
    "import runpy, sys, torch, pandas as pd; sys.path.insert(0, '.'); import gru4rec_pytorch as g; "
    "f = g.GRU4RecModel._init_numpy_weights; "
    "g.GRU4RecModel._init_numpy_weights = lambda self, shape: f(self, shape).astype('float32'); "
    "t = torch.tensor; torch.tensor = lambda d, *a, **k: "
    "t(d.to_numpy() if isinstance(d, pd.Series) else d, *a, **k); "
    "torch.set_num_threads({threads}); torch.manual_seed({seed}); "
    "sys.argv = {argv!r}; runpy.run_path('run.py', run_name='__main__')"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="a checkout of the authors' code")
    ap.add_argument("--data", required=True)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--paramfile", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phase", default="final", help="final (a test split) or choice (validation)")
    a = ap.parse_args()
    load0 = os.getloadavg()
    argv = ["run.py", str(a.train.resolve()), "-pf", f"paramfiles/{a.paramfile}.py",
            "-t", str(a.test.resolve()), "-m", "1", "5", "10", "20", "-e", "conservative",
            "-d", a.device]  # fmt: skip
    code = LAUNCH.format(
        threads=int(os.environ.get("OMP_NUM_THREADS", "1")), seed=a.seed, argv=argv
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=a.official, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(
            f"the official run.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    metrics: dict[str, float] = {}
    for k, recall, mrr in LINE.findall(done.stdout):
        metrics[f"recall@{k}"], metrics[f"mrr@{k}"] = float(recall), float(mrr)
    train_s = re.search(r"Total training time: ([0-9.]+)s", done.stdout)
    eval_s = re.search(r"Evaluation took ([0-9.]+)s", done.stdout)
    commit = subprocess.run(
        ["git", "-C", str(a.official), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    rec = {
        "phase": a.phase,
        "data": a.data,
        "arm": "official",
        "seed": a.seed,
        "preset": a.paramfile,
        "train": str(a.train),
        "test": str(a.test),
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/official_gru4rec.py "
        + shlex.join(sys.argv[1:]),
        "code": f"hidasib/GRU4Rec_PyTorch_Official {commit or 'd1fc311'} (run.py)",
        "metrics": metrics,
        "train_seconds": float(train_s.group(1)) if train_s else None,
        "eval_seconds": float(eval_s.group(1)) if eval_s else None,
    }
    append_run(a.out, rec, load0)


if __name__ == "__main__":
    main()
