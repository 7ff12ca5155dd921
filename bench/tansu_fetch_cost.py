"""How much CPU the embedded Tansu broker spends serving one idle consumer, as the log grows.

One consumer sits at the end of a 4-partition topic and polls (fetch.wait.max.ms as given), as
the worker and the serving benchmark's consumer do between clicks. The broker's CPU time is
read from /proc over a few seconds: on an empty topic, then after N small record batches are
written. On Apache Kafka an idle fetch costs next to nothing whatever the log size.

    python bench/tansu_fetch_cost.py [--fetch-wait-ms 2] [--batches 4000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from procstats import cpu_seconds

from streamrec.kafka.clients import TopicSpec, ensure_topics
from streamrec.kafka.embedded import EmbeddedBroker

TOPIC, PARTITIONS = "fetch-cost", 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fetch-wait-ms", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4000, help="batches of 5 records per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring window")
    a = ap.parse_args()

    broker = EmbeddedBroker(port=0).start()
    pid = broker.pid  # the broker's own process: its CPU time is what is measured
    assert pid is not None  # set by start()
    conf = {"bootstrap.servers": broker.bootstrap}
    ensure_topics(conf, [TopicSpec(TOPIC, PARTITIONS)])
    stop = threading.Event()

    def idle_consumer() -> None:
        c = Consumer(
            {**conf, "group.id": "fetch-cost", "fetch.wait.max.ms": a.fetch_wait_ms,
             "enable.auto.commit": False, "log_level": 0}
        )  # fmt: skip
        c.assign([TopicPartition(TOPIC, p, 0) for p in range(PARTITIONS)])
        while not stop.is_set():
            c.poll(0.05)
        c.close()

    def measure(records: int) -> None:
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(a.seconds)
        share = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        print(
            f"{records:>7} records in the log: broker CPU {100 * share:5.0f}% of a core", flush=True
        )

    thread = threading.Thread(target=idle_consumer, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # the consumer has connected and reached the end
        measure(0)
        producer = Producer({**conf, "linger.ms": 0, "log_level": 0})
        written = 0
        for _ in range(a.rounds):
            for i in range(a.batches):
                for j in range(5):
                    producer.produce(TOPIC, b"x" * 60, partition=(i + j) % PARTITIONS)
                producer.flush()  # one small batch per partition written, as at low rates
            written += 5 * a.batches
            time.sleep(1.0)  # the consumer has read up to the end again
            measure(written)
    finally:
        stop.set()
        thread.join(5)
        broker.stop()


if __name__ == "__main__":
    main()
