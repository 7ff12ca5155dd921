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


# ---- champion and challenger ---------------------------------------------------------------


def assert_answered_once(recs: list[dict[str, Any]], n: int) -> None:
    """Every click answered, and in one way only. Outputs are at-least-once (design.md): after
    a crash a click whose state survived is answered again flagged ``duplicate``; one whose
    state was not yet checkpointed is applied again to the same earlier state, so its answer
    repeats the first one (same arm, version and items), which downstream drops by click id."""
    by_click: dict[str, set[tuple[str, str, tuple[str, ...]]]] = {}
    for r in recs:
        if not r["duplicate"]:
            by_click.setdefault(r["click_id"], set()).add(
                (r["arm"], r["model_version"], tuple(r["items"]))
            )
    assert len({r["click_id"] for r in recs}) == len(by_click) == n
    assert all(len(answers) == 1 for answers in by_click.values())


def arm_registry(tmp: Path, kind: str, items: list[str]) -> tuple[Path, str, str]:
    """A registry whose champion and challenger are two checkpoints of ``kind``."""
    from streamrec.loop import registry

    models = tmp / "models"
    v1, v2 = (
        registry.add_version(
            models, read_record(make_checkpoint(kind, items, registry.staging_dir(models, s), seed))
        )
        for s, seed in (("a", 7), ("b", 8))
    )
    registry.publish(models, v1, by="test")
    registry.set_alias(models, "challenger", v2, by="test")
    return models, v1, v2


def read_record(path: Path) -> Any:
    from streamrec.model.checkpoint import read_checkpoint_record

    return read_checkpoint_record(path)


@pytest.mark.parametrize("kind", ["gru4rec", "hrnn"])
def test_ab_two_workers_each_key_in_one_arm_across_a_restart_each_arm_as_offline(
    live_service: LiveService, kind: str
) -> None:
    """Two workers, ``--challenger-share 0.3``: every answer names the arm of its key (a stable
    hash of the user id), also after one worker is SIGKILLed and restarted; every click is
    answered once; each arm's live figures equal ``trainer evaluate`` on that arm's clicks."""
    from streamrec.loop import registry
    from streamrec.serving.arms import arm_of

    svc = live_service
    df = generate_clicks(150, 60, 40, seed=5, span_days=28)
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    items = sorted(df["ItemId"].astype(str).unique())
    models, v1, v2 = arm_registry(svc.tmp, kind, items)
    in_challenger = df["UserId"].astype(str).map(lambda u: arm_of(u, 0.3) == "challenger")
    assert 0 < in_challenger.mean() < 1
    offline = {}
    parts = (("champion", v1, df[~in_challenger]), ("challenger", v2, df[in_challenger]))
    for arm, version, part in parts:
        path = svc.tmp / f"{arm}.tsv"
        part.to_csv(path, sep="\t", index=False)
        offline[(arm, version)] = trainer_evaluate(registry.resolve(models, arm) or models, path)
    values = click_values(df)
    half = len(values) // 2
    share = ("--challenger-share", "0.3")
    w0 = svc.start_worker(models, svc.tmp / "d0", *share)
    svc.start_worker(models, svc.tmp / "d1", *share)
    svc.produce(values[:half])
    svc.wait_counts(lambda c: sum(x.n for x in c.values()) > 0, timeout=120)
    svc.kill_while_producing(w0, values[half : half + 300], after_s=0.8)
    svc.start_worker(models, svc.tmp / "d0", *share)
    svc.produce(values[half + 300 :])
    recs = svc.wait_answered(len(values))
    assert_answered_once(recs, len(values))
    for r in recs:
        arm = arm_of(r["user_id"], 0.3)
        assert (r["arm"], r["model_version"]) == (arm, v2 if arm == "challenger" else v1)
    counts = svc.final_counts()
    assert set(counts) == set(offline)
    for key, figures in offline.items():
        assert_equal_to_offline(counts[key], figures)


