"""GRU4Rec training speed by torch thread count, interleaved, with the load around each run.

    OMP_NUM_THREADS= .venv/bin/python bench/train_threads.py \
        --train /work/shared/data/rsc15-100k/train_tr.tsv.gz --threads default 1 2 --rounds 3

Each run is a child process (``trainer``'s defaults, one epoch cut at ``--max-steps``), so
the thread count is set before torch starts as ``trainer train`` would; ``default`` sets
nothing (torch's own choice: one thread per core), ``auto`` is ``trainer train``'s default
(``trainer.threads.choose_threads``). Prints one JSON line per run and the machine line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
from procstats import machine_line

_CHILD = """
import json, sys, time, torch
from streamrec.data.clicklog import load_clicks
from trainer.presets import make_params
from trainer.threads import choose_threads
from trainer.train import train_gru4rec
which, path, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if which == "auto":
    torch.set_num_threads(choose_threads(None))
elif which != "default":
    torch.set_num_threads(int(which))
df = load_clicks(path)
_, _, st = train_gru4rec(df, make_params(None, ["n_epochs=1"]), progress=False,
                         max_steps=max_steps)
print(json.dumps({"threads": which, "torch_threads": torch.get_num_threads(),
                  "events": st["n_events_per_epoch"], "train_seconds": st["train_seconds"],
                  "events_per_s": st["train_events_per_s"]}))
"""


@click.command()
@click.option("--train", "train_path", required=True, help="click file")
@click.option("--threads", "which", multiple=True, default=["default", "1", "2"])
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--max-steps", type=int, default=150, show_default=True)
def main(train_path: str, which: tuple[str, ...], rounds: int, max_steps: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    load_start = os.getloadavg()
    for r in range(rounds):
        for w in which:
            before = os.getloadavg()[0]
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, w, train_path, str(max_steps)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row.update(round=r, load1_before=before, load1_after=os.getloadavg()[0])
            print(json.dumps(row), flush=True)
    print(machine_line(load_start))


if __name__ == "__main__":
    main()
