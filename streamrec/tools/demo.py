"""`streamrec demo`: the whole live path on one machine, from nothing, in about a minute.

Embedded broker -> synthetic clicks -> a small GRU4Rec trained on CPU in seconds -> a worker
process -> held-out sessions streamed through it -> recommendations shown live -> a summary.
Everything it starts is stopped, and its temporary directory removed, on the way out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from streamrec.data.synthetic import generate_clicks
from streamrec.kafka.clients import TopicSpec, ensure_topics, tail
from streamrec.kafka.embedded import EmbeddedBroker
from streamrec.processes import ChildFailed, ChildProcess, run_child
from streamrec.serving.records import Recommendation
from streamrec.tools.launch import WorkerProcess
from streamrec.tools.replay import (
    click_values,
    latency_percentiles,
    live_metrics,
    produce,
    wait_for_answers,
)

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
    shown = 0
    last = 0.0
    for msg in tail(conf, topic, from_beginning=True, stopped=stop.is_set):
        now = time.time()
        r = Recommendation.from_json(msg.value())
        if shown < show and now - last > 0.4 and r.session_id != "warmup":
            top = " ".join(r.items[:5])
            lat = (now - r.produced_at) * 1e3 if r.produced_at else float("nan")
            console.print(
                f"  session [cyan]{r.session_id:>6}[/] clicked [bold]{r.item_id:>4}[/]"
                f" -> next: [green]{top}[/] …  ({lat:.0f} ms)"
            )
            shown += 1
            last = now


def _train(train: Any, work: Path, opts: DemoOptions) -> tuple[Path, float]:
    """Train the demo's GRU4Rec with the trainer's own command, in a child process: the
    serving package never imports training code (the worker image has none)."""
    train_path = work / "train.tsv"
    train.to_csv(train_path, sep="\t", index=False)
    params = {
        "layers": opts.units,
        "n_epochs": opts.epochs,
        "batch_size": 64,
        "n_sample": 0,
        "learning_rate": 0.1,
        "device": "cpu",
    }
    out = work / "model"
    cmd = [sys.executable, "-m", "trainer", "train", "--train", str(train_path)]
    cmd += ["--out", str(out), "--no-progress"]
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    threads = str(max(1, min(2, os.cpu_count() or 1)))
    what = "trainer train"
    try:
        run_child(cmd, what=what, log=work / "trainer.log", env={"OMP_NUM_THREADS": threads})
    except ChildFailed as exc:
        if "No module named trainer" not in str(exc):
            raise
        hint = "the demo trains with the trainer package, which is not installed"
        raise ChildFailed(f"{what} failed ({hint})") from None
    metrics = json.loads((out / "metrics.json").read_text())
    return out, float(metrics.get("train_seconds") or 0.0)


def run_demo(opts: DemoOptions | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary figures."""
    opts = opts or DemoOptions()
    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="streamrec-demo-"))
    worker: WorkerProcess | None = None
    stop_tail = threading.Event()
    tail_thread: threading.Thread | None = None
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
            with console.status("training GRU4Rec on CPU (trainer train)"):
                ckpt, train_seconds = _train(train, work, opts)
            n_items = len(json.loads((ckpt / "checkpoint.json").read_text())["item_ids"])
            console.print(
                f"[bold]model[/] GRU4Rec {opts.units} units, {n_items} items, "
                f"trained in {time.perf_counter() - t0:.1f} s"
            )
            topics = {"clicks": "demo-clicks", "recs": "demo-recommendations"}
            ensure_topics(
                conf,
                [TopicSpec(t, opts.partitions) for t in (*topics.values(), "demo-dead-letter")],
            )
            worker = WorkerProcess(
                ckpt,
                settings={
                    "kafka.bootstrap_servers": broker.bootstrap,
                    "topics.clicks": topics["clicks"],
                    "topics.recommendations": topics["recs"],
                    "topics.dead_letter": "demo-dead-letter",
                    "topics.partitions": opts.partitions,
                    "worker.app_id": "streamrec-demo",
                    "worker.metrics_port": 0,
                    "model.reload_interval_s": 0,
                },
                data_dir=work / "state",
                log_path=work / "worker.log",
            )
            with console.status("waiting for the worker to join and answer a first click"):
                warm = produce(conf, topics["clicks"], [(b"warmup", _WARMUP, 0.0)])
                if len(wait_for_answers(conf, topics["recs"], warm.click_ids, 120)) < 1:
                    raise RuntimeError(f"worker did not answer; its log:\n{worker.log_tail()}")
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
                raise RuntimeError(f"no recommendations came back; log:\n{worker.log_tail()}")
            sent_or_none = [produced.sent_at.get(r.click_id, r.produced_at) for r in recs]
            sent = [math.nan if t is None else t for t in sent_or_none]
            lat = latency_percentiles(r.emitted_at - t for r, t in zip(recs, sent, strict=True))
            span = max(r.emitted_at for r in recs) - min(sent)
            metrics = live_metrics(recs, k=20)
            summary: dict[str, Any] = {
                "events": produced.n,
                "answered": len(recs),
                "throughput_eps": len(recs) / span if span > 0 else float("nan"),
                "offered_rate_eps": opts.rate,
                "latency_ms": {k: v * 1e3 for k, v in lat.items()},
                "recall@20": metrics.recall,
                "mrr@20": metrics.mrr,
                "train_seconds": train_seconds,
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
                worker.stop()
            broker.stop()
    finally:
        if opts.keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.move(str(work), opts.keep_dir)


# ----------------------------------------------------------------------------- demo --retrain


def _archived_rows(directory: Path) -> int:
    import pyarrow.parquet as pq

    from streamrec.loop.archive import Storage, list_archive

    storage = Storage(str(directory))
    return sum(pq.read_metadata(storage.join(f.path)).num_rows for f in list_archive(storage))


def _retrain_once(work: Path, opts: DemoOptions, env: Mapping[str, str]) -> dict[str, Any]:
    """``trainer retrain --once`` in a child process (the serving package imports no trainer)."""
    from streamrec.loop import registry

    cmd = [sys.executable, "-m", "trainer", "retrain", "--archive", str(work / "archive")]
    cmd += ["--models", str(work / "models"), "--once", "--window", "60d", "--holdout", "1d"]
    cmd += ["--no-progress", "--param", f"layers={opts.units}", f"n_epochs={opts.epochs}"]
    cmd += ["batch_size=64", "n_sample=0", "learning_rate=0.1", "device=cpu"]
    run_child(cmd, what="trainer retrain --once", log=work / "retrain.log", env=env)
    return registry.read_cycles(work / "models")[-1]


def run_retrain_demo(
    opts: DemoOptions | None = None, console: Console | None = None
) -> dict[str, Any]:
    """The continuous-retraining loop on the embedded broker: clicks stream, the archiver
    fills the archive, ``trainer retrain --once`` publishes v1, the worker (waiting on the
    registry) serves it; clicks with items new to the catalogue follow, a second retrain
    publishes v2, the worker swaps, and the new items appear in the recommendations."""
    from rich.markup import escape

    from streamrec.loop import registry
    from streamrec.tools.launch import settings_env

    opts = opts or DemoOptions()
    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="streamrec-demo-retrain-"))
    archiver: ChildProcess | None = None
    worker: WorkerProcess | None = None
    try:
        with console.status("starting the embedded Kafka broker"):
            broker = EmbeddedBroker(port=0).start()
        try:
            conf = {"bootstrap.servers": broker.bootstrap}
            settings = {
                "kafka.bootstrap_servers": broker.bootstrap,
                "topics.clicks": "demo-clicks",
                "topics.recommendations": "demo-recommendations",
                "topics.dead_letter": "demo-dead-letter",
                "topics.partitions": opts.partitions,
                "worker.app_id": "streamrec-demo",
                "worker.metrics_port": 0,
                "worker.log_level": "WARNING",
            }
            env = {**settings_env(settings), "OMP_NUM_THREADS": "1"}
            ensure_topics(
                conf,
                [TopicSpec(t, opts.partitions) for t in ("demo-clicks", "demo-recommendations",
                                                          "demo-dead-letter")],
            )  # fmt: skip
            archive_cmd = ["-m", "streamrec", "archive", "--dir", str(work / "archive")]
            archiver = ChildProcess(
                [sys.executable, *archive_cmd, "--flush-interval", "1"],
                env=env,
                log=work / "archiver.log",
            )
            worker = WorkerProcess(
                work / "models",
                settings=settings,
                data_dir=work / "state",
                log_path=work / "worker.log",
                args=["--wait-for-model", "600"],
            )
            console.print(f"[bold]broker[/] {broker.bootstrap}; archiver and worker started")
            # phase A: the catalogue's first 90 %; phase B adds the last 10 % as new items
            # event times end about now: the worker's per-partition clock reads the stream's
            # time, and the probes below continue the log's time
            start = time.time() - 26 * 86400.0
            a = generate_clicks(
                opts.sessions, opts.items, seed=opts.seed, start_time=start, span_days=20
            )
            new_from = int(opts.items * 0.9)
            a = a[a["ItemId"].astype(int) < new_from]
            b = generate_clicks(
                opts.sessions // 2, opts.items, seed=opts.seed + 1,
                start_time=float(a["Time"].max()) + 60, span_days=5,
            )  # fmt: skip
            b["SessionId"] = "b" + b["SessionId"].astype(str)
            sent = 0
            for phase, df in (("A", a), ("B", b)):
                with console.status(f"streaming {len(df):,} clicks (phase {phase})"):
                    produce(conf, "demo-clicks", click_values(df))
                    sent += len(df)
                with console.status("waiting for the archive to hold every click"):
                    deadline = time.monotonic() + 120
                    while _archived_rows(work / "archive") < sent:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the archiver fell behind; see archiver.log")
                        time.sleep(0.5)
                console.print(f"[bold]archive[/] {sent:,} clicks in {work / 'archive'}")
                with console.status("trainer retrain --once"):
                    rec = _retrain_once(work, opts, env)
                line = (
                    f"{rec['events']['train']:,} train events, {rec['new_items']} new items; "
                    + registry.cycle_summary(rec)
                )
                console.print(f"[bold]retrain[/] {escape(line)}", highlight=False)
            version = rec["decision"]["version"]
            if version is None:
                # the gate kept v1: the worker goes on serving it, nothing to swap to
                console.print("[bold]gate[/] kept the published model; the worker keeps it")
                return {"version": None, "reason": rec["decision"]["reason"]}
            published_at = (work / "models" / "CURRENT").stat().st_mtime  # the pointer moved
            new_items = sorted(set(b["ItemId"]) - set(a["ItemId"]))
            # probe until the worker answers with the new version, then show new items
            first_new: float | None = None
            with console.status("waiting for the worker to swap"):
                for j in range(600):
                    probe = {
                        "session_id": f"probe{j}",
                        "item_id": new_items[j % len(new_items)],
                        "timestamp": float(b["Time"].max()) + 60.0 + j,
                    }
                    p = produce(
                        conf,
                        "demo-clicks",
                        [(f"probe{j}".encode(), json.dumps(probe).encode(), 0.0)],
                    )
                    got = wait_for_answers(conf, "demo-recommendations", p.click_ids, 30)
                    r = next(iter(got.values()), None)
                    if r is not None and r.model_version == version:
                        first_new = r.emitted_at - published_at
                        shown = [i for i in r.items if i in set(new_items)]
                        console.print(
                            f"[bold]swap[/] worker serves {version} "
                            f"({first_new:.1f} s after publish); after clicking new item "
                            f"{r.item_id}: next [green]{' '.join(r.items[:8])}[/] "
                            f"({len(shown)} new items in the top {len(r.items)})"
                        )
                        break
                    time.sleep(0.2)
            if first_new is None:
                raise RuntimeError(f"the worker never served {version}:\n{worker.log_tail()}")
            return {
                "version": version,
                "swap_seconds": first_new,
                "new_items": len(new_items),
                "new_items_shown": len(shown),
            }
        finally:
            if worker is not None:
                worker.stop()
            if archiver is not None:
                archiver.stop()
            broker.stop()
    finally:
        if opts.keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.move(str(work), opts.keep_dir)
