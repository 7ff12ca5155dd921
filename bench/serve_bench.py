"""Serving benchmark: end-to-end events/s and click-to-recommendation latency of one worker.

All in one run, against the embedded broker (or --bootstrap):
  (e2e)     click produced -> recommendation consumed, one worker, GRU4Rec sized like the
            yoochoose-1_64 model (17,319 items, 100 units), clicks produced as fast as possible;
  (nostep)  the same worker with the model step removed (``worker --no-model-step``);
  (step)    the model step alone (ServingModel.step incl. top-k and host copies) at the
            worker's batch size;
  (500/s)   latency at a fixed offered load of 500 events/s.

Latency = time the bench's consumer received the recommendation - the click's Kafka
timestamp (producer create time, same clock). Throughput = answered clicks / (last
recommendation received - first click sent).

    .venv/bin/python bench/serve_bench.py [--events 20000] [--data PATH] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import Consumer, TopicPartition

from streamrec.kafka.clients import TopicSpec, ensure_topics, read_topic
from streamrec.kafka.embedded import EmbeddedBroker
from streamrec.serving.served_model import ServingModel
from streamrec.tools.launch import WorkerProcess
from streamrec.tools.replay import click_values, latency_percentiles, produce

#: ``streamrec worker`` serving the model with its step removed (the "nostep" reference)
NOSTEP_WORKER = Path(__file__).with_name("nostep.py")

N_ITEMS = 17_319
UNITS = 100
PARTITIONS = 4


def make_checkpoint(path: Path) -> Path:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[UNITS]), seed=0)
    return save_checkpoint(path, model, "gru4rec", [str(i) for i in range(N_ITEMS)]).path


def _interleave(df: Any, concurrent: int, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    groups = [g.index.to_numpy() for _, g in df.groupby("SessionId", sort=False)]
    pending = iter(groups)
    open_: list[list[int]] = []
    for g in pending:
        open_.append(list(g))
        if len(open_) == concurrent:
            break
    order: list[int] = []
    while open_:
        j = int(rng.integers(len(open_)))
        order.append(open_[j].pop(0))
        if not open_[j]:
            nxt = next(pending, None)
            if nxt is None:
                open_.pop(j)
            else:
                open_[j] = list(nxt)
    out = df.loc[order].reset_index(drop=True)
    out["Time"] = np.arange(len(out), dtype=float)
    return out


def load_values(data: Path | None, n: int) -> list[tuple[bytes, bytes, float]]:
    """Clicks of real sessions (yoochoose-1_64 test) if given, else a synthetic stream."""
    import pandas as pd

    if data is not None and data.exists():
        from streamrec.data.clicklog import load_clicks

        df = load_clicks(data)
        # The 1_64 split's Time is an ordinal in session order (no interleaving). A live stream
        # interleaves many concurrent sessions: keep 1,000 sessions open, emit the next click
        # of a random open one, open the next session when one ends (order within a session
        # is kept).
        df = _interleave(df, concurrent=1000).head(n)
    else:
        rng = np.random.default_rng(0)
        sess = np.repeat(np.arange(n // 5 + 1), 5)[:n]
        rng.shuffle(sess)
        df = pd.DataFrame(
            {
                "SessionId": sess.astype(str),
                "ItemId": rng.integers(0, N_ITEMS, n).astype(str),
                "Time": np.arange(n, dtype=float),
            }
        )
    return click_values(df)


class Collector:
    """Tails the recommendations topic (assigned, not subscribed) and stamps arrival times."""

    def __init__(self, conf: dict[str, Any], topic: str, fetch_wait_ms: int) -> None:
        # Tansu holds an empty fetch for the whole wait even when data arrives, and its cost per
        # fetch grows with the log (results/tansu-fetch-cost.md): a shorter wait shortens the
        # hop but loads the broker, which shares the 2 cores with the worker.
        self.c = Consumer(
            {
                **conf,
                "group.id": f"bench-{time.time_ns()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": fetch_wait_ms,
                "log_level": 0,
            }
        )
        self.c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self.arrivals: dict[str, tuple[float, float]] = {}  # click id -> (recv, produced_at)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            # poll returns on the first message; consume(n, timeout) would wait out its whole
            # timeout unless n arrive, which added ~25 ms to every latency measured before
            # (bench/results/kafka-hop.md). Then take what else is queued, without waiting.
            first = self.c.poll(0.05)
            if first is None:
                continue
            for m in [first, *self.c.consume(num_messages=1000, timeout=0)]:
                if m.error():
                    continue
                now = time.time()
                value = m.value()
                assert value is not None  # every recommendation record has a value
                r = json.loads(value)
                self.arrivals.setdefault(r["click_id"], (now, r["produced_at"] or now))

    def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < n and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        self.t.join(5)
        self.c.close()


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return out
    for line in text.decode().splitlines():
        if line.startswith("streamrec_") and " " in line and "{" not in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def run_worker_phase(
    bootstrap: str,
    ckpt: Path,
    values: list[tuple[bytes, bytes, float]],
    *,
    tag: str,
    max_events: int,
    tmp: Path,
    rate: float | None = None,
    no_step: bool = False,
    max_wait_ms: float = 5.0,
    fetch_wait_ms: int = 10,
    engine: str = "native",
    score_dtype: str = "float32",
    extra_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from streamrec.kafka.embedded import free_port

    conf = {"bootstrap.servers": bootstrap}
    clicks, recs, dead = f"{tag}-clicks", f"{tag}-recs", f"{tag}-dead"
    ensure_topics(conf, [TopicSpec(t, PARTITIONS) for t in (clicks, recs, dead)])
    mport = free_port()
    settings = {
        "kafka.bootstrap_servers": bootstrap,
        "topics.clicks": clicks,
        "topics.recommendations": recs,
        "topics.dead_letter": dead,
        "topics.partitions": PARTITIONS,
        "worker.app_id": f"{tag}-app",
        "worker.metrics_port": mport,
        "batching.max_events": max_events,
        "batching.max_wait_ms": max_wait_ms,
        "model.reload_interval_s": 0,
        "model.device": "auto",
        "model.score_dtype": score_dtype,
        **(extra_settings or {}),
    }
    profile = os.environ.get("SERVE_BENCH_PROFILE")  # cProfile of the worker's main thread
    proc = WorkerProcess(
        ckpt,
        settings=settings,
        data_dir=tmp / tag,
        log_path=tmp / f"{tag}.log",
        args=["--fetch-wait-ms", str(fetch_wait_ms), "--engine", engine],
        python_args=["-m", "cProfile", "-o", f"{profile}.{tag}"] if profile else [],
        entry=[str(Path(__file__).with_name("nostep.py"))]
        if no_step
        else ("-m", "streamrec", "worker"),
    )
    col = Collector(conf, recs, fetch_wait_ms)
    try:
        # warm up: the worker must have joined the group and answered before timing starts
        warm = [(b"w", json.dumps({"session_id": "w", "item_id": "1"}).encode(), 0.0)]
        produce(conf, clicks, warm * 20)
        col.wait(20, 120)
        if len(col.arrivals) < 20:
            raise RuntimeError(f"worker not answering: {(tmp / f'{tag}.log').read_text()[-2000:]}")
        base = set(col.arrivals)
        before = scrape(mport)
        t0 = time.time()
        out = produce(conf, clicks, values, rate=rate)
        col.wait(len(base) + len(values), 300)
        arr = {k: v for k, v in col.arrivals.items() if k not in base}
        after = scrape(mport)
        if arr:
            t_end = max(v[0] for v in arr.values())
            t_first = min(out.sent_at.values()) if out.sent_at else t0
        else:
            t_end = t_first = t0
        lat = latency_percentiles(recv - sent for recv, sent in arr.values())
        # the tailing consumer may miss records on Tansu: count answers with a fresh read
        fresh = [json.loads(m.value()) for m in read_topic(conf, recs, idle_timeout=1.0)]
        answered = {r["click_id"] for r in fresh} & out.click_ids
        mine = [r for r in fresh if r["click_id"] in out.click_ids and r["produced_at"]]
        # where a click's latency goes (medians, ms): to the worker's batch, inside the
        # worker, and from the worker to the bench's consumer
        stages = {
            "click_to_worker_batch": [r["received_at"] - r["produced_at"] for r in mine],
            "in_worker": [r["emitted_at"] - r["received_at"] for r in mine],
            "worker_to_consumer": [
                arr[r["click_id"]][0] - r["emitted_at"] for r in mine if r["click_id"] in arr
            ],
        }
        breakdown = {k: float(np.median(v)) * 1e3 if v else None for k, v in stages.items()}
        # and where the slowest 1% of clicks lose their time (medians over those clicks)
        total = {
            r["click_id"]: arr[r["click_id"]][0] - r["produced_at"]
            for r in mine
            if r["click_id"] in arr
        }
        slow_ids = set()
        if total:
            cut = float(np.percentile(list(total.values()), 99))
            slow_ids = {c for c, t in total.items() if t >= cut}
        slow = [r for r in mine if r["click_id"] in slow_ids]
        slow_parts = {
            "click_to_worker_batch": [r["received_at"] - r["produced_at"] for r in slow],
            "in_worker": [r["emitted_at"] - r["received_at"] for r in slow],
            "worker_to_consumer": [arr[r["click_id"]][0] - r["emitted_at"] for r in slow],
        }
        slow_breakdown = {
            k: float(np.median(v)) * 1e3 if v else None for k, v in slow_parts.items()
        }
        nb = after.get("streamrec_batch_size_count", 0) - before.get(
            "streamrec_batch_size_count", 0
        )
        sb = after.get("streamrec_batch_size_sum", 0) - before.get("streamrec_batch_size_sum", 0)
        ms = after.get("streamrec_model_step_seconds_sum", 0) - before.get(
            "streamrec_model_step_seconds_sum", 0
        )
        ck = {
            k: after.get(f"streamrec_checkpoint_seconds_{k}", 0)
            - before.get(f"streamrec_checkpoint_seconds_{k}", 0)
            for k in ("sum", "count")
        }
        return {
            "checkpoints": ck["count"],
            "checkpoint_mean_ms": 1e3 * ck["sum"] / ck["count"] if ck["count"] else None,
            "events": len(values),
            "answered": len(answered),
            "seen_by_tail": len(arr),
            "seconds": t_end - t_first,
            "events_per_s": len(arr) / (t_end - t_first) if t_end > t_first else float("nan"),
            "produce_events_per_s": len(values) / out.seconds,
            "latency_ms": {k: v * 1e3 for k, v in lat.items()},
            "mean_batch": sb / nb if nb else float("nan"),
            "latency_breakdown_p50_ms": breakdown,
            "latency_breakdown_slowest_1pct_ms": slow_breakdown,
            "model_seconds_in_worker": ms,
        }
    finally:
        col.close()
        proc.stop()


def model_step_alone(
    ckpt: Path, batch: int, seconds: float = 5.0, score_dtype: str = "float32"
) -> dict[str, Any]:
    """The worker's model work for a batch: GRU step, scoring all items, top-k, host copies,
    item ids (``ServingModel.advance`` + ``score``, as the core calls them)."""
    torch.set_num_threads(1)  # as the worker (``streamrec worker --threads 1``)
    model = ServingModel.from_checkpoint(ckpt, "auto", top_k=20, score_dtype=score_dtype)
    rng = np.random.default_rng(0)
    states = np.zeros((batch, model.state_dim), np.float32)
    n = 0
    assert model.split  # GRU4Rec: the core advances states, then scores the batch at once
    for _ in range(3):  # warm up
        model.score(model.advance(rng.integers(0, N_ITEMS, batch), states), 20)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ids = [str(i) for i in rng.integers(0, N_ITEMS, batch)]
        states = model.advance(model.rows(ids), states)
        top_rows, _ = model.score(states, 20)
        model.ids(top_rows)
        n += batch
    dt = time.perf_counter() - t0
    return {"batch": batch, "events_per_s": n / dt, "device": str(model.device)}


def core_alone(ckpt: Path, values: list, batch: int) -> dict[str, Any]:
    """The pure core (decode, states, step, outputs as JSON) over an in-memory store."""
    from nostep import NoStepServingModel

    from streamrec.serving.config import CoreConfig
    from streamrec.serving.pipeline import process_batch
    from streamrec.serving.records import Record

    torch.set_num_threads(1)
    model = ServingModel.from_checkpoint(ckpt, "auto", top_k=20)
    from streamrec.serving.state_store import StateStore

    out = {}
    recs = [Record(v, k, "c", 0, i, time.time()) for i, (k, v, _) in enumerate(values)]
    for name, m in (("with_step", model), ("without_step", NoStepServingModel.wrap(model))):
        store = StateStore()
        t0 = time.perf_counter()
        for i in range(0, len(recs), batch):
            process_batch(recs[i : i + batch], store, m, CoreConfig()).recommendation_values()
        out[name] = len(recs) / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--max-events", type=int, default=256, help="worker micro-batch size")
    ap.add_argument("--rate-max-wait-ms", type=float, default=5.0, help="batch window at --rate")
    ap.add_argument(
        "--rate-fetch-wait-ms",
        type=int,
        default=10,
        help="fetch wait of the worker and of the bench consumer at --rate",
    )
    ap.add_argument(
        "--data", type=Path, default=Path("/work/shared/data/yoochoose-1_64/test.tsv.gz")
    )
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ckpt = make_checkpoint(tmp / "model")
    values = load_values(a.data if a.data.exists() else None, a.events)
    n_lat = int(a.rate * a.latency_seconds)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "load_avg_at_start": os.getloadavg(),
        "model": f"GRU4Rec {N_ITEMS} items x {UNITS} units",
        "data": str(a.data) if a.data.exists() else "synthetic",
        "args": vars(a) | {"data": str(a.data), "out": str(a.out)},
    }
    broker = None
    try:
        if a.bootstrap:
            bootstrap = a.bootstrap
        else:
            broker = EmbeddedBroker(port=0).start()
            bootstrap = broker.bootstrap
        run = f"b{time.time_ns() % 10**8}"
        # the worker runs, each on the same clicks unless it says otherwise
        phases: dict[str, dict[str, Any]] = {
            "e2e": {},
            "nostep": {"no_step": True},  # the same worker with the model step removed
            "e2e_faust": {"engine": "faust"},
            "e2e_bf16": {"score_dtype": "bfloat16"},
            "fixed_rate": {
                "values": values[:n_lat],
                "rate": a.rate,
                "max_wait_ms": a.rate_max_wait_ms,
                "fetch_wait_ms": a.rate_fetch_wait_ms,
            },
        }

        def phase(name: str) -> None:
            print(f"{name} ...", flush=True)
            kw = {"values": values, **phases[name]}
            results[name] = run_worker_phase(
                bootstrap, ckpt, tag=f"{run}-{name}", max_events=a.max_events, tmp=tmp, **kw
            )
            print(results[name], flush=True)

        only = os.environ.get("SERVE_BENCH_ONLY")  # one phase, e.g. while profiling
        if only:
            phase({"rate": "fixed_rate"}.get(only, only))
            return
        print("model step alone ...", flush=True)
        results["step"] = model_step_alone(ckpt, a.max_events)
        print(results["step"], flush=True)
        results["core_alone_events_per_s"] = core_alone(ckpt, values[:10_000], a.max_events)
        print(results["core_alone_events_per_s"], flush=True)
        results["step_bf16"] = model_step_alone(ckpt, a.max_events, score_dtype="bfloat16")
        print(results["step_bf16"], flush=True)
        for name in phases:
            phase(name)
        step_eps = results["step"]["events_per_s"]
        results["step_at_mean_batch"] = model_step_alone(
            ckpt, max(1, round(results["e2e"]["mean_batch"])), seconds=3.0
        )
        results["ratios"] = {
            "e2e_over_step": results["e2e"]["events_per_s"] / step_eps,
            "e2e_over_nostep": results["e2e"]["events_per_s"] / results["nostep"]["events_per_s"],
            "e2e_over_naive_1000": results["e2e"]["events_per_s"] / 1000.0,
            "e2e_over_faust_engine": results["e2e"]["events_per_s"]
            / results["e2e_faust"]["events_per_s"],
            "bf16_e2e_over_bf16_step": results["e2e_bf16"]["events_per_s"]
            / results["step_bf16"]["events_per_s"],
            "bf16_e2e_over_naive_1000": results["e2e_bf16"]["events_per_s"] / 1000.0,
        }
    finally:
        if broker is not None:
            broker.stop()
    print(json.dumps(results, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
