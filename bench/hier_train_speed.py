"""HRNN training speed (events/s) through ``train_hier`` on a synthetic per-user log.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/hier_train_speed.py

Two runs, one JSON line each: HRNN at its defaults (time-ordered session batches, the staged
schedule: 2 x n_epochs epochs) and the paper's batching (user-parallel, joint, no memory).
"""

from __future__ import annotations

import json

import click
import torch

from streamrec.data.synthetic import generate_clicks
from streamrec.model.hrnn import HRNN
from streamrec.model.items import build_item_index
from trainer.hier import HRNNParams, train_hier


@click.command()
@click.option("--n-sessions", type=int, default=4000, show_default=True)
@click.option("--n-items", type=int, default=3000, show_default=True)
@click.option("--n-users", type=int, default=400, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
def main(n_sessions: int, n_items: int, n_users: int, threads: int) -> None:
    torch.set_num_threads(threads)
    df = generate_clicks(n_sessions=n_sessions, n_items=n_items, n_users=n_users, seed=0)
    ids, idx = build_item_index(df["ItemId"])
    runs = (
        ("hrnn-defaults", {"n_epochs": 1}),
        (
            "hrnn-paper-user-batches",
            {"n_epochs": 1, "batching": "user", "schedule": "joint", "memory": 0},
        ),
    )
    for name, kw in runs:
        p = HRNNParams(seed=0, **kw)
        torch.manual_seed(0)
        model = HRNN(len(ids), variant="init", **p.model_options())
        st = train_hier(model, df, idx, p)
        line = {
            "model": name,
            "events": st["train_events"],
            "epochs": st["epochs"],
            "train_seconds": round(st["train_seconds"], 2),
            "events_per_s": round(st["train_events_per_s"], 1),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
