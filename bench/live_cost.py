"""What live metrics and a second arm cost in the serving core (no broker).

Times ``process_batch`` (advance, score, emit, and with live metrics the scoring of each
click against the previous answer) plus what the engine does with a batch's evaluations
(``LiveMetrics.add``: the Prometheus counters and the counts for the metrics topic) over an
in-memory StateStore, with the serve bench's GRU4Rec (17,319 items x 100 units) on its
synthetic stream, batch 256, in these modes:

  live_off      one arm, live metrics switched off (worker.live_metrics=false)
  live_on       one arm, live metrics on (the default)
  ab_0.3        champion and challenger (same size), --challenger-share 0.3, live on
  shadow        champion answers, the challenger scores every click too, live on

The modes run in turns, ``--repeat`` rounds, in an order that turns each round; each mode's
figure is its best round (the machine is shared), and each comparison is also given as the
median over rounds of the round's own ratio. As in both workers, the model and imports are
frozen out of the garbage collector once loaded (``gc.freeze()``; ``--no-freeze``: not, as
in the first runs): else a full collection walks them, a few times per pass, at ~10 µs per
event, and the mode that allocates more pays it more often. Publishing to the topic is one
record per partition per checkpoint (not timed here: it is off the per-click path).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/live_cost.py [--events 10000] \\
        [--repeat 5] [--modes live_off,live_on] [--no-freeze]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_overhead import T0, records
from procstats import machine_line
from serve_bench import make_checkpoint

from streamrec.engines.live import LiveMetrics
from streamrec.serving.arms import ArmModels
from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state_store import StateStore
from streamrec.settings import Settings


def one_pass(
    recs: list[Record], models: ArmModels, config: CoreConfig, batch: int
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one pass over a fresh store."""
    store = StateStore()
    live = LiveMetrics(Settings(), CollectorRegistry(), {"bootstrap.servers": "unused:9"})
    gc.collect()  # every pass starts from the same heap (the last pass's store is garbage)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(recs), batch):
        res = process_batch(recs[i : i + batch], store, models, config, now=T0)
        res.recommendation_values()
        if config.live_metrics:
            live.add(res)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--modes",
        default="live_off,live_on,ab_0.3,shadow",
        help="the modes to run, comma-separated (fewer modes: more rounds in the same time)",
    )
    ap.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the model and imports in every GC pass (the workers gc.freeze() them; "
        "the first runs of this bench did not)",
    )
    a = ap.parse_args()

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="live-cost-"))
    ckpt = make_checkpoint(tmp / "model")
    champion = ServingModel.from_checkpoint(ckpt, "cpu", top_k=20)
    challenger = ServingModel.from_checkpoint(ckpt, "cpu", top_k=20)
    challenger.version = "challenger-" + challenger.version
    on, off = CoreConfig(), CoreConfig(live_metrics=False)
    every = {
        "live_off": (ArmModels(champion), off),
        "live_on": (ArmModels(champion), on),
        "ab_0.3": (ArmModels(champion, challenger, share=0.3), on),
        "shadow": (ArmModels(champion, challenger, shadow=True), on),
    }
    modes = {name: every[name] for name in a.modes.split(",")}
    recs = records(a.events)
    for models, config in modes.values():  # warm up every path
        one_pass(recs[: 4 * a.batch], models, config, a.batch)
    if not a.no_freeze:  # as both workers do once loaded (engines/native/worker.py)
        gc.collect()
        gc.freeze()
    wall = {name: float("inf") for name in modes}
    cpu = dict(wall)
    rounds: list[dict[str, float]] = []  # CPU seconds of each mode, round by round
    order = list(modes)
    for r in range(a.repeat):
        this: dict[str, float] = {}
        # the order turns each round, so no mode always runs first (or after the heaviest)
        for name in order[r % len(order) :] + order[: r % len(order)]:
            models, config = modes[name]
            w, c = one_pass(recs, models, config, a.batch)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
            this[name] = c
        rounds.append(this)
    n = len(recs)
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine_line()}")
    print(
        f"# {n} events, batch {a.batch}, best of {a.repeat} rounds, wall and CPU time, "
        f"gc.freeze() {'no' if a.no_freeze else 'yes'}"
    )
    for name in modes:
        print(
            f"{name:9s} wall {n / wall[name]:6.0f} events/s  "
            f"CPU {n / cpu[name]:6.0f} events/s  {cpu[name] / n * 1e6:6.1f} CPU µs/event"
        )
    for label, a_, b_ in (
        ("live metrics on vs off", "live_on", "live_off"),
        ("shadow vs one arm", "shadow", "live_on"),
        ("A/B 0.3 vs one arm", "ab_0.3", "live_on"),
    ):
        if a_ not in modes or b_ not in modes:
            continue
        # beside the best rounds' ratio, the median of each round's own ratio: a neighbour's
        # load that comes and goes moves both modes of a round alike
        paired = statistics.median(r[b_] / r[a_] - 1 for r in rounds)
        print(
            f"{label}: events/s {wall[b_] / wall[a_] - 1:+.1%} wall time, "
            f"{cpu[b_] / cpu[a_] - 1:+.1%} CPU time (best rounds), "
            f"{paired:+.1%} CPU time (median of {len(rounds)} rounds' ratios)"
        )


if __name__ == "__main__":
    main()
