"""Re-encoding after a model swap (issue 13): 10k live sessions and 10k HRNN users.

Models sized like the serve bench (17,319 items, 100 units; HRNN with a 100-unit user GRU).
Measures

* the old way (before issue 13: one click at a time through ``step``, scoring the whole
  catalogue for every item) on a few sessions/users, per session/user;
* the batched way (``ServingModel.encode_sessions`` / ``encode_users``: all states advanced
  position by position, no scoring) for all 10k;
* serving while it runs: ``process_batch`` latency of 256-click batches whose 256 keys all
  hold states of the old version (each batch re-encodes its keys first), against the same
  batches once the states are current.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reencode.py [--n 10000] \\
        [--out bench/results/reencode.md]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from procstats import machine_line

from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.model.hrnn import HRNN
from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state import SessionState
from streamrec.serving.state_store import StateStore

N_ITEMS = 17_319
LEN = 50


def old_encode_session(m: ServingModel, items: list[str], user: np.ndarray | None) -> np.ndarray:
    """Before issue 13: one click at a time through the full step (scores every item)."""
    users = None if user is None else user.reshape(1, -1)
    state = m.initial_states(users, 1)
    for r in m.rows(items):
        state = m.step(np.array([r]), state, users, k=1).states
    return state[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(N_ITEMS)]
    gru = ServingModel(GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[100]), seed=1), ids, "v2")
    hrnn_net = HRNN(N_ITEMS, layers=[100], user_layers=[100])
    hrnn = ServingModel(hrnn_net, ids, "v2")
    sessions = [[str(x) for x in rng.integers(N_ITEMS, size=LEN)] for _ in range(args.n)]
    users = [
        [[str(x) for x in rng.integers(N_ITEMS, size=LEN)] for _ in range(10)]
        for _ in range(args.n)
    ]
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    t = time.perf_counter()
    for s in sessions[:5]:
        old_encode_session(gru, s, None)
    old_s = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    for u in users[:2]:
        ctx = hrnn.initial_user_states(1)
        for s in u:
            final = old_encode_session(hrnn, s, ctx[0]).reshape(1, -1)
            ctx = hrnn.end_session(ctx, final)
    old_u = (time.perf_counter() - t) / 2
    say(
        f"old (per click, full scoring): GRU4Rec session of {LEN}: {old_s * 1e3:.0f} ms; "
        f"HRNN user of 10 x {LEN}: {old_u * 1e3:.0f} ms -> {args.n:,} of each: "
        f"{args.n * (old_s + old_u):,.0f} s"
    )
    t = time.perf_counter()
    gru.encode_sessions(sessions, None)
    new_s = time.perf_counter() - t
    t = time.perf_counter()
    hrnn.encode_users(users)
    new_u = time.perf_counter() - t
    say(
        f"batched, no scoring: {args.n:,} GRU4Rec sessions of {LEN} in {new_s:.1f} s "
        f"({new_s / args.n * 1e3:.2f} ms each, {old_s * args.n / new_s:,.0f}x); "
        f"{args.n:,} HRNN users of 10 x {LEN} in {new_u:.1f} s "
        f"({new_u / args.n * 1e3:.2f} ms each, {old_u * args.n / new_u:,.0f}x)"
    )
    # serving while it runs: batches whose keys all need re-encoding, then the same again
    store = StateStore()
    h = np.zeros(100, np.float32)
    for j, s in enumerate(sessions):
        st = SessionState(f"s{j}", h, "v1", None, s, 0, j, 1.7e9, 1.7e9, LEN)
        store.put_session(f"a:s{j}", st)
    cfg = CoreConfig(top_k=20)
    lat: dict[str, list[float]] = {"re-encoding": [], "current": []}
    for phase in lat:
        for lo in range(0, args.n, 256):
            recs = [
                Record(
                    json.dumps(
                        {"session_id": f"s{j}", "item_id": "7", "timestamp": 1.7e9 + 10}
                    ).encode(),
                    f"s{j}".encode(),
                    "c",
                    0,
                    args.n + j + (0 if phase == "re-encoding" else args.n),
                )
                for j in range(lo, min(lo + 256, args.n))
            ]
            t = time.perf_counter()
            res = process_batch(recs, store, gru, cfg)
            lat[phase].append(time.perf_counter() - t)
            if phase == "re-encoding":
                assert res.stats["sessions_migrated"] == len(recs)
    for phase, xs in lat.items():
        a = np.array(xs) * 1e3
        say(
            f"process_batch of 256 clicks, states {phase}: p50 {np.percentile(a, 50):.0f} ms, "
            f"p99 {np.percentile(a, 99):.0f} ms ({len(a)} batches)"
        )
    if args.out:
        args.out.write_text(
            "\n".join(
                [
                    "# Re-encoding after a swap (issue 13)",
                    "",
                    f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/reencode.py --n {args.n}`",
                    machine_line(),
                    "",
                    "```",
                    *lines,
                    "```",
                    "",
                ]
            )
        )


if __name__ == "__main__":
    main()
