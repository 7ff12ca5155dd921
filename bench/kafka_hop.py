"""Produce -> consume latency of one Kafka hop through the embedded Tansu broker.

What it measures: N messages (~150-byte JSON, the send time stamped in the value) are
produced at a fixed rate by confluent-kafka Producer(s) to a topic of P partitions; a
Consumer *assigned* (not subscribed) to every partition from offset 0 reads them in a
thread and stamps each message when the client call (``poll`` or ``consume``) hands it
over. Reported: p50/p95/p99/max of receive - send in ms, and how many arrived.

Every producer and consumer setting is a command-line option, so one run is one
configuration; ``--sweep GROUP`` runs a predefined list of configurations on one broker
(a fresh topic each) and prints a markdown table.

Run (repository root):

    .venv/bin/python bench/kafka_hop.py                       # defaults: linger 0, poll()
    .venv/bin/python bench/kafka_hop.py --mode consume --consume-num 1000 --timeout 0.05
    .venv/bin/python bench/kafka_hop.py --linger-ms 1 --acks all --fetch-wait-ms 2
    .venv/bin/python bench/kafka_hop.py --producers 2 --active-partitions 1
    .venv/bin/python bench/kafka_hop.py --sweep consumer     # or: producer, topology, all
    .venv/bin/python bench/kafka_hop.py --bootstrap HOST:PORT  # any broker instead of Tansu
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer, Producer, TopicPartition

from streamrec.kafka.clients import TopicSpec, ensure_topics

PAD = "x" * 90  # brings the JSON value to ~150 bytes


def parse_kv(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_HOP_BOOTSTRAP"))
    ap.add_argument("--messages", "-n", type=int, default=2500)
    ap.add_argument("--rate", type=float, default=500.0, help="total messages/s")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument(
        "--active-partitions", type=int, default=0, help="write only partitions < this (0: all)"
    )
    ap.add_argument(
        "--producers", type=int, default=1, help="producers writing the topic concurrently"
    )
    # producer
    ap.add_argument("--linger-ms", type=float, default=0.0)
    ap.add_argument("--acks", default="1")
    ap.add_argument("--nagle-disable", default="false", choices=["true", "false"])
    ap.add_argument(
        "--burst", type=int, default=1, help="produce this many at once, then flush() (worker-like)"
    )
    ap.add_argument("--pconf", nargs="*", default=[], help="extra producer settings k=v")
    # consumer
    ap.add_argument("--fetch-wait-ms", type=int, default=2)
    ap.add_argument("--fetch-min-bytes", type=int, default=1)
    ap.add_argument("--fetch-queue-backoff-ms", type=int, default=None, help="default: unset")
    ap.add_argument("--fetch-error-backoff-ms", type=int, default=None, help="default: unset")
    ap.add_argument("--queued-min-messages", type=int, default=None, help="default: unset")
    ap.add_argument("--cnagle-disable", default="false", choices=["true", "false"])
    ap.add_argument("--cconf", nargs="*", default=[], help="extra consumer settings k=v")
    ap.add_argument("--mode", choices=["poll", "consume"], default="poll")
    ap.add_argument("--consume-num", type=int, default=1000, help="num_messages for consume()")
    ap.add_argument("--timeout", type=float, default=0.1, help="poll/consume timeout (s)")
    ap.add_argument("--sweep", default=None, help="run a predefined group of configurations")
    return ap


@dataclass
class Result:
    label: str
    sent: int
    received: int
    lat_ms: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        if not self.lat_ms:
            return float("nan")
        s = sorted(self.lat_ms)
        return s[min(len(s) - 1, int(q * len(s)))]

    def row(self) -> str:
        return (
            f"| {self.label} | {self.pct(0.5):.1f} | {self.pct(0.95):.1f} | "
            f"{self.pct(0.99):.1f} | {max(self.lat_ms, default=float('nan')):.1f} | "
            f"{self.received}/{self.sent} |"
        )


def producer_conf(a: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    return {
        **base,
        "linger.ms": a.linger_ms,
        "acks": a.acks,
        "socket.nagle.disable": a.nagle_disable == "true",
        "enable.idempotence": False,
        "log_level": 3,
        **parse_kv(a.pconf),
    }


def consumer_conf(a: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    conf: dict[str, Any] = {
        **base,
        "group.id": f"kafka-hop-{time.time_ns()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": a.fetch_wait_ms,
        "fetch.min.bytes": a.fetch_min_bytes,
        "socket.nagle.disable": a.cnagle_disable == "true",
        "log_level": 3,
    }
    if a.fetch_queue_backoff_ms is not None:
        conf["fetch.queue.backoff.ms"] = a.fetch_queue_backoff_ms
    if a.fetch_error_backoff_ms is not None:
        conf["fetch.error.backoff.ms"] = a.fetch_error_backoff_ms
    if a.queued_min_messages is not None:
        conf["queued.min.messages"] = a.queued_min_messages
    conf.update(parse_kv(a.cconf))
    return conf


def _warm_up(producers: list[Producer], topic: str, active: int, ready: threading.Event) -> None:
    """One marker per active partition from each producer, until the consumer sees one."""
    deadline = time.monotonic() + 20
    while not ready.is_set() and time.monotonic() < deadline:
        for p in producers:
            for part in range(active):
                p.produce(topic, json.dumps({"i": -1, "t": time.time()}), partition=part)
            p.flush(5)
        ready.wait(0.5)
    time.sleep(0.3)


def _send_paced(a: argparse.Namespace, producers: list[Producer], topic: str, active: int) -> None:
    """``a.messages`` messages in bursts of ``a.burst`` at ``a.rate`` per second."""
    interval = a.burst / a.rate
    start = time.perf_counter()
    for b, first in enumerate(range(0, a.messages, a.burst)):
        target = start + b * interval
        while (d := target - time.perf_counter()) > 0:
            time.sleep(d)
        p = producers[b % len(producers)]
        for i in range(first, min(first + a.burst, a.messages)):
            value = json.dumps({"i": i, "t": time.time(), "kind": "rec", "pad": PAD})
            p.produce(topic, value, key=str(i), partition=i % active)
        if a.burst > 1:
            p.flush(10)
        else:
            p.poll(0)
    for p in producers:
        p.flush(10)


def run_once(a: argparse.Namespace, bootstrap: str, label: str) -> Result:
    base = {"bootstrap.servers": bootstrap}
    topic = f"hop-{time.time_ns()}"
    ensure_topics(base, [TopicSpec(topic, a.partitions)])
    active = a.active_partitions or a.partitions

    consumer = Consumer(consumer_conf(a, base))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(a.partitions)])
    recv: dict[int, float] = {}  # message id -> receive - send (s)
    ready = threading.Event()
    stop = threading.Event()

    def handle(m: Any, now: float) -> None:
        if m.error() is not None:
            return
        v = json.loads(m.value())
        if v["i"] < 0:
            ready.set()
        else:
            recv.setdefault(v["i"], now - v["t"])

    def consume_loop() -> None:
        while not stop.is_set():
            if a.mode == "poll":
                m = consumer.poll(a.timeout)
                if m is not None:
                    handle(m, time.time())
            else:
                batch = consumer.consume(num_messages=a.consume_num, timeout=a.timeout)
                now = time.time()
                for m in batch:
                    handle(m, now)

    thread = threading.Thread(target=consume_loop, daemon=True)
    thread.start()

    producers = [Producer(producer_conf(a, base)) for _ in range(a.producers)]
    _warm_up(producers, topic, active, ready)
    _send_paced(a, producers, topic, active)
    deadline = time.monotonic() + 5
    while len(recv) < a.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(5)
    consumer.close()
    return Result(label, a.messages, len(recv), [v * 1000 for v in recv.values()])


# configurations for --sweep: (group, extra arguments)
SWEEPS: dict[str, list[str]] = {
    "consumer": [
        "--mode consume --consume-num 1000 --timeout 0.05",  # serve_bench's collector
        "--mode consume --consume-num 1000 --timeout 0.01",
        "--mode consume --consume-num 1 --timeout 0.05",
        "--mode poll --timeout 0.05",
        "--mode poll --timeout 0.1 --fetch-wait-ms 1",
        "--mode poll --timeout 0.1 --fetch-wait-ms 2",
        "--mode poll --timeout 0.1 --fetch-wait-ms 5",
        "--mode poll --timeout 0.1 --fetch-wait-ms 10",
        "--mode poll --timeout 0.1 --fetch-wait-ms 50",
        "--mode poll --fetch-queue-backoff-ms 0",
        "--mode poll --fetch-error-backoff-ms 0",
        "--mode poll --queued-min-messages 1",
        "--mode poll --cnagle-disable true",
    ],
    "producer": [
        "--linger-ms 0 --acks 1",
        "--linger-ms 1 --acks 1",
        "--linger-ms 5 --acks 1",
        "--linger-ms 0 --acks all",
        "--linger-ms 1 --acks all",  # the worker's producer
        "--linger-ms 5 --acks all",
        "--linger-ms 0 --acks 1 --nagle-disable true",
        "--linger-ms 1 --acks all --nagle-disable true",
    ],
    "backoff": [
        "--queued-min-messages 1",
        "--queued-min-messages 1 --fetch-queue-backoff-ms 0",
        "--queued-min-messages 10",
        "--fetch-queue-backoff-ms 0 --fetch-error-backoff-ms 0 --fetch-wait-ms 1",
    ],
    "topology": [
        "--producers 1",
        "--burst 6 --linger-ms 1 --acks all",  # the worker: a batch of outputs, then flush()
        "--burst 6 --linger-ms 0 --acks all",
        "--producers 2",
        "--producers 2 --linger-ms 1 --acks all",
        "--active-partitions 1",
        "--active-partitions 1 --fetch-wait-ms 10",
        "--active-partitions 1 --producers 2",
        "--mode consume --consume-num 1000 --timeout 0.05 --linger-ms 1 --acks all"
        " --active-partitions 1 --producers 2",
    ],
}
SWEEPS["all"] = [x for group in list(SWEEPS.values()) for x in group]


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    broker = None
    bootstrap = a.bootstrap
    if not bootstrap:
        from streamrec.kafka.embedded import EmbeddedBroker

        broker = EmbeddedBroker(port=0).start()
        bootstrap = broker.bootstrap
    try:
        print(f"# load average {os.getloadavg()[0]:.2f}, broker {bootstrap}", flush=True)
        print("| settings | p50 ms | p95 ms | p99 ms | max ms | received |")
        print("|---|---:|---:|---:|---:|---:|", flush=True)
        if a.sweep:
            base_argv = [x for x in (argv or sys.argv[1:])]
            i = base_argv.index("--sweep")
            del base_argv[i : i + 2]
            for extra in SWEEPS[a.sweep]:
                sub = ap.parse_args(base_argv + shlex.split(extra))
                print(run_once(sub, bootstrap, extra).row(), flush=True)
        else:
            label = " ".join(argv or sys.argv[1:]) or "(defaults)"
            print(run_once(a, bootstrap, label).row(), flush=True)
        print(f"# load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
