"""Continuous-retraining benchmarks (issue 11), each printing one JSON line.

cycle    one `trainer retrain` cycle, phase by phase (read the archive, train, evaluate,
         publish), on yoochoose-1_64/train written as an archive (its ordinal Time mapped to
         evenly spaced seconds over 14 days, since the archive partitions by event hour);
         a first cycle publishes, the measured second cycle warm-starts from it.
archive  archive throughput (records/s) beside a worker on the same embedded broker:
         a log produced to the clicks topic, a worker answering it and the archiver
         (`--until-caught-up`) reading it at the same time.
swaps    10 swaps under a steady load: a worker on a registry, clicks at --rate/s, the
         pointer switched between two versions every few seconds; per swap the time from
         the pointer switch to the first recommendation carrying the new version, p99
         latency within 2 s after each switch, and lost / duplicated clicks by a fresh read.

  .venv/bin/python bench/retrain_loop.py cycle --data DATA/yoochoose-1_64/train.tsv.gz
  .venv/bin/python bench/retrain_loop.py archive --data DATA/rsc15-100k/train_full.tsv.gz
  .venv/bin/python bench/retrain_loop.py swaps --rate 300 --swaps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from streamrec.model.checkpoint import CheckpointRecord

MACHINE = "2-vCPU dev VM, no GPU"


def _header(kind: str) -> dict[str, Any]:
    return {
        "bench": kind,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": MACHINE,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": os.getloadavg(),  # the host is shared
    }


def _write_archive(directory: Path, df: Any) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trainer"))
    from test_retrain import write_archive  # the archiver's layout, without a broker

    write_archive(directory, df)


def bench_cycle(args: argparse.Namespace) -> dict[str, Any]:
    from streamrec.data.clicklog import load_clicks
    from trainer.retrain import RetrainConfig, run_cycle

    df = load_clicks(args.data)
    order = np.argsort(df["Time"].to_numpy(), kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    df["Time"] = 1_767_225_600.0 + np.arange(len(df)) * (14 * 86400.0 / len(df))
    work = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    t = time.perf_counter()
    _write_archive(work / "archive", df)
    write_s = time.perf_counter() - t
    params = [f"n_epochs={args.epochs}", "device=cpu"]
    cfg = RetrainConfig(
        str(work / "archive"), str(work / "models"), "14d", "1d", params=params,
        preset=args.preset, progress=False,
    )  # fmt: skip
    header = _header("cycle")
    first = run_cycle(cfg, echo=lambda s: print(s, file=sys.stderr))
    second = run_cycle(cfg, echo=lambda s: print(s, file=sys.stderr))
    keys = ("seconds", "events", "decision", "metrics", "train_stats")
    return {
        **header,
        "loadavg_at_end": os.getloadavg(),
        "events": len(df),
        "archive_write_seconds": write_s,
        "preset": args.preset,
        "params": params,
        "first_cycle": {k: first[k] for k in keys},
        "second_cycle_warm": {
            k: second[k] for k in (*keys, "warm_start", "warm_epochs", "optimizer_continued")
        },
    }


def _model(work: Path, n_items: int, seed: int) -> CheckpointRecord:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    model = GRU4Rec(GRU4RecConfig(n_items=n_items, layers=[100]), seed=seed)
    return save_checkpoint(work / f"ckpt{seed}", model, "gru4rec", [str(i) for i in range(n_items)])


def _service(broker: str, work: Path, tag: str) -> dict[str, Any]:
    from streamrec.kafka.clients import TopicSpec, ensure_topics

    s = {
        "kafka.bootstrap_servers": broker,
        "topics.clicks": f"{tag}-clicks",
        "topics.recommendations": f"{tag}-recs",
        "topics.dead_letter": f"{tag}-dead",
        "topics.partitions": 4,
        "worker.app_id": f"{tag}-app",
        "worker.metrics_port": 0,
        "model.reload_interval_s": 1,
    }
    ensure_topics(
        {"bootstrap.servers": broker},
        [TopicSpec(str(s[f"topics.{t}"]), 4) for t in ("clicks", "recommendations", "dead_letter")],
    )
    return s


def bench_archive(args: argparse.Namespace) -> dict[str, Any]:
    from streamrec.data.clicklog import load_clicks
    from streamrec.kafka.embedded import EmbeddedBroker
    from streamrec.loop.archiver import Archiver
    from streamrec.tools.launch import WorkerProcess
    from streamrec.tools.replay import click_values, produce

    df = load_clicks(args.data).sort_values("Time", kind="stable")
    items = sorted(set(df["ItemId"]))
    work = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    with EmbeddedBroker(port=0) as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        s = _service(broker.bootstrap, work, "a")
        from streamrec.loop import registry
        from streamrec.model.checkpoint import save_checkpoint
        from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

        ck = save_checkpoint(
            work / "ckpt", GRU4Rec(GRU4RecConfig(n_items=len(items), layers=[100]), seed=1),
            "gru4rec", items,
        ).path  # fmt: skip
        del registry
        worker = WorkerProcess(
            ck, settings=s, data_dir=work / "state", log_path=work / "worker.log"
        )
        try:
            out = produce(conf, s["topics.clicks"], click_values(df))
            arch = Archiver(conf, s["topics.clicks"], str(work / "archive"), group="a-archiver")
            st = arch.run(until_caught_up=True, idle_s=2.0)
        finally:
            worker.stop()
    busy = st.seconds - 2.0  # the idle wait that ends a catch-up
    return {
        **_header("archive"),
        "data": args.data,
        "produced": out.n,
        "archived": st.archived,
        "files": st.files,
        "seconds_excluding_idle_wait": busy,
        "records_per_s": st.records / busy,
        "note": "archiver and worker (same broker) consumed the same log at the same time",
    }


def bench_swaps(args: argparse.Namespace) -> dict[str, Any]:
    from streamrec.kafka.clients import read_topic
    from streamrec.kafka.embedded import EmbeddedBroker
    from streamrec.loop import registry
    from streamrec.tools.launch import WorkerProcess
    from streamrec.tools.replay import produce

    n_items = args.items
    work = Path(tempfile.mkdtemp(prefix="bench-swaps-"))
    models = work / "models"
    versions = [registry.add_version(models, _model(work, n_items, seed)) for seed in (1, 2)]
    registry.publish(models, versions[0])
    rng = np.random.default_rng(0)
    with EmbeddedBroker(port=0) as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        s = _service(broker.bootstrap, work, "s")
        worker = WorkerProcess(
            models, settings=s, data_dir=work / "state", log_path=work / "worker.log"
        )
        stop = threading.Event()
        sent = [0]

        def load() -> None:
            j = 0
            while not stop.is_set():
                vals = []
                for _ in range(max(1, int(args.rate / 10))):
                    sess = f"s{rng.integers(2000)}"
                    v = {"session_id": sess, "item_id": str(rng.integers(n_items)),
                         "event_id": f"e{j}"}  # fmt: skip
                    vals.append((sess.encode(), json.dumps(v).encode(), 0.0))
                    j += 1
                produce(conf, s["topics.clicks"], vals)
                sent[0] += len(vals)
                time.sleep(0.1)

        try:
            # warm-up: the worker joins and answers
            produce(conf, s["topics.clicks"], [(b"w", b'{"session_id":"w","item_id":"1"}', 0.0)])
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not read_topic(
                conf, s["topics.recommendations"], idle_timeout=0.5
            ):
                time.sleep(1)
            th = threading.Thread(target=load, daemon=True)
            th.start()
            time.sleep(5)
            switches = []
            for k in range(args.swaps):
                v = versions[(k + 1) % 2]
                registry.rollback(models, v)  # an atomic pointer switch, as publish does
                switches.append((time.time(), v))
                time.sleep(args.interval)
            time.sleep(3)
            stop.set()
            th.join(10)
            time.sleep(3)
        finally:
            worker.stop()
        clicks = read_topic(conf, s["topics.clicks"], idle_timeout=1.0)
        recs = [json.loads(m.value()) for m in read_topic(conf, s["topics.recommendations"])]
    per: dict[str, int] = {}
    for r in recs:
        per[r["click_id"]] = per.get(r["click_id"], 0) + 1
    # a click's id is its event_id when it has one (the load's clicks), else topic:partition:offset
    ids = {
        json.loads(m.value()).get("event_id") or f"{m.topic()}:{m.partition()}:{m.offset()}"
        for m in clicks
    }
    lost = len(ids - per.keys())
    dup = sum(1 for c in per.values() if c > 1)
    emitted = sorted(recs, key=lambda r: r["emitted_at"])
    swaps = []
    for t, v in switches:
        first = next((r for r in emitted if r["emitted_at"] >= t and r["model_version"] == v), None)
        lat = [
            r["emitted_at"] - r["produced_at"]
            for r in emitted
            if t <= r["emitted_at"] <= t + 2 and r.get("produced_at")
        ]
        swaps.append(
            {
                "to": v[:24],
                "publish_to_first_rec_s": None if first is None else first["emitted_at"] - t,
                "p99_latency_ms_2s_after": float(np.percentile(lat, 99) * 1e3) if lat else None,
            }
        )
    all_lat = [r["emitted_at"] - r["produced_at"] for r in recs if r.get("produced_at")]
    return {
        **_header("swaps"),
        "rate_per_s": args.rate,
        "n_items": n_items,
        "interval_s": args.interval,
        "clicks": len(ids),
        "answered": len(per.keys() & ids),
        "lost": lost,
        "duplicated": dup,
        "swaps": swaps,
        "p99_latency_ms_whole_run": float(np.percentile(all_lat, 99) * 1e3),
        "p50_latency_ms_whole_run": float(np.percentile(all_lat, 50) * 1e3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cycle")
    c.add_argument("--data", required=True)
    c.add_argument("--epochs", type=int, default=1)
    c.add_argument("--preset", default=None)
    a = sub.add_parser("archive")
    a.add_argument("--data", required=True)
    s = sub.add_parser("swaps")
    s.add_argument("--rate", type=float, default=300)
    s.add_argument("--swaps", type=int, default=10)
    s.add_argument("--interval", type=float, default=6.0)
    s.add_argument("--items", type=int, default=17319)
    args = ap.parse_args()
    fn = {"cycle": bench_cycle, "archive": bench_archive, "swaps": bench_swaps}[args.what]
    print(json.dumps(fn(args), default=str))


if __name__ == "__main__":
    main()
