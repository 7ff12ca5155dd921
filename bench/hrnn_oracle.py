"""What knowing a user's earlier items is worth to GRU4Rec (hrnn-staged-memory.md, appendix).

Same logs and split as ``bench/hrnn_vs_gru4rec.py`` (last session out). Prints how many test
targets (and later-session training targets) are items of the user's earlier sessions, then
trains GRU4Rec at its defaults and ranks every next item of each test session with a fixed
score offset added to the user's earlier items: all of them, or only the last K distinct. An
offset of -1e9 removes them (always run), 0 is GRU4Rec itself. Each session is scored one click
at a time (``GRU4Rec.step``; an unknown item is fed as row -1 and keeps the state), ranks
conservative.

    .venv/bin/python bench/hrnn_oracle.py --data ml1m --users 300 --k 0 30 100 300 --offsets 0 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hrnn_vs_gru4rec import load

from trainer.presets import TrainParams
from trainer.train import train_gru4rec

REMOVE = -1e9  # an offset that removes the user's earlier items from the ranking (always run)


def repeat_shares(tr, te) -> dict[str, float]:
    """Share of test targets in the user's training items, and of training targets in the
    user's earlier training sessions."""
    hist = tr.groupby("UserId")["ItemId"].apply(set).to_dict()
    test = [
        it in hist.get(u, set())
        for u, g in te.groupby("UserId")
        for it in list(g.sort_values("Time")["ItemId"])[1:]
    ]
    train = []
    for _, g in tr.sort_values(["UserId", "Time"]).groupby("UserId"):
        seen: set[str] = set()
        for _, s in g.groupby("SessionId", sort=False):
            items = list(s["ItemId"])
            train += [it in seen for it in items[1:]]
            seen |= set(items)
    return {"test_in_history": float(np.mean(test)), "train_in_history": float(np.mean(train))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("ml1m", "synthetic"), default="ml1m")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, nargs="+", default=[0], help="last K distinct (0: all)")
    ap.add_argument("--offsets", type=float, nargs="+", default=[0.0, 1.0])
    args = ap.parse_args()
    args.offsets = [*args.offsets, REMOVE]
    torch.set_num_threads(1)
    ns = argparse.Namespace(
        data=args.data, users=args.users, sample_seed=args.sample_seed, syn_sessions=6000,
        syn_items=1000, syn_users=600, syn_favourite=0.2,
    )  # fmt: skip
    tr, te = load(ns)
    print(json.dumps({"data": args.data, **repeat_shares(tr, te)}), flush=True)
    g, ids, _ = train_gru4rec(tr, TrainParams(seed=args.seed, device="cpu"), progress=False)
    g.eval()
    index = {iid: r for r, iid in enumerate(ids)}
    newest_first = (
        tr.sort_values("Time")
        .groupby("UserId")["ItemId"]
        .apply(lambda x: [index[i] for i in dict.fromkeys(reversed(list(x))) if i in index])
    )
    ranks: dict[tuple[int, float], list[int]] = {(k, o): [] for k in args.k for o in args.offsets}
    with torch.no_grad():
        for u, s in te.groupby("UserId"):
            rows = [index.get(i, -1) for i in s.sort_values("Time")["ItemId"]]
            hist = newest_first.get(u, [])
            mem = {k: torch.tensor(hist[:k] if k else hist, dtype=torch.long) for k in args.k}
            state = torch.zeros(1, g.state_dim)
            for prev, target in itertools.pairwise(rows):
                state, scores = g.step(torch.tensor([prev]), state)
                if target < 0:
                    continue
                for k, off in ranks:
                    x = scores[0].clone()
                    x[mem[k]] += off
                    ranks[(k, off)].append(int((x >= x[target]).sum()))
    for (k, off), rs in ranks.items():
        r = np.array(rs)
        mrr = float(np.where(r <= 20, 1 / r, 0).mean())
        print(json.dumps({
            "data": args.data, "last_k": k or "all", "offset": off,
            "recall@20": float((r <= 20).mean()), "mrr@20": mrr, "n_events": len(rs),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
