"""Soak (issue 13): one native worker at a fixed offered rate for many minutes while sessions
expire continuously; worker RSS and click-to-recommendation latency per window.

Embedded broker, the serve bench's GRU4Rec (17,319 items x 100 units). Each session sends
``--clicks`` clicks (one per ``--rate`` slot, sessions interleaved) and then goes quiet; with
``state.session_gap_seconds=--gap`` and a sweep every 5 s, sessions are ended by the sweep
all the time. Latency = time the bench's consumer received the recommendation - the click's
Kafka create time (same clock).

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py --minutes 10 --rate 200 \\
        [--window 60] [--out bench/results/soak.md]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Producer

from streamrec import tansu
from streamrec.broker import EmbeddedBroker
from streamrec.kafka import TopicSpec, ensure_topics
from streamrec.launch import WorkerProcess


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_bench import N_ITEMS, make_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--clicks", type=int, default=5, help="clicks per session")
    ap.add_argument("--live", type=int, default=200, help="sessions open at once")
    ap.add_argument("--gap", type=float, default=20.0, help="session gap (s)")
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    ckpt = make_checkpoint(tmp / "ckpt")
    rows: list[str] = []
    with EmbeddedBroker() as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        topics = ("soak-clicks", "soak-recs", "soak-dead")
        ensure_topics(conf, [TopicSpec(t, 4) for t in topics])
        settings: dict[str, object] = {
            "kafka.bootstrap_servers": broker.bootstrap,
            "topics.clicks": topics[0],
            "topics.recommendations": topics[1],
            "topics.dead_letter": topics[2],
            "topics.partitions": 4,
            "worker.app_id": "soak",
            "worker.metrics_port": 0,
            "state.session_gap_seconds": args.gap,
            "state.sweep_interval_seconds": 5.0,
            "model.reload_interval_s": 0,
        }
        worker = WorkerProcess(
            ckpt, settings=settings, data_dir=tmp / "data", log_path=tmp / "worker.log"
        )
        lat: list[tuple[float, float]] = []  # (received, latency)
        stop = threading.Event()

        def consume() -> None:
            c = Consumer(
                {
                    **conf,
                    "group.id": "soak-reader",
                    "auto.offset.reset": "earliest",
                    **tansu.GROUP_TIMEOUTS,
                }
            )
            c.subscribe([topics[1]])
            while not stop.is_set():
                for m in c.consume(500, 0.2):
                    if m.error() is None:
                        now = time.time()
                        value = m.value()
                        assert value is not None  # every recommendation record has a value
                        r = json.loads(value)
                        if r.get("produced_at"):
                            lat.append((now, now - r["produced_at"]))
            c.close()

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        prod = Producer({**conf, "linger.ms": 1})
        # warm up: the worker up and answering, the reader in its group
        deadline = time.time() + 180
        while not lat and time.time() < deadline:
            prod.produce(topics[0], b'{"session_id": "probe", "item_id": "1"}', b"probe")
            prod.flush(5)
            time.sleep(1.0)
        assert lat, "the worker never answered"
        rng = np.random.default_rng(0)
        live: dict[str, int] = {}
        next_sid = 0
        t0 = time.time()
        end = t0 + args.minutes * 60
        sent = 0
        next_window = t0 + args.window
        w_start = t0
        while time.time() < end:
            while len(live) < args.live:
                live[f"s{next_sid}"] = 0
                next_sid += 1
            sid = list(live)[int(rng.integers(len(live)))]
            body = {"session_id": sid, "item_id": str(int(rng.integers(N_ITEMS)))}
            prod.produce(topics[0], json.dumps(body).encode(), sid.encode())
            prod.poll(0)
            live[sid] += 1
            if live[sid] >= args.clicks:
                del live[sid]
            sent += 1
            due = t0 + sent / args.rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            if time.time() >= next_window:
                now = time.time()
                win = [x for t, x in lat if w_start <= t < now]
                a = np.array(win) * 1e3 if win else np.array([np.nan])
                row = (
                    f"{(now - t0) / 60:5.1f} min  sent {sent:7,}  answered {len(win):6,}  "
                    f"p50 {np.nanpercentile(a, 50):6.1f} ms  p99 {np.nanpercentile(a, 99):7.1f} ms"
                    f"  worker RSS {rss_mb(worker.pid):6.0f} MB  sessions started {next_sid:,}"
                )
                print(row, flush=True)
                rows.append(row)
                w_start, next_window = now, now + args.window
        prod.flush(30)
        time.sleep(3)
        stop.set()
        reader.join(5)
        worker.stop()
        log_tail = (tmp / "worker.log").read_text()[-1500:]
    if args.out:
        args.out.write_text(
            "\n".join(
                [
                    "# Soak (issue 13)",
                    "",
                    f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py --minutes "
                    f"{args.minutes:g} --rate {args.rate:g} --clicks {args.clicks} --live "
                    f"{args.live} --gap {args.gap:g} --window {args.window:g}`",
                    "Machine: 2-vCPU dev VM, no GPU, torch 2.13.0+cpu (shared with other work). "
                    f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                    "",
                    "One native worker, embedded broker, GRU4Rec 17,319 items x 100 units; "
                    f"sessions of {args.clicks} clicks go quiet and are ended by the sweep "
                    f"(gap {args.gap:g} s, sweep every 5 s). Per window:",
                    "",
                    "```",
                    *rows,
                    "```",
                    "",
                    "Worker log tail:",
                    "",
                    "```",
                    log_tail,
                    "```",
                    "",
                ]
            )
        )


if __name__ == "__main__":
    main()
