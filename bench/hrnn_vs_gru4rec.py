"""HRNN against session-only GRU4Rec, at their defaults, over seeds.

Two logs, both last-session-out per user (each user's last session is the test, every next
item ranked among all training items, conservative ties; the user's training sessions warm the
HRNN user state in time order first):

* ``ml1m``: MovieLens-1M ratings sessionised by a 30-min gap, items < 5 events, sessions < 2
  and users < 3 sessions dropped (as bench/movielens_hier.py). ``--users N`` keeps a random
  sample of N users (fixed by ``--sample-seed``, not by the training seed) to fit CPU budgets.
* ``synthetic``: ``streamrec.data.synthetic.generate_clicks`` with planted persistent user tastes
  (each user draws the topic of every session from a concentrated Dirichlet preference, and
  each next click is one of the user's 10 favourite items with probability ``--syn-favourite``).

Every model is trained with its trainer's defaults (``TrainParams()`` for GRU4Rec,
``HRNNParams()`` for HRNN) plus the same ``--param key=value`` overrides, so "defaults" and
"identical settings" are both one command. ``--losses`` instead trains HRNN-init once per loss
and compares it with POP.

    .venv/bin/python bench/hrnn_vs_gru4rec.py --data ml1m --users 400 --seeds 1 2 3 \
        --out bench/results/hrnn-ml1m.jsonl
    .venv/bin/python bench/hrnn_vs_gru4rec.py --report bench/results/hrnn-ml1m.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamrec.data.clicklog import sessionize
from streamrec.data.synthetic import generate_clicks
from streamrec.model.hrnn import HRNN
from streamrec.model.items import build_item_index
from trainer.data import filter_users, split_last_session_out
from trainer.hier import (
    HRNNParams,
    PopStepModel,
    evaluate_users,
    split_stats,
    train_hier,
)
from trainer.presets import TrainParams
from trainer.train import train_gru4rec

ML1M = Path("/work/shared/data/movielens-1m/ratings.tsv.gz")
MODELS = ("pop", "gru4rec", "hrnn-none", "hrnn-init", "hrnn-all")
LOSS_RUNS = {
    "xe": ["loss=cross-entropy", "logq=0"],
    "xe-logq": ["loss=cross-entropy", "logq=1"],
    "bpr-max": ["loss=bpr-max"],
    "top1-max": ["loss=top1-max"],
    "bpr": ["loss=bpr"],
    "top1": ["loss=top1"],
}


def load(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    if args.data == "ml1m":
        r = pd.read_csv(ML1M, sep="\t", dtype={"UserId": str, "ItemId": str})
        r = r[["UserId", "ItemId", "Time"]].astype({"Time": "float64"})
        if args.users:
            users = np.sort(r["UserId"].unique())
            keep = np.random.default_rng(args.sample_seed).choice(
                users, size=min(args.users * 3, len(users)), replace=False
            )  # oversample: the filter drops users with < 3 sessions
            r = r[r["UserId"].isin(keep)]
        df = filter_users(sessionize(r, 1800.0), 3, 2, 5)
        if args.users:
            us = np.sort(df["UserId"].unique())
            rng = np.random.default_rng(args.sample_seed + 1)
            keep = rng.choice(us, size=min(args.users, len(us)), replace=False)
            df = filter_users(df[df["UserId"].isin(keep)], 3, 2, 5)
    else:
        df = generate_clicks(
            n_sessions=args.syn_sessions, n_items=args.syn_items, n_users=args.syn_users,
            n_topics=20, seed=args.sample_seed, user_concentration=0.1,
            p_user_favourite=args.syn_favourite, n_user_favourites=10,
        )  # fmt: skip
        df["UserId"] = df["UserId"].astype(str)
        df = filter_users(df, 3, 2, 2)
    return split_last_session_out(df)


def run(model_name: str, params: list[str], tr: pd.DataFrame, te: pd.DataFrame, seed: int) -> dict:
    ov = [*params, f"seed={seed}", "device=cpu"]
    t0 = time.perf_counter()
    stats: dict = {}
    model: torch.nn.Module
    if model_name == "pop":
        ids, index = build_item_index(tr["ItemId"])
        model = PopStepModel.from_log(tr, index)
    elif model_name == "gru4rec":
        keys = set(TrainParams.field_names())
        p = TrainParams.make(None, [kv for kv in ov if kv.split("=")[0] in keys])
        model, ids, stats = train_gru4rec(tr, p, progress=False)
        index = {iid: r for r, iid in enumerate(ids)}
    else:
        keys = set(HRNNParams.field_names())
        hp = HRNNParams.make(None, [kv for kv in ov if kv.split("=")[0] in keys])
        ids, index = build_item_index(tr["ItemId"])
        torch.manual_seed(seed)
        model = HRNN(len(ids), variant=model_name.split("-", 1)[1], **hp.model_options())
        stats = train_hier(model, tr, index, hp)
    res = evaluate_users(model, tr, te, index, ks=(5, 20), ties="conservative")
    first = evaluate_users(model, tr, te, index, (20,), "conservative", first_n=3)
    res["first3_recall@20"], res["first3_mrr@20"] = first["recall@20"], first["mrr@20"]
    res["train_seconds"] = stats.get("train_seconds", 0.0)
    res["train_events_per_s"] = stats.get("train_events_per_s", 0.0)
    res["epoch_losses"] = stats.get("epoch_losses", [])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("ml1m", "synthetic"), default="ml1m")
    ap.add_argument("--users", type=int, default=0, help="ml1m: sample this many users (0: all)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--syn-sessions", type=int, default=6000)
    ap.add_argument("--syn-items", type=int, default=1000)
    ap.add_argument("--syn-users", type=int, default=600)
    ap.add_argument("--syn-favourite", type=float, default=0.2, help="p_user_favourite")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--losses", nargs="*", default=None, choices=list(LOSS_RUNS))
    ap.add_argument("--param", action="append", default=[], help="key=value for every model")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report", type=Path, nargs="+", default=None)
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    torch.set_num_threads(args.threads)
    tr, te = load(args)
    setup = {
        "kind": "setup",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}",
        "argv": " ".join(sys.argv),
        "split": split_stats(tr, te),
    }
    print(json.dumps(setup), flush=True)
    runs: list[tuple[str, str, list[str]]] = []
    if args.losses is not None:
        runs = [("pop", "pop", [])]
        for name in args.losses or list(LOSS_RUNS):
            for ns in ("n_sample=0", "n_sample=2048"):
                label = f"hrnn-init {name} {ns}"
                runs.append((label, "hrnn-init", [*args.param, *LOSS_RUNS[name], ns]))
    else:
        runs = [(m, m, list(args.param)) for m in args.models]
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    if out:
        out.write(json.dumps(setup) + "\n")
    for seed in args.seeds:
        for label, model, params in runs:
            if model == "pop" and seed != args.seeds[0]:
                continue
            row = {"kind": "result", "label": label, "seed": seed, "params": params}
            row |= run(model, params, tr, te, seed)
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def report(paths: list[Path]) -> str:
    rows = [json.loads(x) for p in paths for x in p.read_text().splitlines() if x.strip()]
    res = [r for r in rows if r["kind"] == "result"]
    labels = list(dict.fromkeys(r["label"] for r in res))
    out = [
        "| model | seeds | Recall@20 | MRR@20 | Recall@5 | MRR@5 | first-3 Recall@20 "
        "| first-3 MRR@20 | events/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lab in labels:
        rs = [r for r in res if r["label"] == lab]
        col = {k: [r[k] for r in rs] for k in rs[0] if isinstance(rs[0][k], float)}
        eps = statistics.mean(col["train_events_per_s"]) if rs[0]["train_events_per_s"] else 0
        out.append(
            f"| {lab} | {len(rs)} | {_ms(col['recall@20'])} | {_ms(col['mrr@20'])} | "
            f"{_ms(col['recall@5'])} | {_ms(col['mrr@5'])} | {_ms(col['first3_recall@20'])} | "
            f"{_ms(col['first3_mrr@20'])} | {eps:,.0f} |"
        )
    base = {r["seed"]: r for r in res if r["label"] == "gru4rec"}
    if base:
        out += ["", "Paired per seed, model − gru4rec (mean ± spread over the shared seeds):", "",
                "| | seeds | Recall@20 | MRR@20 |", "|---|---:|---:|---:|"]  # fmt: skip
        for lab in labels:
            rs = [r for r in res if r["label"] == lab and r["seed"] in base and lab != "gru4rec"]
            if not rs or lab == "pop":
                continue
            cells = []
            for k in ("recall@20", "mrr@20"):
                d = [r[k] - base[r["seed"]][k] for r in rs]
                rel = statistics.mean(d) / statistics.mean(base[r["seed"]][k] for r in rs)
                cells.append(f"{_ms(d)} ({rel:+.1%})")
            out.append(f"| {lab} − gru4rec | {len(rs)} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
