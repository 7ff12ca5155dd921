"""Serving cost of the session memory: ``ServingModel.step`` (the worker's model step: advance,
scores, top-k, host copies) of GRU4Rec with the defaults' memory (K=64, gated, fitted-size
offsets) beside the paper's model, same weights otherwise, sized like the yoochoose-1_64 model
(17,319 items, 100 units). Sessions of 10 clicks (``--clicks``; from 64 on, full memories)
with repeats, so the memories fill; the two models alternate round by round (the same host
load for both). Per batch size: the median wall time per step, and the best (least) CPU time
per step of the process over the rounds (``time.process_time``, one thread: what the step
costs, less what other processes take from it on a shared host).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/memory_step_speed.py [--rounds 15]

``--digest``: instead of timing, the SHA-256 of every answer of each model (states, top rows,
top scores; batches 1-256, 10- and 80-click sessions, an unknown item now and then): the same
in two code versions = the same answers to the bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procstats import append_run

from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.serving.served_model import ServingModel

N_ITEMS, UNITS, CLICKS = 17_319, 100, 10


def models() -> dict[str, ServingModel]:
    torch.manual_seed(0)  # the gate's weights below: the same models in every run
    paper = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[UNITS]), seed=1)
    memory = GRU4Rec(
        GRU4RecConfig(n_items=N_ITEMS, layers=[UNITS], session_memory=64, memory_gate=True), seed=1
    )
    memory.load_state_dict(paper.state_dict(), strict=False)
    with torch.no_grad():  # offsets of a fitted head's size (their values do not change the cost)
        memory.memory_bias.copy_(torch.linspace(1.0, -1.0, memory.memory_bias.numel()))
        memory.memory_gate_weight.normal_(0, 0.01)
    ids = [str(i) for i in range(N_ITEMS)]
    return {
        "paper": ServingModel(paper.eval(), ids, "paper", device="cpu", top_k=20),
        "memory": ServingModel(memory.eval(), ids, "memory", device="cpu", top_k=20),
    }


def session_clicks(batch: int, rng: np.random.Generator, clicks: int = CLICKS) -> np.ndarray:
    """[clicks, batch] item rows; a third of the clicks repeat an earlier item of the session."""
    rows = rng.integers(0, N_ITEMS, (clicks, batch))
    for t in range(1, clicks):
        again = rng.random(batch) < 1 / 3
        rows[t, again] = rows[rng.integers(0, t), np.arange(batch)][again]
    return rows


def answers_digest(ms: dict[str, ServingModel]) -> dict[str, str]:
    """SHA-256 of each model's step answers over batch sizes on both sides of the whole-row
    limit and of a pass of 64 rows, short and full memories, a few unknown items (row -1)."""
    out = {}
    for name, m in ms.items():
        h = hashlib.sha256()
        for b in (1, 2, 3, 5, 8, 9, 16, 64, 65, 256):
            for n_clicks in (10, 80):
                rng = np.random.default_rng(b * 1000 + n_clicks)
                clicks = session_clicks(b, rng, n_clicks)
                clicks[rng.random(clicks.shape) < 0.05] = -1
                states = m.initial_states(None, b)
                for t in range(n_clicks):
                    step = m.step(clicks[t], states, None)
                    states = step.states
                    for a in (step.states, step.top_rows, step.top_scores):
                        h.update(np.ascontiguousarray(a).tobytes())
        out[name] = h.hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--clicks", type=int, default=CLICKS, help="clicks per session (K = 64)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--code", default="", help="what code ran (recorded with the results)")
    ap.add_argument("--digest", action="store_true", help="print the answers' digests only")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    ms = models()
    if a.digest:
        print(json.dumps(answers_digest(ms)))
        return
    rng = np.random.default_rng(0)
    result: dict[str, dict[str, float]] = {}
    for b in (int(x) for x in a.batches.split(",")):
        clicks = session_clicks(b, rng, a.clicks)
        times: dict[str, list[float]] = {name: [] for name in ms}
        cpu: dict[str, list[float]] = {name: [] for name in ms}
        for r in range(a.rounds + 1):
            for name, m in ms.items():
                states = m.initial_states(None, b)
                t0, c0 = time.perf_counter(), time.process_time()
                for t in range(a.clicks):
                    states = m.step(clicks[t], states, None).states
                if r > 0:  # the first round warms up
                    times[name].append((time.perf_counter() - t0) / a.clicks)
                    cpu[name].append((time.process_time() - c0) / a.clicks)
        med = {name: statistics.median(v) for name, v in times.items()}
        least = {name: min(v) for name, v in cpu.items()}
        result[str(b)] = {
            "paper_ms": round(med["paper"] * 1e3, 3),
            "memory_ms": round(med["memory"] * 1e3, 3),
            "memory_over_paper": round(med["memory"] / med["paper"], 3),
            "paper_cpu_best_ms": round(least["paper"] * 1e3, 3),
            "memory_cpu_best_ms": round(least["memory"] * 1e3, 3),
            "cpu_best_memory_over_paper": round(least["memory"] / least["paper"], 3),
        }
        print(b, result[str(b)], flush=True)
    rec = {"bench": "memory_step_speed", "code": a.code, "clicks": a.clicks, "results": result}
    append_run(a.out, rec, load0)


if __name__ == "__main__":
    main()
