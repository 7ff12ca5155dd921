"""HRNN and p-RNN against session-only GRU4Rec on MovieLens 1M (CPU-sized runs).

Protocol: ratings sessionised per user by an inactivity gap (``--gap`` seconds); items with
fewer than 5 events, sessions shorter than 2 and users with fewer than ``--min-sessions``
sessions dropped (repeated until stable); each user's last session is the test session
(restricted to training items), the rest is training. Evaluation per user: the training
sessions warm the user state (HRNN), then every next item of the test session is ranked among
all items (conservative ties), Recall/MRR@5,20.

Every model gets the same hidden size, loss, negatives, learning rate and epochs per subnet.
p-RNN features: MovieLens genres (multi-hot) and the title (hashed TF-IDF), one feature subnet
over both (``--feature-subnets 2`` gives each its own).

    .venv/bin/python bench/movielens_hier.py --out bench/results/movielens-hier.jsonl
    .venv/bin/python bench/movielens_hier.py --report bench/results/movielens-hier.jsonl

Results are appended one JSON line per model, so a long run can be resumed (``--skip-done``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamrec.data.clicklog import sessionize
from streamrec.model.hrnn import HRNN
from streamrec.model.items import build_item_index
from streamrec.model.prnn import PRNN
from trainer.data import filter_users, split_last_session_out
from trainer.features import FeatureMatrix, hashed_tfidf, load_item_meta, multi_hot
from trainer.hier import (
    HierParams,
    PopStepModel,
    evaluate_users,
    split_stats,
    train_hier,
)
from trainer.train import train_gru4rec

DATA = Path("/work/shared/data/movielens-1m")
MODELS = [
    "pop",
    "gru4rec",
    "hrnn-none",
    "hrnn-init",
    "hrnn-all",
    "prnn-id",
    "prnn-feature",
    "prnn-joint",
    "prnn-residual",
    "prnn-alternating",
    "prnn-interleaving",
    "prnn-concat",
]


def load_split(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    r = pd.read_csv(args.data / "ratings.tsv.gz", sep="\t", dtype={"UserId": str, "ItemId": str})
    r = r[["UserId", "ItemId", "Time"]].astype({"Time": "float64"})
    s = sessionize(r, args.gap)
    f = filter_users(s, min_sessions=args.min_sessions, min_session_length=2, min_item_support=5)
    return split_last_session_out(f)


def features(args: argparse.Namespace, index: dict[str, int]) -> list[FeatureMatrix]:
    meta = load_item_meta(args.data / "items.tsv.gz")
    g = multi_hot(meta, "Genres", index).with_missing_flag()
    t = hashed_tfidf(meta, ["Title"], index, n_features=args.tfidf_dim).with_missing_flag()
    if args.feature_subnets == 2:
        return [g, t]
    both = np.concatenate([g.values, t.values], axis=1)
    return [FeatureMatrix("genres+title", both, g.has_features | t.has_features)]


def run_one(name: str, args: argparse.Namespace, tr, te, ids, index, feats) -> dict:
    p = HierParams(
        loss="cross-entropy",
        batch_size=args.batch_size,
        n_epochs=args.epochs,
        learning_rate=args.lr,
        n_sample=args.n_sample,
        sample_alpha=0.5,
        logq=args.logq,
        seed=args.seed,
        device="cpu",
    )
    h = args.hidden
    torch.manual_seed(args.seed)
    stats: dict = {}
    model: torch.nn.Module
    if name == "pop":
        rows = torch.from_numpy(tr["ItemId"].map(index).to_numpy().copy())
        model = PopStepModel(torch.bincount(rows, minlength=len(ids)))
        eval_index = index
    elif name == "gru4rec":
        # the GRU4Rec trainer itself (session-parallel), same settings
        model, g_ids, stats = train_gru4rec(
            tr,
            {
                "loss": "cross-entropy", "layers": [h], "batch_size": args.batch_size,
                "n_epochs": args.epochs, "learning_rate": args.lr, "n_sample": args.n_sample,
                "sample_alpha": 0.5, "logq": args.logq, "constrained_embedding": False,
                "embedding": h, "seed": args.seed, "device": "cpu",
            },
            progress=False,
        )  # fmt: skip
        eval_index = {iid: r for r, iid in enumerate(g_ids)}
    elif name.startswith("hrnn-"):
        variant = name.split("-", 1)[1]
        model = HRNN(len(ids), layers=[h], user_layers=[h], embedding=h, variant=variant,
                     dropout_p_init=args.dropout_init)  # fmt: skip
        stats = train_hier(model, tr, index, p)
        eval_index = index
    else:
        kind = name.split("-", 1)[1]
        arch = {"id": "id", "feature": "feature", "concat": "concat"}.get(kind, "parallel")
        p.schedule = (
            kind if kind in ("joint", "residual", "alternating", "interleaving") else "joint"
        )
        fv = [] if arch == "id" else feats
        model = PRNN(
            len(ids), [f.dim for f in fv], arch=arch, id_hidden=h, feature_hidden=h,
            embedding=h, feature_values=[torch.from_numpy(f.values) for f in fv],
        )  # fmt: skip
        stats = train_hier(model, tr, index, p)
        eval_index = index
    t0 = time.perf_counter()
    res = evaluate_users(model, tr, te, eval_index, ks=(5, 20), ties="conservative")
    res["eval_seconds"] = time.perf_counter() - t0
    if args.first_n:
        first = evaluate_users(
            model, tr, te, eval_index, (5, 20), "conservative", first_n=args.first_n
        )
        res.update({f"first{args.first_n}_{k}": v for k, v in first.items() if k != "n_users"})
    res["train_seconds"] = stats.get("train_seconds", 0.0)
    res["epochs"] = stats.get("epochs", args.epochs if name != "pop" else 0)
    res["train_events_per_s"] = stats.get("train_events_per_s", 0.0)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("bench/results/movielens-hier.jsonl"))
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--gap", type=float, default=1800.0)
    ap.add_argument("--min-sessions", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.08)
    ap.add_argument("--n-sample", type=int, default=1024)
    ap.add_argument("--logq", type=float, default=1.0)
    ap.add_argument("--dropout-init", type=float, default=0.0)
    ap.add_argument("--tfidf-dim", type=int, default=128)
    ap.add_argument("--feature-subnets", type=int, choices=(1, 2), default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--first-n", type=int, default=3, help="also rank only the first N predictions per session"
    )
    ap.add_argument("--skip-done", action="store_true")
    ap.add_argument(
        "--report", type=Path, nargs="+", default=None, help="print a markdown table and exit"
    )
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    torch.set_num_threads(args.threads)
    tr, te = load_split(args)
    ids, index = build_item_index(tr["ItemId"])
    feats = features(args, index)
    setup = {
        "kind": "setup",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "argv": " ".join(sys.argv),
        "config": {k: str(v) for k, v in vars(args).items()},
        "split": split_stats(tr, te),
        "feature_dims": [f.dim for f in feats],
        "feature_coverage": [f.coverage for f in feats],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.skip_done and args.out.exists():
        done = {json.loads(x).get("model") for x in args.out.read_text().splitlines() if x}
    with open(args.out, "a") as f:
        f.write(json.dumps(setup) + "\n")
        for name in args.models:
            if name in done:
                continue
            res = run_one(name, args, tr, te, ids, index, feats)
            row = {"kind": "result", "model": name, **res}
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()


def report(paths: list[Path]) -> str:
    lines = [json.loads(x) for p in paths for x in p.read_text().splitlines() if x.strip()]
    setups = [x for x in lines if x["kind"] == "setup"]
    rows = {x["model"]: x for x in lines if x["kind"] == "result"}  # last run wins
    out = []
    if setups:
        s = setups[-1]["split"]
        out.append(
            "| split | events | sessions | users | items | mean session length |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            f"| train | {s['train_events']:,} | {s['train_sessions']:,} | {s['train_users']:,} | "
            f"{s['train_items']:,} | {s['train_mean_session_length']:.1f} |\n"
            f"| test | {s['test_events']:,} | {s['test_sessions']:,} | {s['test_users']:,} | "
            f"{s['test_items']:,} | {s['test_mean_session_length']:.1f} |\n"
        )
    out.append(
        "| model | Recall@5 | MRR@5 | Recall@20 | MRR@20 | first-3 Recall@20 | first-3 MRR@20 "
        "| epochs | train s | events/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name in MODELS:
        if name in rows:
            r = rows[name]
            f3 = (
                f"{r['first3_recall@20']:.4f} | {r['first3_mrr@20']:.4f}"
                if "first3_recall@20" in r
                else "– | –"
            )
            out.append(
                f"| {name} | {r['recall@5']:.4f} | {r['mrr@5']:.4f} | {r['recall@20']:.4f} | "
                f"{r['mrr@20']:.4f} | {f3} | {r['epochs']} | {r['train_seconds']:.0f} | "
                f"{r['train_events_per_s']:,.0f} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
