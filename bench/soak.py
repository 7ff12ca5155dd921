"""Soak (issue 13): one native worker at a fixed offered rate for many minutes while sessions
expire continuously; worker RSS and click-to-recommendation latency per window.

Embedded broker, the serve bench's GRU4Rec (17,319 items x 100 units). Each session sends
``--clicks`` clicks (one per ``--rate`` slot, sessions interleaved) and then goes quiet; with
``state.session_gap_seconds=--gap`` and a sweep every 5 s, sessions are ended by the sweep
all the time. Latency = time the bench's consumer received the recommendation - the click's
Kafka create time (same clock).

Per window it also reports what tells the worker, the broker and the bench's reader apart:
the worker's own click-to-emit latency (``emitted_at - produced_at`` in the records read),
the worker's and the broker's CPU and RSS from /proc, and the worker's /metrics (events,
recommendations, sweep steps). At the end the output topic is read again from offset 0 by a
fresh consumer (the tailing reader can skip records on the embedded broker) and the answers
are counted per window of their click time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py --minutes 10 --rate 200 \\
        [--window 60] [--out bench/results/soak.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Producer
from procstats import cpu_seconds, machine_line, rss_mb

from streamrec.kafka import tansu
from streamrec.kafka.clients import TopicSpec, ensure_topics, read_topic
from streamrec.kafka.embedded import EmbeddedBroker, free_port
from streamrec.tools.launch import WorkerProcess


def scrape(port: int) -> dict[str, float]:
    """The worker's /metrics as {name{labels}: value} (empty if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def hist_quantile(now: dict[str, float], before: dict[str, float], name: str, q: float) -> float:
    """Upper bucket bound holding quantile ``q`` of a histogram's observations in a window."""
    buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), v - before.get(k, 0.0))
        for k, v in now.items()
        if k.startswith(name + "_bucket{")
    )
    total = buckets[-1][1] if buckets else 0.0
    for le, n in buckets:
        if total and n >= q * total:
            return le
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
    ap.add_argument(
        "--tail-reader",
        action="store_true",
        help="also read the answers with a tailing consumer during the run (as the first "
        "version of this bench did: on the embedded broker its fetches add to the broker's "
        "cost, which grows with the log, see bench/results/soak.md)",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    ckpt = make_checkpoint(tmp / "ckpt")
    rows: list[str] = []
    fresh_rows: list[str] = []
    metrics_port = free_port()
    load_start = os.getloadavg()
    with EmbeddedBroker(port=0, log_path=tmp / "broker.log") as broker:
        assert broker.pid is not None
        broker_pid = broker.pid
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
            "worker.metrics_port": metrics_port,
            "worker.metrics_host": "127.0.0.1",
            "state.session_gap_seconds": args.gap,
            "state.sweep_interval_seconds": 5.0,
            "model.reload_interval_s": 0,
        }
        worker = WorkerProcess(
            ckpt, settings=settings, data_dir=tmp / "data", log_path=tmp / "worker.log"
        )
        # (received, latency as the reader sees it, the worker's own click-to-emit latency)
        lat: list[tuple[float, float, float]] = []
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
                        r = json.loads(m.value() or b"{}")
                        if r.get("produced_at"):
                            lat.append(
                                (now, now - r["produced_at"], r["emitted_at"] - r["produced_at"])
                            )
            c.close()

        reader = threading.Thread(target=consume, daemon=True)
        if args.tail_reader:
            reader.start()
        prod = Producer({**conf, "linger.ms": 1})

        def warm() -> bool:
            answered = scrape(metrics_port).get("streamrec_recommendations_total", 0.0) > 0
            return bool(lat) if args.tail_reader else answered

        # warm up: the worker up and answering (and the reader in its group)
        deadline = time.time() + 180
        while not warm() and time.time() < deadline:
            prod.produce(topics[0], b'{"session_id": "probe", "item_id": "1"}', b"probe")
            prod.flush(5)
            time.sleep(1.0)
        assert warm(), "the worker never answered"
        rng = np.random.default_rng(0)
        live: dict[str, int] = {}
        next_sid = 0
        t0 = time.time()
        end = t0 + args.minutes * 60
        sent = 0
        next_window = t0 + args.window
        w_start = t0
        cpu_w, cpu_b = cpu_seconds(worker.pid), cpu_seconds(broker_pid)
        m_before = scrape(metrics_port)
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
                win = [(x, y) for t, x, y in lat if w_start <= t < now]
                a = np.array([x for x, _ in win]) * 1e3 if win else np.array([np.nan])
                w = np.array([y for _, y in win]) * 1e3 if win else np.array([np.nan])
                c_w, c_b = cpu_seconds(worker.pid), cpu_seconds(broker_pid)
                lat_name = "streamrec_click_to_recommendation_seconds"
                m_now = scrape(metrics_port)

                def delta(
                    name: str, m_now: dict[str, float] = m_now, m_b: dict[str, float] = m_before
                ) -> float:
                    return m_now.get(name, np.nan) - m_b.get(name, 0.0)

                read = (
                    f"read {len(win):6,} p50 {np.nanpercentile(a, 50):7.1f} "
                    f"p99 {np.nanpercentile(a, 99):7.1f} ms | emit-lat of read p50 "
                    f"{np.nanpercentile(w, 50):6.1f} p99 {np.nanpercentile(w, 99):7.1f} ms | "
                    if args.tail_reader
                    else ""
                )
                sweep_p99 = hist_quantile(m_now, m_before, "streamrec_sweep_step_seconds", 0.99)
                row = (
                    f"{(now - t0) / 60:5.1f} min  sent {sent:7,}  {read}"
                    f"worker: recs {delta('streamrec_recommendations_total'):6.0f} "
                    f"lat p50<= {hist_quantile(m_now, m_before, lat_name, 0.5) * 1e3:4.0f} "
                    f"p99<= {hist_quantile(m_now, m_before, lat_name, 0.99) * 1e3:5.0f} ms "
                    f"sessions ended {delta('streamrec_sessions_ended_total'):5.0f} "
                    f"sweep steps {delta('streamrec_sweep_step_seconds_count'):4.0f} "
                    f"p99<= {sweep_p99 * 1e3:3.0f} ms "
                    f"CPU {100 * (c_w - cpu_w) / (now - w_start):3.0f}% "
                    f"RSS {rss_mb(worker.pid):4.0f} MB | broker: CPU "
                    f"{100 * (c_b - cpu_b) / (now - w_start):3.0f}% "
                    f"RSS {rss_mb(broker_pid):5.0f} MB | load {os.getloadavg()[0]:4.1f}"
                )
                print(row, flush=True)
                rows.append(row)
                cpu_w, cpu_b, m_before = c_w, c_b, m_now
                w_start, next_window = now, now + args.window
        prod.flush(30)
        time.sleep(3)
        stop.set()
        if args.tail_reader:
            reader.join(5)
        # the answers as written: a fresh read from offset 0, by the click's time, once the
        # worker has stopped (on the embedded broker the read competes with it for the broker)
        worker.stop()
        recs = [
            json.loads(m.value() or b"{}")
            for m in read_topic(conf, topics[1], idle_timeout=10.0, max_wait=300)
        ]
        answered = [r for r in recs if r.get("produced_at") and r.get("session_id") != "probe"]
        n_windows = int(np.ceil(args.minutes * 60 / args.window))
        for i in range(n_windows):
            lo, hi = t0 + i * args.window, t0 + (i + 1) * args.window
            win2 = [
                r["emitted_at"] - r["produced_at"] for r in answered if lo <= r["produced_at"] < hi
            ]
            e = np.array(win2) * 1e3 if win2 else np.array([np.nan])
            fresh_rows.append(
                f"clicks of {i * args.window / 60:4.1f}-{(i + 1) * args.window / 60:4.1f} min: "
                f"answered {len(win2):6,}  click-to-emit p50 {np.nanpercentile(e, 50):6.1f} ms  "
                f"p99 {np.nanpercentile(e, 99):7.1f} ms"
            )
        fresh_rows.append(f"total: sent {sent:,}, answered {len(answered):,} (fresh read)")
        print("\n".join(fresh_rows), flush=True)
        log_tail = (tmp / "worker.log").read_text()[-1500:]
    load_end = os.getloadavg()
    if args.out:
        args.out.write_text(
            "\n".join(
                [
                    "# Soak (issue 13)",
                    "",
                    f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py --minutes "
                    f"{args.minutes:g} --rate {args.rate:g} --clicks {args.clicks} --live "
                    f"{args.live} --gap {args.gap:g} --window {args.window:g}"
                    f"{' --tail-reader' if args.tail_reader else ''}`",
                    machine_line(load_start, load_end),
                    "",
                    "One native worker, embedded broker, GRU4Rec 17,319 items x 100 units; "
                    f"sessions of {args.clicks} clicks go quiet and are ended by the sweep "
                    f"(gap {args.gap:g} s, sweep every 5 s). Per window: "
                    + (
                        "what the bench's tailing reader received (latency = received - "
                        "click time), the worker's own click-to-emit latency of those records, "
                        if args.tail_reader
                        else ""
                    )
                    + "the worker's /metrics (recommendations, the latency histogram buckets "
                    "holding p50 and p99, sessions ended, sweep steps and their p99 bucket), "
                    "CPU and RSS of the worker and the broker:",
                    "",
                    "```",
                    *rows,
                    "```",
                    "",
                    "The output topic read again from offset 0 after the run, by click time:",
                    "",
                    "```",
                    *fresh_rows,
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
