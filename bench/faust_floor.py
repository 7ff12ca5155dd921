"""Where the time goes: how fast Faust alone delivers events to a batching agent.

Pre-fills a topic with N clicks, then runs a StreamrecApp (same consumer settings as the
worker, 10 ms fetch wait) whose agent only counts ``take_events`` batches; prints events/s.
This is the ceiling of any Faust-based worker on this machine, before any work is done.

    .venv/bin/python bench/faust_floor.py [--events 20000] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from streamrec.kafka.clients import TopicSpec, ensure_topics
from streamrec.kafka.embedded import EmbeddedBroker
from streamrec.tools.replay import produce


def child(bootstrap: str, topic: str, n: int, batch: int, datadir: str) -> None:
    import faust

    from streamrec.engines.faust.app import StreamrecApp

    app = StreamrecApp(
        f"floor-{topic}",
        broker=f"kafka://{bootstrap}",
        store="rocksdb://",
        datadir=datadir,
        processing_guarantee="at_least_once",
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        recovery_consistency_check=False,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        stream_buffer_maxsize=4096,
        broker_max_poll_records=500,
    )
    src = app.topic(topic, key_type=bytes, value_type=bytes, value_serializer="raw", partitions=4)
    seen = {"n": 0, "t0": 0.0}

    @app.agent(src)
    async def count(stream: faust.StreamT) -> None:
        # faust's StreamT lacks take_events, which the Stream an agent is given has
        async for events in stream.take_events(batch, within=0.005):  # type: ignore[attr-defined]
            if not seen["n"]:
                seen["t0"] = time.perf_counter()
            seen["n"] += len(events)
            if seen["n"] >= n:
                dt = time.perf_counter() - seen["t0"]
                print(json.dumps({"events": seen["n"], "seconds": dt, "events_per_s": n / dt}))
                sys.stdout.flush()
                os._exit(0)

    sys.argv = [*sys.argv[:1], "worker", "-l", "warn"]
    app.main()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        bootstrap, topic, datadir, n = a.child
        child(bootstrap, topic, int(n), a.batch, datadir)
        return
    with EmbeddedBroker(port=0) as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        ensure_topics(conf, [TopicSpec("floor", 4)])
        v = json.dumps({"session_id": "s1", "item_id": "1"}).encode()
        produce(conf, "floor", [(str(i % 997).encode(), v, 0.0) for i in range(a.events)])
        with tempfile.TemporaryDirectory() as d:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--batch",
                    str(a.batch),
                    "--child",
                    broker.bootstrap,
                    "floor",
                    d,
                    str(a.events),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
        print(out.stdout.strip()[-500:], out.stderr[-1500:])


if __name__ == "__main__":
    main()
