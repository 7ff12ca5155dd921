"""Accuracy of GRU4Rec and the four baselines on yoochoose-1_64, beside the official figures.

Drives the real command line (`trainer train`, `trainer baseline`) and writes a markdown table:

    python bench/yoochoose_accuracy.py --data ../shared/data/yoochoose-1_64 \
        [--epochs 10] [--device auto] --out bench/results/yoochoose-accuracy.md

The reference row is the official GRU4Rec PyTorch code with `yoochoose_xe_shared_best`
(10 epochs, H100), from ../shared/data/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

KS = ("1", "5", "10", "20")
REFERENCE = {
    "recall@1": 0.1760, "recall@5": 0.4568, "mrr@5": 0.2770, "recall@10": 0.5796,
    "mrr@10": 0.2936, "recall@20": 0.6843, "mrr@20": 0.3009,
}  # fmt: skip
COLUMNS = ["recall@1", "recall@5", "mrr@5", "recall@10", "mrr@10", "recall@20", "mrr@20"]


def _run(args: list[str]) -> str:
    print("+", " ".join(args), flush=True)
    done = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"
    except ImportError:
        return f"{os.cpu_count()} CPU cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    # the parity check: the authors' model (no session memory); yoochoose_xe_shared_best for
    # the defaults
    parser.add_argument("--preset", default="yoochoose_xe_shared_best_paper")
    parser.add_argument("--baselines", default="pop,spop,item-knn,bpr-mf")
    parser.add_argument("--out", type=Path, default=Path("bench/results/yoochoose-accuracy.md"))
    a = parser.parse_args()
    train, test = a.data / "train.tsv.gz", a.data / "test.tsv.gz"
    rows: list[tuple[str, dict[str, float], str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        _run(
            [sys.executable, "-m", "trainer", "train", "--train", str(train), "--test", str(test),
             "--preset", a.preset, "--param", f"n_epochs={a.epochs}",
             "--param", f"device={a.device}", "--k", *KS, "--ties", "conservative",
             "--no-progress", "--out", str(model_dir)]
        )  # fmt: skip
        metrics = json.loads((model_dir / "metrics.json").read_text())
        note = (
            f"{a.epochs} epochs, {metrics['train_seconds']:.0f} s, "
            f"{metrics['train_events_per_s']:,.0f} events/s"
        )
        rows.append((f"streamrec GRU4Rec ({a.preset})", metrics, note))
    for name in [b for b in a.baselines.split(",") if b]:
        out = _run(
            [sys.executable, "-m", "trainer", "baseline", "--name", name, "--train", str(train),
             "--test", str(test), "--json"]
        )  # fmt: skip
        rows.append((f"baseline {name}", json.loads(out), ""))

    header = "| model | " + " | ".join(c.replace("@", "@") for c in COLUMNS) + " | notes |"
    lines = [
        "# GRU4Rec accuracy on yoochoose-1_64 (next item, all items ranked, conservative ties)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine()}",
        "- command: `python " + " ".join(sys.argv) + "`",
        "",
        header,
        "|" + "---|" * (len(COLUMNS) + 2),
        "| official GRU4Rec PyTorch, 10 epochs, H100 (data README) | "
        + " | ".join(f"{REFERENCE[c]:.4f}" for c in COLUMNS)
        + " | 287 s, ~13,400 events/s |",
    ]
    for name, m, note in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in COLUMNS) + f" | {note} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