@pytest.mark.parametrize("live_service", ["native", "faust"], indirect=True)
def test_shadow_publishes_no_challenger_answer_and_measures_both_arms_on_every_click(
    live_service: LiveService,
) -> None:
    from streamrec.loop import registry

    svc = live_service
    df, log = click_log(svc.tmp)
    items = sorted(df["ItemId"].astype(str).unique())
    models, v1, v2 = arm_registry(svc.tmp, "hrnn", items)
    offline = {
        (arm, v): trainer_evaluate(registry.resolve(models, arm) or models, log)
        for arm, v in (("champion", v1), ("challenger", v2))
    }
    values = click_values(df)
    svc.start_worker(models, svc.tmp / "d0", "--shadow")
    svc.produce(values)
    recs = svc.wait_answered(len(values))
    assert len(recs) == len(values)
    assert {(r["arm"], r["model_version"]) for r in recs} == {("champion", v1)}
    counts = svc.final_counts()
    assert set(counts) == set(offline)
    for key, figures in offline.items():
        assert_equal_to_offline(counts[key], figures)
    # streamrec live-report reads the same topic: both arms, and their difference
    from streamrec.tools.launch import settings_env

    done = subprocess.run(
        [sys.executable, "-m", "streamrec", "live-report", "--topic", svc.metrics_topic, "--json"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, **settings_env(svc.settings)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = {(r["arm"], r["model_version"]): r for r in report["arms"]}
    for key, figures in offline.items():
        assert rows[key]["predictions"] == figures["n_events"]
        assert rows[key]["recall@20"]["value"] == figures["recall@20"]
        assert (
            rows[key]["recall@20"]["low"] <= figures["recall@20"] <= rows[key]["recall@20"]["high"]
        )
    diff = report["difference"]
    assert (diff["champion"], diff["challenger"]) == (v1, v2)
    expected = offline[("challenger", v2)]["recall@20"] - offline[("champion", v1)]["recall@20"]
    assert diff["recall@20"]["value"] == pytest.approx(expected, abs=1e-12)


# ---- the rollback guard ---------------------------------------------------------------------


def trainer_train(log: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "trainer", "train", "--train", str(log), "--out", str(out)]
    for kv in ("layers=32", "n_epochs=3", "batch_size=16", "n_sample=0", "device=cpu", "seed=1"):
        cmd += ["--param", kv]
    done = subprocess.run(
        [*cmd, "--model", "gru4rec", "--no-progress"], capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_guard_rolls_back_a_bad_champion_and_the_workers_serve_the_previous_again(
    live_service: LiveService,
) -> None:
    """A champion trained on a log with shuffled item ids is published while a worker serves
    a good one; ``streamrec guard`` (its own process, reading the metrics topic) rolls it back
    once it has its predictions, the worker swaps back, and every click is answered once."""
    import random

    from streamrec.loop import registry
    from streamrec.tools.launch import settings_env

    svc = live_service
    df = generate_clicks(600, 300, 60, seed=11, span_days=28)
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    log = svc.tmp / "log.tsv"
    df.to_csv(log, sep="\t", index=False)
    items = sorted(df["ItemId"].astype(str).unique())
    shuffled = dict(zip(items, random.Random(0).sample(items, len(items)), strict=True))
    bad_log = svc.tmp / "shuffled.tsv"
    df.assign(ItemId=df["ItemId"].astype(str).map(shuffled)).to_csv(bad_log, sep="\t", index=False)
    models = svc.tmp / "models"
    good, bad = (
        registry.add_version(models, read_record(trainer_train(path, svc.tmp / name)))
        for path, name in ((log, "good"), (bad_log, "bad"))
    )
    registry.publish(models, good, by="test")
    values = click_values(df)
    first, second = len(values) // 3, 2 * len(values) // 3
    svc.start_worker(models, svc.tmp / "d0", **{"model.reload_interval_s": 0.5})
    svc.produce(values[:first])
    svc.wait_answered(first)
    svc.final_counts()  # the good champion's figures are on the topic
    registry.publish(models, bad, by="retrain")  # the bad one is the champion now
    guard_log = (svc.tmp / "guard.log").open("w")
    env = {**os.environ, **settings_env(svc.settings), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "streamrec", "guard", "--models", str(models),
           "--topic", svc.metrics_topic, "--min-predictions", "150",
           "--max-predictions", "3000", "--interval", "1"]  # fmt: skip
    guard = subprocess.Popen(cmd, stdout=guard_log, stderr=subprocess.STDOUT, env=env)
    try:
        svc.produce(values[first:second], rate=150.0)
        deadline = time.monotonic() + 120
        while registry.alias_version(models) != good:
            assert time.monotonic() < deadline, (svc.tmp / "guard.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        guard.terminate()
        guard.wait(30)
    change = registry.champion_changes(models)[-1]
    assert (change["version"], change["previous"], change["by"]) == (good, bad, "guard")
    n_bad = int(change["reason"].split(" over ")[1].split()[0])
    assert 150 <= n_bad < 3000, change["reason"]  # judged within the configured predictions
    # the bad one did answer some clicks; after the rollback the worker serves the good again
    time.sleep(2.0)
    svc.produce(values[second:])
    recs = svc.wait_answered(len(values))
    assert_answered_once(recs, len(values))  # nothing lost
    by_offset = sorted(recs, key=lambda r: (r["partition"], r["offset"]))
    assert any(r["model_version"] == bad for r in by_offset)
    last_click = {
        p: max(r["offset"] for r in recs if r["partition"] == p) for p in range(PARTITIONS)
    }
    assert all(
        r["model_version"] == good for r in recs if r["offset"] == last_click[r["partition"]]
    )
