"""`streamrec demo`: the whole live path on one machine, from nothing, in about a minute.

Embedded broker -> synthetic clicks -> a small GRU4Rec trained on CPU in seconds -> a worker
process -> held-out sessions streamed through it -> recommendations shown live -> a summary.
Everything it starts is stopped, and its temporary directory removed, on the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from .broker import EmbeddedBroker, stop_process
from .kafka import TopicSpec, ensure_topics
from .replay import click_values, latency_percentiles, live_metrics, produce, wait_for_answers

_WARMUP = json.dumps({"session_id": "warmup", "item_id": "0"}).encode()


@dataclass
class DemoOptions:
    sessions: int = 2000
    items: int = 300
    users: int | None = None
    held_out: float = 0.1
    epochs: int = 2
    units: int = 48
    rate: float = 400.0
    partitions: int = 4
    seed: int = 7
    show: int = 12
    keep_dir: Path | None = None


def _split(df: Any, held_out: float) -> tuple[Any, Any]:
    """Sessions by start time: the last ``held_out`` share is streamed, the rest trains."""
    start = df.groupby("SessionId")["Time"].min().sort_values(kind="stable")
    n_test = max(1, int(len(start) * held_out))
    test_ids = set(start.index[-n_test:])
    test = df[df["SessionId"].isin(test_ids)]
    return df[~df["SessionId"].isin(test_ids)], test


def _tail(
    conf: dict[str, Any], topic: str, stop: threading.Event, console: Console, show: int
) -> None:
    """Print a few recommendations as they arrive (display only: figures use fresh reads)."""
    from confluent_kafka import Consumer

    c = Consumer(
        {
            **conf,
            "group.id": f"demo-tail-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "log_level": 0,
        }
    )
    from confluent_kafka import TopicPartition

    from .kafka import partition_count

    # assign, not subscribe: a group join waits for the session timeout on some brokers
    c.assign([TopicPartition(topic, p, 0) for p in range(partition_count(conf, topic))])
    shown = 0
    last = 0.0
    try:
        while not stop.is_set():
            msg = c.poll(0.2)
            if msg is None or msg.error():
                continue
            now = time.time()
            r = json.loads(msg.value())
            if shown < show and now - last > 0.4 and r["session_id"] != "warmup":
                top = " ".join(r["items"][:5])
                lat = (now - r["produced_at"]) * 1e3 if r.get("produced_at") else float("nan")
                console.print(
                    f"  session [cyan]{r['session_id']:>6}[/] clicked [bold]{r['item_id']:>4}[/]"
                    f" -> next: [green]{top}[/] …  ({lat:.0f} ms)"
                )
                shown += 1
                last = now
    finally:
        c.close()


def run_demo(opts: DemoOptions | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary figures."""
    import torch

    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.synthetic import generate_clicks
    from trainer.train import train_gru4rec

    opts = opts or DemoOptions()
    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="streamrec-demo-"))
    worker: subprocess.Popen[bytes] | None = None
    log = None
    stop_tail = threading.Event()
    tail_thread: threading.Thread | None = None
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        with console.status("starting the embedded Kafka broker"):
            broker = EmbeddedBroker(port=0).start()
        try:
            conf = {"bootstrap.servers": broker.bootstrap}
            console.print(f"[bold]broker[/] ready at {broker.bootstrap}")
            df = generate_clicks(opts.sessions, opts.items, opts.users, seed=opts.seed)
            train, test = _split(df, opts.held_out)
            console.print(
                f"[bold]data[/] {len(df):,} synthetic clicks; training on {len(train):,}, "
                f"streaming {test['SessionId'].nunique():,} held-out sessions "
                f"({len(test):,} clicks)"
            )
            t0 = time.perf_counter()
            with console.status("training GRU4Rec on CPU"):
                model, item_ids, stats = train_gru4rec(
                    train,
                    {
                        "layers": [opts.units],
                        "n_epochs": opts.epochs,
                        "batch_size": 64,
                        "n_sample": 0,
                        "learning_rate": 0.1,
                        "device": "cpu",
                    },
                    progress=False,
                )
                ckpt = save_checkpoint(
                    work / "model", model, "gru4rec", item_ids, data_stats={"demo": True}
                )
            console.print(
                f"[bold]model[/] GRU4Rec {opts.units} units, {len(item_ids)} items, "
                f"trained in {time.perf_counter() - t0:.1f} s"
            )
            topics = {"clicks": "demo-clicks", "recs": "demo-recommendations"}
            ensure_topics(
                conf,
                [TopicSpec(t, opts.partitions) for t in (*topics.values(), "demo-dead-letter")],
            )
            env = {
                **os.environ,
                "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
                "STREAMREC_TOPICS__CLICKS": topics["clicks"],
                "STREAMREC_TOPICS__RECOMMENDATIONS": topics["recs"],
                "STREAMREC_TOPICS__DEAD_LETTER": "demo-dead-letter",
                "STREAMREC_TOPICS__PARTITIONS": str(opts.partitions),
                "STREAMREC_WORKER__APP_ID": "streamrec-demo",
                "STREAMREC_WORKER__METRICS_PORT": "0",
                "STREAMREC_MODEL__RELOAD_INTERVAL_S": "0",
            }
            log = open(work / "worker.log", "wb")  # noqa: SIM115 - closed below
            worker = subprocess.Popen(
                [
                    *(sys.executable, "-m", "streamrec", "worker", "--model", str(ckpt)),
                    *("--data-dir", str(work / "state"), "--loglevel", "WARNING"),
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
            with console.status("waiting for the worker to join and answer a first click"):
                warm = produce(conf, topics["clicks"], [(b"warmup", _WARMUP, 0.0)])
                if len(wait_for_answers(conf, topics["recs"], warm.click_ids, 120)) < 1:
                    raise RuntimeError(
                        "worker did not answer; its log:\n"
                        + (work / "worker.log").read_text()[-3000:]
                    )
            console.print(f"[bold]worker[/] ready (pid {worker.pid}); streaming clicks:")
            tail_thread = threading.Thread(
                target=_tail,
                args=(conf, topics["recs"], stop_tail, console, opts.show),
                daemon=True,
            )
            tail_thread.start()
            values = click_values(test)
            produced = produce(conf, topics["clicks"], values, rate=opts.rate)
            answers = wait_for_answers(conf, topics["recs"], produced.click_ids, timeout=180)
            stop_tail.set()
            recs = list(answers.values())
            if not recs:
                raise RuntimeError(
                    "no recommendations came back; worker log:\n"
                    + (work / "worker.log").read_text()[-3000:]
                )
            lat = latency_percentiles(
                r["emitted_at"] - produced.sent_at.get(r["click_id"], r["produced_at"])
                for r in recs
            )
            span = max(r["emitted_at"] for r in recs) - min(
                produced.sent_at.get(r["click_id"], r["produced_at"]) for r in recs
            )
            metrics = live_metrics(recs, k=20)
            summary = {
                "events": produced.n,
                "answered": len(recs),
                "throughput_eps": len(recs) / span if span > 0 else float("nan"),
                "offered_rate_eps": opts.rate,
                "latency_ms": {k: v * 1e3 for k, v in lat.items()},
                "recall@20": metrics.recall,
                "mrr@20": metrics.mrr,
                "train_seconds": stats.get("train_seconds"),
            }
            console.print()
            console.print("[bold]summary[/]")
            console.print(f"  events streamed      {produced.n:,} (answered {len(recs):,})")
            console.print(
                f"  throughput           {summary['throughput_eps']:,.0f} events/s "
                f"(offered {opts.rate:,.0f}/s)"
            )
            ms = summary["latency_ms"]
            console.print(
                f"  click->rec latency   p50 {ms['p50']:.1f} ms  p95 {ms['p95']:.1f} ms  "
                f"p99 {ms['p99']:.1f} ms"
            )
            console.print(f"  live accuracy        {metrics}")
            return summary
        finally:
            stop_tail.set()
            if tail_thread is not None:
                tail_thread.join(5)
            if worker is not None:
                stop_process(worker)
            broker.stop()
            if log is not None:
                log.close()
    finally:
        if opts.keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.move(str(work), opts.keep_dir)
