"""A live hot swap of a large-catalogue model served with ``model.retrieval=ann``.

One worker (native engine) on a model registry serves version A (``--model``, its ANN index
beside it or built at the worker's start) through the embedded broker, clicks arrive at
``--rate``/s; then version B is published, a warm-started retrain of A on ``--retrain-events``
new clicks (``train_gru4rec(init=A)``: the same catalogue plus the new items), **without** an
index beside it, so the worker builds B's index in its loader thread while A keeps serving.
Recorded: every answer's emit time and version, the longest gap between two consecutive
answers before, during and after the swap beside the typical gap between batches, the time
from publish to the first answer of B, latency percentiles, and the clicks lost or answered
twice (a fresh read of both topics).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/catalogue_swap.py \
        --model runs/m1m --log DATA/test.tsv.gz --rate 300 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from procstats import machine_line

from streamrec.model.checkpoint import CheckpointRecord, read_checkpoint_record
from streamrec.model.gru4rec import GRU4Rec


def retrained(model_dir: Path, log: Path, events: int, out: Path) -> CheckpointRecord:
    """B: A warm-started on the first ``events`` clicks of ``log`` (one epoch)."""
    from streamrec.data.clicklog import load_clicks
    from streamrec.model.checkpoint import load_checkpoint, save_checkpoint
    from trainer.presets import make_params
    from trainer.train import train_gru4rec

    ck = load_checkpoint(model_dir)
    assert isinstance(ck.model, GRU4Rec), "a GRU4Rec checkpoint"
    df = load_clicks(log).head(events)
    # logq off: with it, a warm start on clicks that leave most of A's items unseen turned
    # every GRU weight into NaN (2026-12-07, 5,000 clicks over 1M items; the worker rejected B)
    params = make_params("rsc15_xe_shared_100_best", {"n_epochs": 1, "batch_size": 64, "logq": 0.0})
    model, ids, _ = train_gru4rec(df, params, progress=False, init=(ck.model, list(ck.item_ids)))
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise SystemExit(f"the retrained model B is not finite ({', '.join(bad)})")
    return save_checkpoint(out, model, "gru4rec", ids, data_stats={"parent": ck.version})


def gaps(emitted: list[float]) -> np.ndarray:
    t = np.sort(np.asarray(emitted))
    return np.diff(t) if len(t) > 1 else np.zeros(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="version A (a GRU4Rec checkpoint)")
    ap.add_argument("--log", type=Path, required=True, help="clicks to replay and retrain on")
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--before", type=float, default=30.0, help="seconds of A before publishing")
    ap.add_argument("--after", type=float, default=30.0, help="seconds after B answers")
    ap.add_argument("--retrain-events", type=int, default=5_000)
    ap.add_argument("--max-wait", type=float, default=1800.0, help="for B's first answer")
    ap.add_argument("--setting", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more worker settings (model.ann_index=head)")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()
    from streamrec.data.clicklog import load_clicks
    from streamrec.kafka.clients import TopicSpec, ensure_topics, read_topic
    from streamrec.kafka.embedded import EmbeddedBroker
    from streamrec.loop import registry
    from streamrec.tools.launch import WorkerProcess
    from streamrec.tools.replay import click_values, produce

    work = Path(tempfile.mkdtemp(prefix="bench-catalogue-swap-"))
    models = work / "models"
    a_dir = work / "a"
    shutil.copytree(args.model, a_dir)
    t0 = time.perf_counter()
    b_rec = retrained(a_dir, args.log, args.retrain_events, work / "b")
    retrain_s = time.perf_counter() - t0
    version_a = registry.add_version(models, read_checkpoint_record(a_dir))
    version_b = registry.add_version(models, b_rec)
    registry.publish(models, version_a)
    log = load_clicks(args.log)
    values = click_values(log)
    print(f"A={version_a} B={version_b} (retrain {retrain_s:.0f} s)", file=sys.stderr)
    with EmbeddedBroker(port=0) as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        topics = {"clicks": "sw-clicks", "recommendations": "sw-recs", "dead_letter": "sw-dead"}
        ensure_topics(conf, [TopicSpec(t, 4) for t in topics.values()])
        settings = {
            "kafka.bootstrap_servers": broker.bootstrap,
            **{f"topics.{k}": v for k, v in topics.items()},
            "topics.partitions": 4,
            "worker.app_id": "sw-app",
            "worker.metrics_port": 0,
            "model.reload_interval_s": 1,
            "model.retrieval": "ann",
            **dict(kv.split("=", 1) for kv in args.setting),
        }
        worker = WorkerProcess(models, settings=settings, data_dir=work / "state",
                               log_path=work / "worker.log", loglevel="INFO")  # fmt: skip
        stop = threading.Event()
        sent = [0]

        def load() -> None:
            step = max(1, int(args.rate / 10))
            i = 0
            while not stop.is_set() and i < len(values):
                produce(conf, topics["clicks"], values[i : i + step])
                i += step
                sent[0] = i
                time.sleep(0.1)

        events: dict[str, float] = {}
        try:
            produce(conf, topics["clicks"], [(b"w", b'{"session_id":"w","item_id":"x"}', 0.0)])
            deadline = time.monotonic() + args.max_wait
            while time.monotonic() < deadline and not read_topic(
                conf, topics["recommendations"], idle_timeout=0.5
            ):
                time.sleep(2)
            events["worker_answering"] = time.time()
            th = threading.Thread(target=load, daemon=True)
            th.start()
            time.sleep(args.before)
            registry.publish(models, version_b)
            events["published_b"] = time.time()
            while time.monotonic() < deadline:
                recs = read_topic(conf, topics["recommendations"], idle_timeout=0.5)
                if any(json.loads(m.value()).get("model_version") == version_b for m in recs):
                    break
                time.sleep(5)
            events["b_seen"] = time.time()
            time.sleep(args.after)
            stop.set()
            th.join(10)
            time.sleep(5)
        finally:
            worker.stop()
        clicks = read_topic(conf, topics["clicks"], idle_timeout=1.0)
        recs = [json.loads(m.value()) for m in read_topic(conf, topics["recommendations"])]
    result = summarise(clicks, recs, events, version_a, version_b)
    tail = (work / "worker.log").read_text()[-3000:]
    result.update(settings=args.setting, rate=args.rate, retrain_seconds=round(retrain_s, 1),
                  machine=machine_line(load0), worker_log_tail=tail)  # fmt: skip
    print(json.dumps(result, indent=None if args.json else 1))


def summarise(
    clicks: list[Any], recs: list[dict[str, Any]], events: dict[str, float], va: str, vb: str
) -> dict[str, Any]:
    per: dict[str, int] = {}
    for r in recs:
        per[r["click_id"]] = per.get(r["click_id"], 0) + 1
    ids = set()
    for m in clicks:
        body = json.loads(m.value())
        ids.add(body.get("event_id") or f"{m.topic()}:{m.partition()}:{m.offset()}")
    live = [r for r in recs if r["emitted_at"] >= events["worker_answering"]]
    pub, seen = events["published_b"], events["b_seen"]
    first_b = min((r["emitted_at"] for r in live if r["model_version"] == vb), default=None)
    windows = {
        "before": [r["emitted_at"] for r in live if r["emitted_at"] < pub],
        "building_b": [r["emitted_at"] for r in live if pub <= r["emitted_at"] < (first_b or seen)],
        "after": [r["emitted_at"] for r in live if r["emitted_at"] >= (first_b or seen)],
    }
    out: dict[str, Any] = {}
    for name, times in windows.items():
        g = gaps(times)
        out[name] = {
            "answers": len(times),
            "max_gap_ms": round(float(g.max()) * 1e3, 1) if len(g) else None,
            "p99_gap_ms": round(float(np.percentile(g, 99)) * 1e3, 1) if len(g) else None,
            "median_gap_ms": round(float(np.median(g)) * 1e3, 1) if len(g) else None,
        }
    lat = [r["emitted_at"] - r["produced_at"] for r in live if r.get("produced_at")]
    return {
        "clicks": len(ids),
        "answered": len(per.keys() & ids),
        "lost": len(ids - per.keys()),
        "duplicated": sum(1 for c in per.values() if c > 1),
        "versions": {v: sum(r["model_version"] == v for r in recs) for v in (va, vb)},
        "publish_to_first_b_s": None if first_b is None else round(first_b - pub, 1),
        "windows": out,
        "latency_ms_p50_p99": [round(float(np.percentile(lat, q)) * 1e3, 1) for q in (50, 99)]
        if lat
        else None,
    }


if __name__ == "__main__":
    main()
