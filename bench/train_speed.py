"""GRU4Rec training speed (events/s) on synthetic data or a real click file.

    .venv/bin/python bench/train_speed.py                       # synthetic, small model
    .venv/bin/python bench/train_speed.py --train ../shared/data/yoochoose-1_64/train.tsv.gz \
        --preset yoochoose_xe_shared_best --max-steps 300       # partial epoch of the reference

Prints one JSON line per run (device, params, steps, events, seconds, events/s).
"""

from __future__ import annotations

import json
import platform
import time
from datetime import UTC, datetime

import click
import torch

from trainer.presets import make_params
from trainer.train import train_gru4rec


@click.command()
@click.option("--train", "train_path", default=None, help="click file (default: synthetic)")
@click.option("--preset", default="yoochoose_xe_shared_best", show_default=True)
@click.option("--param", "params", multiple=True, help="key=value overrides")
@click.option("--max-steps", type=int, default=300, show_default=True, help="steps per epoch")
@click.option("--n-sessions", type=int, default=20000, show_default=True)
@click.option("--n-items", type=int, default=5000, show_default=True)
@click.option("--repeat", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="torch intra-op threads")
def main(
    train_path: str | None,
    preset: str,
    params: tuple[str, ...],
    max_steps: int,
    n_sessions: int,
    n_items: int,
    repeat: int,
    threads: int | None,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if train_path:
        from streamrec.data.clicklog import load_clicks

        df = load_clicks(train_path)
        source = train_path
    else:
        from streamrec.data.synthetic import generate_clicks

        df = generate_clicks(n_sessions=n_sessions, n_items=n_items, seed=0)
        source = f"synthetic({n_sessions} sessions, {n_items} items)"
    load_s = time.perf_counter() - t0
    p = make_params(preset, ["n_epochs=1", *params])
    for _ in range(repeat):
        _, _, st = train_gru4rec(df, p, progress=False, max_steps=max_steps)
        print(
            json.dumps(
                {
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "host": platform.node(),
                    "device": st["device"],
                    "cuda_graph": st["cuda_graph"],
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "data": source,
                    "events_in_file": len(df),
                    "load_seconds": round(load_s, 2),
                    "preset": preset,
                    "overrides": list(params),
                    "steps": st["n_steps_per_epoch"],
                    "events": st["n_events_per_epoch"],
                    "setup_seconds": round(st["setup_seconds"], 2),
                    "train_seconds": round(st["train_seconds"], 3),
                    "events_per_s": round(st["train_events_per_s"], 1),
                    "loss": round(st["epoch_losses"][-1], 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
