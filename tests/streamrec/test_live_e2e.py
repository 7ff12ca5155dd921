"""Live metrics through a real broker: the workers' counts on the live metrics topic equal
``trainer evaluate`` on the same log and checkpoint, for GRU4Rec and HRNN, on both engines,
across a SIGKILL of the worker mid-stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka import Producer

from streamrec.data.synthetic import generate_clicks
from streamrec.kafka.clients import read_topic
from streamrec.loop.live_report import live_totals, read_live_records, wait_counted
from streamrec.serving.live import KS, LiveCounts
from streamrec.testing import WorkerTopics, worker_topics
from streamrec.tools.launch import WorkerProcess
from streamrec.tools.replay import click_values

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PARTITIONS = 3


def make_checkpoint(kind: str, items: list[str], path: Path, seed: int = 7) -> Path:
    """A checkpoint of ``kind`` with random weights (the equality does not need training)."""
    import torch

    from streamrec.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model: Any
    if kind == "hrnn":
        from streamrec.model.hrnn import HRNN

        model = HRNN(len(items), layers=[16], user_layers=[8])
    else:
        from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

        model = GRU4Rec(GRU4RecConfig(n_items=len(items), layers=[16]), seed=seed)
    return save_checkpoint(path, model.eval(), kind, items).path


def trainer_evaluate(ckpt: Path, log: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "trainer", "evaluate", "--model", str(ckpt), "--test", str(log)]
    done = subprocess.run(
        [*cmd, "--json"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


def click_log(tmp: Path, seed: int = 3) -> tuple[pd.DataFrame, Path]:
    """~900 clicks of 20 users over four weeks, 60 items, in time order."""
    df = generate_clicks(150, 60, 20, seed=seed, span_days=28)
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    path = tmp / "log.tsv"
    df.to_csv(path, sep="\t", index=False)
    return df, path


def assert_equal_to_offline(live: LiveCounts, offline: dict[str, Any]) -> None:
    """The same predictions scored, the same hits at every cut-off (so the same ranks up to
    20); MRR sums the same reciprocal ranks in another order (1e-12)."""
    assert live.n == offline["n_events"]
    for k in KS:
        assert live.recall(k) == offline[f"recall@{k}"], k
        assert live.mrr(k) == pytest.approx(offline[f"mrr@{k}"], abs=1e-12), k


class LiveService:
    """One test's topics and workers: produce a log, wait for the answers and the counts."""

    def __init__(self, topics: WorkerTopics, tmp: Path, engine: str, **settings: object) -> None:
        self.t, self.tmp, self.engine = topics, tmp, engine
        self.settings: dict[str, object] = {
            **topics.settings(),
            "batching.max_events": 64,
            "model.reload_interval_s": 0,
            "worker.engine": engine,
            **settings,
        }
        self.metrics_topic = f"{topics.app_id}-live-metrics"
        self.workers: list[WorkerProcess] = []
        self.producer = Producer({**topics.conf, "linger.ms": 2})

    def start_worker(
        self, model: Path, datadir: Path, *args: str, **settings: object
    ) -> WorkerProcess:
        n = len(self.workers)
        w = WorkerProcess(
            model,
            settings={**self.settings, **settings},
            data_dir=datadir,
            log_path=self.tmp / f"worker{n}.log",
            args=args,
            loglevel=os.environ.get("STREAMREC_TEST_WORKER_LOGLEVEL", "WARNING"),
        )
        self.workers.append(w)
        return w

    def produce(self, values: list[tuple[bytes, bytes, float]], rate: float = 0.0) -> None:
        """``values`` to the clicks topic, as fast as possible or at about ``rate`` per s."""
        for i, (key, value, _t) in enumerate(values):
            self.producer.produce(self.t.clicks, key=key, value=value)
            if rate and i % 10 == 9:
                self.producer.flush(30)
                time.sleep(10 / rate)
        assert self.producer.flush(30) == 0

    def kill_while_producing(
        self, w: WorkerProcess, values: list[tuple[bytes, bytes, float]], after_s: float
    ) -> None:
        """Stream ``values`` at 200 clicks/s and SIGKILL ``w`` ``after_s`` seconds in, while
        it answers them (some of their counts and states made, not all checkpointed)."""
        import threading

        streaming = threading.Thread(target=self.produce, args=(values, 200.0))
        streaming.start()
        time.sleep(after_s)
        w.kill9()
        streaming.join()

    def answers(self) -> list[dict[str, Any]]:
        return [
            json.loads(m.value()) for m in read_topic(self.t.conf, self.t.recs, idle_timeout=1.0)
        ]

    def wait_answered(self, n: int, timeout: float = 240) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.answers()
            if len({r["click_id"] for r in recs}) >= n:
                return recs
            for w in self.workers:
                code = w.proc.poll()
                if code is not None and code not in (0, -9):
                    pytest.fail(f"worker died: {w.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                logs = "\n".join(w.log_path.read_text()[-2000:] for w in self.workers)
                raise AssertionError(f"{n - len({r['click_id'] for r in recs})} unanswered\n{logs}")
            time.sleep(1.0)

    def counts(self) -> dict[tuple[str, str], LiveCounts]:
        return live_totals(read_live_records(self.t.conf, self.metrics_topic))

    def final_counts(self, timeout: float = 90) -> dict[tuple[str, str], LiveCounts]:
        """The counts once every clicks partition is counted up to its last click."""
        last: dict[int, int] = {}
        for m in read_topic(self.t.conf, self.t.clicks, idle_timeout=1.0):
            last[m.partition()] = max(last.get(m.partition(), -1), m.offset())
        return live_totals(wait_counted(self.t.conf, self.metrics_topic, last, timeout=timeout))

    def wait_counts(self, done: Callable[[dict[tuple[str, str], LiveCounts]], bool],
                    timeout: float = 90) -> dict[tuple[str, str], LiveCounts]:  # fmt: skip
        """The counts once ``done`` says they are complete (or the last read at the timeout:
        the assertions after it say what is missing)."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.counts()
            if done(c) or time.monotonic() > deadline:
                return c
            time.sleep(1.0)

    def close(self) -> None:
        for w in self.workers:
            w.stop()


@pytest.fixture
def live_service(
    isolated_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path, request: Any
) -> Iterator[LiveService]:
    engine = getattr(request, "param", "native")
    svc = LiveService(worker_topics(isolated_bootstrap, unique_name, PARTITIONS), tmp_path, engine)
    try:
        yield svc
    finally:
        svc.close()


@pytest.mark.parametrize("kind", ["gru4rec", "hrnn"])
@pytest.mark.parametrize("live_service", ["native", "faust"], indirect=True)
def test_live_metrics_equal_trainer_evaluate_across_a_sigkill(
    live_service: LiveService, kind: str
) -> None:
    svc = live_service
    df, log = click_log(svc.tmp)
    items = sorted(df["ItemId"].astype(str).unique())
    ckpt = make_checkpoint(kind, items, svc.tmp / "model")
    offline = trainer_evaluate(ckpt, log)
    values = click_values(df)
    half = len(values) // 2
    datadir = svc.tmp / "data"
    w = svc.start_worker(ckpt, datadir)
    svc.produce(values[:half])
    # kill -9 once some counts are on the topic, while clicks are still being answered
    svc.wait_counts(lambda c: sum(x.n for x in c.values()) > 0, timeout=120)
    svc.kill_while_producing(w, values[half : half + 300], after_s=0.8)
    before = svc.counts()
    svc.produce(values[half + 300 :])
    svc.start_worker(ckpt, datadir)
    svc.wait_answered(len(values))
    version = json.loads((ckpt / "checkpoint.json").read_text())["version"]
    counts = svc.final_counts()
    assert list(counts) == [("champion", version)]
    assert 0 < sum(x.n for x in before.values()) < offline["n_events"]  # killed mid-stream
    assert_equal_to_offline(counts[("champion", version)], offline)
