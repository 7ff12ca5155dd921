"""The embedded broker's cost of a *tailing* consumer as the log grows (issue 13's soak stall).

``tansu_fetch_cost.py`` measures an idle consumer at the end of the log. Here records keep
arriving, as in the soak: a producer writes ``--rate`` records/s (linger 0: about one record
batch per record, as the soak's clicks at 150/s were) and one consumer tails the topic with
``fetch.wait.max.ms=10`` (the worker's setting). Between measurements the log is grown by
``--step`` small batches written as fast as possible. Per log size: the broker's CPU (from
/proc) and the tailing consumer's delivery latency (receive time - record create time).

Tansu 0.6 stores each record batch as one object of an in-memory object store, and every fetch
that has data to return lists every batch object of the partition first
(``DynoStore::fetch`` in tansu-storage/src/dynostore.rs), so a non-empty fetch costs in
proportion to the batches ever written to the partition (no retention, DeleteRecords is
unimplemented).

    OMP_NUM_THREADS=1 .venv/bin/python bench/tansu_tail_cost.py [--rate 100] [--step 20000] \\
        [--sizes 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition
from procstats import cpu_seconds

from streamrec.kafka.clients import TopicSpec, ensure_topics
from streamrec.kafka.embedded import EmbeddedBroker

TOPIC, PARTITIONS = "tail-cost", 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="records/s while measuring")
    ap.add_argument("--step", type=int, default=20_000, help="batches added between sizes")
    ap.add_argument("--sizes", type=int, default=4, help="log sizes measured")
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring window")
    a = ap.parse_args()
    print(f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    with EmbeddedBroker(port=0) as broker:
        assert broker.pid is not None
        pid = broker.pid
        conf = {"bootstrap.servers": broker.bootstrap}
        ensure_topics(conf, [TopicSpec(TOPIC, PARTITIONS)])
        stop = threading.Event()
        lat: list[tuple[float, float]] = []  # (received, latency)

        def tail() -> None:
            c = Consumer(
                {**conf, "group.id": "tail-cost", "fetch.wait.max.ms": 10,
                 "enable.auto.commit": False, "log_level": 0}
            )  # fmt: skip
            c.assign([TopicPartition(TOPIC, p, 0) for p in range(PARTITIONS)])
            while not stop.is_set():
                for m in c.consume(500, 0.05):
                    if m.error() is None:
                        now = time.time()
                        lat.append((now, now - m.timestamp()[1] / 1e3))
            c.close()

        thread = threading.Thread(target=tail, daemon=True)
        thread.start()
        producer = Producer({**conf, "linger.ms": 0, "log_level": 0})
        batches = 0
        try:
            for k in range(a.sizes):
                if k:
                    for _ in range(a.step // PARTITIONS):  # one small batch per partition
                        for p in range(PARTITIONS):
                            producer.produce(TOPIC, b"x" * 60, partition=p)
                        producer.flush()
                    batches += a.step
                    # measure once the consumer has caught up (it reads the new batches first)
                    t_catch = time.time()
                    while len(lat) < batches and time.time() < t_catch + 120:
                        time.sleep(0.2)
                    print(
                        f"  (the consumer read the {a.step:,} new batches in "
                        f"{time.time() - t_catch:.1f} s; {len(lat):,} of {batches:,} read)",
                        flush=True,
                    )
                c0, t0 = cpu_seconds(pid), time.time()
                sent = 0
                while time.time() < t0 + a.seconds:
                    producer.produce(TOPIC, b"y" * 60, partition=sent % PARTITIONS)
                    producer.poll(0)
                    sent += 1
                    pause = t0 + sent / a.rate - time.time()
                    if pause > 0:
                        time.sleep(pause)
                producer.flush()
                t1 = time.time()
                share = (cpu_seconds(pid) - c0) / (t1 - t0)
                win = np.array([x for t, x in lat if t0 <= t < t1]) * 1e3
                batches += sent
                p50, p99 = (np.percentile(win, q) if len(win) else float("nan") for q in (50, 99))
                print(
                    f"{batches:>7,} batches in the log: broker CPU {100 * share:4.0f}% of a core "
                    f"with {a.rate:g} records/s tailed; delivery p50 {p50:6.1f} ms, "
                    f"p99 {p99:7.1f} ms ({len(win)} received); load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        finally:
            stop.set()
            thread.join(5)


if __name__ == "__main__":
    main()
