"""Memory of loading a checkpoint whose checkpoint.json claims more than its tensors hold.

A GRU4Rec of 40 items (layers [100]) is saved; a copy's ``model_config.n_items`` is edited to
6,000,000. Each load runs in a fresh child process (this interpreter, this ``sys.path``, so
``PYTHONPATH`` picks the code measured), which reports its RSS before the load, its peak RSS
(``ru_maxrss``) and its RSS after the refusal.

    PYTHONPATH=. python bench/checkpoint_claims.py [--items 6000000] [--out FILE]

Run it with ``PYTHONPATH`` at another checkout to measure that code (the figures in
``results/checkpoint-claims.md`` are main's and this branch's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(path: str) -> None:
    import psutil

    from streamrec.model.checkpoint import CheckpointError, load_checkpoint

    proc = psutil.Process()
    before = proc.memory_info().rss
    outcome = "loaded"
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        outcome = f"refused: {str(exc).split(': ', 1)[1][:120]}"
    print(
        json.dumps(
            {
                "rss_before_mb": before >> 20,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
                "rss_after_mb": proc.memory_info().rss >> 20,
                "outcome": outcome,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=6_000_000, help="items the JSON claims")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="append the result lines to this file")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    import streamrec
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from procstats import machine_line

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        real = Path(tmp) / "real"
        model = GRU4Rec(GRU4RecConfig(n_items=40, layers=[100]), seed=1)
        save_checkpoint(real, model, "gru4rec", [f"i{j}" for j in range(40)])
        forged = Path(tmp) / "forged"
        subprocess.run(["cp", "-r", str(real), str(forged)], check=True)
        meta = json.loads((forged / "checkpoint.json").read_text())
        meta["model_config"]["n_items"] = args.items
        (forged / "checkpoint.json").write_text(json.dumps(meta))
        lines = [f"code: {Path(streamrec.__file__).parent.parent}"]
        for name, path in (("40 items, as saved", real), (f"claims {args.items:,}", forged)):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            lines.append(f"{name}: {out.stdout.strip()}")
    lines.append(machine_line(load0))
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
