"""Serving latency through Kafka while live sessions are re-encoded after a hot swap (issue 13).

One native worker on the embedded broker serves GRU4Rec v1 (17,319 items x 100 units) from a
registry it polls every second. First ``--sessions`` sessions of ``--clicks`` clicks each are
made live (produced in bulk, every click answered). Then clicks arrive at ``--rate``/s on
random live sessions; after ``--before`` seconds the registry pointer is switched to v2 (an
independently initialised model) and the load goes on for ``--after`` seconds. Each live
session's state is of v1, so the first click on it after the swap re-encodes it (its recent
items advanced through v2, no scoring, batched with the other keys of its batch) before the
click is scored.

Latency = the worker's ``emitted_at`` - the click's Kafka create time (both in the
recommendation record, read back from offset 0 after the run), per window of time since the
pointer switch; "re-encoded" counts the sessions whose first answer of v2 falls in the window.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reencode_serving.py [--sessions 10000] \\
        [--clicks 10] [--rate 200] [--out bench/results/reencode-serving.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from confluent_kafka import Producer
from procstats import machine_line

from streamrec.kafka.clients import TopicSpec, ensure_topics, read_topic
from streamrec.kafka.embedded import EmbeddedBroker, free_port
from streamrec.loop import registry
from streamrec.tools.launch import WorkerProcess

N_ITEMS = 17_319
WINDOWS = ((-1e9, 0.0), (0.0, 2.0), (2.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, 1e9))


def recommendations_total(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("streamrec_recommendations_total "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _fill(
    bulk: Producer, topic: str, live: list[str], clicks: int, rng: np.random.Generator
) -> int:
    """``clicks`` random clicks for every live session; returns how many were sent."""
    n = 0
    for _ in range(clicks):
        for sid in live:
            body = {"session_id": sid, "item_id": str(int(rng.integers(N_ITEMS)))}
            while True:
                try:
                    bulk.produce(topic, json.dumps(body).encode(), sid.encode())
                    break
                except BufferError:
                    bulk.poll(0.05)
            n += 1
    assert bulk.flush(120) == 0
    return n


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from retrain_loop import _model

    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--clicks", type=int, default=10, help="clicks per live session")
    ap.add_argument("--rate", type=float, default=200.0, help="clicks/s during the swap")
    ap.add_argument("--before", type=float, default=15.0, help="s of load before the swap")
    ap.add_argument("--after", type=float, default=45.0, help="s of load after the swap")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-reencode-serving-"))
    models = work / "models"
    versions = [registry.add_version(models, _model(work, N_ITEMS, seed)) for seed in (1, 2)]
    registry.publish(models, versions[0])
    rng = np.random.default_rng(0)
    port = free_port()
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    with EmbeddedBroker(port=0) as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        topics = {"clicks": "r-clicks", "recommendations": "r-recs", "dead_letter": "r-dead"}
        ensure_topics(conf, [TopicSpec(t, 4) for t in topics.values()])
        settings: dict[str, object] = {
            "kafka.bootstrap_servers": broker.bootstrap,
            **{f"topics.{k}": v for k, v in topics.items()},
            "topics.partitions": 4,
            "worker.app_id": "r-app",
            "worker.metrics_port": port,
            "worker.metrics_host": "127.0.0.1",
            "model.reload_interval_s": 1,
        }
        worker = WorkerProcess(
            models, settings=settings, data_dir=work / "state", log_path=work / "worker.log"
        )
        # bulk: big record batches (the embedded broker's fetch cost grows with their number)
        bulk = Producer({**conf, "linger.ms": 50, "batch.num.messages": 10_000})
        live = [f"s{j}" for j in range(args.sessions)]
        t_fill = time.time()
        n_fill = _fill(bulk, topics["clicks"], live, args.clicks, rng)
        deadline = time.time() + 900
        while recommendations_total(port) < n_fill and time.time() < deadline:
            time.sleep(1)
        done = recommendations_total(port)
        assert done >= n_fill, f"the worker answered {done:.0f} of {n_fill} fill clicks"
        say(
            f"live: {args.sessions:,} sessions of {args.clicks} clicks (v1) answered in "
            f"{time.time() - t_fill:.0f} s"
        )
        prod = Producer({**conf, "linger.ms": 1})
        stop = threading.Event()
        sent = [0]

        def load() -> None:
            t0 = time.time()
            while not stop.is_set():
                sid = live[int(rng.integers(len(live)))]
                body = {"session_id": sid, "item_id": str(int(rng.integers(N_ITEMS)))}
                prod.produce(topics["clicks"], json.dumps(body).encode(), sid.encode())
                prod.poll(0)
                sent[0] += 1
                pause = t0 + sent[0] / args.rate - time.time()
                if pause > 0:
                    time.sleep(pause)

        th = threading.Thread(target=load, daemon=True)
        t_load = time.time()
        th.start()
        time.sleep(args.before)
        registry.rollback(models, versions[1])  # an atomic pointer switch, as publish does
        t_swap = time.time()
        time.sleep(args.after)
        stop.set()
        th.join(10)
        prod.flush(30)
        want = n_fill + sent[0]
        deadline = time.time() + 120
        while recommendations_total(port) < want and time.time() < deadline:
            time.sleep(1)
        worker.stop()
        recs = [json.loads(m.value() or b"{}") for m in read_topic(conf, topics["recommendations"])]
    load_end = os.getloadavg()
    loaded = [r for r in recs if r.get("produced_at", 0) >= t_load]
    # exact: every click (fill and load) answered once, by click id (topic:partition:offset)
    answered = {r["click_id"] for r in recs if "click_id" in r}
    say(
        f"load: {sent[0]:,} clicks at {args.rate:g}/s on random live sessions, "
        f"{len(loaded):,} answers after the load's start; pointer switched to v2 "
        f"{t_swap - t_load:.0f} s in; all clicks: {want:,} sent, {len(answered):,} answered, "
        f"{len(recs) - len(answered):,} answered twice"
    )
    first_v2: dict[str, float] = {}
    for r in sorted(loaded, key=lambda r: r["emitted_at"]):
        if r["model_version"] == versions[1] and r["session_id"] not in first_v2:
            first_v2[r["session_id"]] = r["emitted_at"] - t_swap
    v2 = [r["emitted_at"] - t_swap for r in loaded if r["model_version"] == versions[1]]
    say(f"first answer of v2: {min(v2):.2f} s after the switch" if v2 else "v2 never answered")
    for lo, hi in WINDOWS:
        win = [r for r in loaded if lo <= r["emitted_at"] - t_swap < hi]
        lat = np.array([r["emitted_at"] - r["produced_at"] for r in win]) * 1e3
        n_v2 = sum(r["model_version"] == versions[1] for r in win)
        reenc = sum(lo <= t < hi for t in first_v2.values())
        label = (
            "before the switch"
            if lo < -1e8
            else (f"{lo:4.0f} s and later  " if hi > 1e8 else f"{lo:4.0f} - {hi:3.0f} s     ")
        )
        if len(lat):
            say(
                f"{label}: {len(win):6,} answers ({n_v2:6,} of v2), re-encoded {reenc:5,}; "
                f"latency p50 {np.percentile(lat, 50):6.1f} ms, p99 {np.percentile(lat, 99):7.1f}"
                f" ms, max {lat.max():7.1f} ms"
            )
    if args.out:
        args.out.write_text(
            "\n".join(
                [
                    "# Serving latency through Kafka while sessions re-encode after a swap "
                    "(issue 13)",
                    "",
                    f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/reencode_serving.py "
                    f"--sessions {args.sessions} --clicks {args.clicks} --rate {args.rate:g} "
                    f"--before {args.before:g} --after {args.after:g}`",
                    machine_line(load_start, load_end),
                    "",
                    "One native worker, embedded broker, GRU4Rec 17,319 items x 100 units, "
                    "registry polled every 1 s; windows by time since the pointer switch "
                    "(emitted_at):",
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
