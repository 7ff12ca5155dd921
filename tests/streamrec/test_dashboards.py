"""The dashboard and the alert rules in deploy/ query only metrics that exist: every metric
name in their PromQL is exported by a worker, the archiver or the retrainer (``trainer
retrain --every``), all started here on the embedded broker and scraped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer

from streamrec.data.synthetic import generate_clicks
from streamrec.kafka.embedded import free_port
from streamrec.loop.registry import current_version
from streamrec.testing import click, worker_topics
from streamrec.tools.launch import WorkerProcess, settings_env

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/streamrec-overview.json"
RULES = ROOT / "deploy/prometheus/alerts.yml"
METRIC = re.compile(r"\b(streamrec_[a-z0-9_]+|up)\b")
T0 = 1_767_225_600.0


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def queried_metrics(queries: list[str]) -> set[str]:
    return {m for q in queries for m in METRIC.findall(q)} - {"up"}  # up: Prometheus' own


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    """Throughput, latency p50/p99, lag, dead letters by reason, state sizes, the model
    served and its age, swaps, retrain decisions; the rules: lag growing, dead-letter rate,
    no recommendations while clicks arrive, retrain failing, model too old."""
    text = "\n".join(dashboard_queries())
    for needed in (
        "streamrec_events_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
        "streamrec_consumer_lag",
        "sum by (reason) (rate(streamrec_dead_letters_total",
        "streamrec_session_states",
        "streamrec_user_states",
        "streamrec_model_info",
        "streamrec_model_created_timestamp_seconds",
        "streamrec_model_swaps_total",
        "streamrec_retrain_decisions_total",
    ):
        assert needed in text, needed
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {
        "StreamrecLagGrowing",
        "StreamrecDeadLetterRate",
        "StreamrecNoRecommendations",
        "StreamrecRetrainFailing",
        "StreamrecModelTooOld",
    } <= names


def _names(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as f:
        text = f.read().decode()
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _value(port: int, name: str) -> float:
    """The value of one unlabelled sample on an exporter's page (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as f:
        for line in f.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _wait(what: str, check: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.broker
@pytest.mark.slow
def test_every_metric_the_dashboard_and_rules_query_is_exported(
    isolated_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    topics = worker_topics(isolated_bootstrap, unique_name, 2)
    ports = {"worker": free_port(), "archiver": free_port(), "retrainer": free_port()}
    env = {**os.environ, **settings_env({**topics.settings(), "model.reload_interval_s": 1})}
    archive, models = tmp_path / "archive", tmp_path / "models"
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(log: str, *args: str) -> None:
        out = open(tmp_path / log, "ab")  # noqa: SIM115 - lives as long as the process
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=out))

    worker = None
    try:
        spawn("archiver.log", "-m", "streamrec", "archive", "--dir", str(archive),
              "--flush-interval", "0.5", "--metrics-port", str(ports["archiver"]))  # fmt: skip
        producer = Producer({**topics.conf, "linger.ms": 2})
        df = generate_clicks(600, 30, seed=1, start_time=T0, span_days=2)
        for s, item, t in df[["SessionId", "ItemId", "Time"]].itertuples(index=False):
            producer.produce(topics.clicks, key=str(s), value=click(str(s), str(item), t=t))
        producer.produce(topics.clicks, key=b"k", value=b"not json")  # a dead letter
        assert producer.flush(30) == 0
        # The retrainer's first cycle reads the archive at once and the next comes an hour
        # later: start it only when the archiver has written every click.
        _wait(
            "the archiver to write the clicks",
            lambda: _value(ports["archiver"], "streamrec_archiver_archived_total") >= len(df),
        )
        spawn("retrain.log", "-m", "trainer", "retrain", "--archive", str(archive),
              "--models", str(models), "--every", "1h", "--window", "30d", "--holdout", "6h",
              "--param", "layers=16", "n_epochs=2", "batch_size=32", "n_sample=0",
              "--tolerance", "1.0", "--min-holdout-events", "0", "--no-progress",
              "--metrics-port", str(ports["retrainer"]))  # fmt: skip
        # The Info metric is exported (empty) before any publication: wait for the registry.
        _wait("a published version", lambda: current_version(models) is not None)
        worker = WorkerProcess(
            models,
            settings={**topics.settings(), "worker.metrics_port": ports["worker"]},
            data_dir=tmp_path / "state",
            log_path=tmp_path / "worker.log",
        )
        _wait(
            "the worker's lag and latency",
            lambda: (
                {"streamrec_consumer_lag", "streamrec_click_to_recommendation_seconds_bucket"}
                <= _names(ports["worker"])
            ),
        )
        exported = set().union(*(_names(p) for p in ports.values()))
    finally:
        if worker is not None:
            worker.stop()
        for p in procs:
            p.terminate()
            p.wait(30)
    for name, queries in (("dashboard", dashboard_queries()), ("alert rules", rule_queries())):
        missing = queried_metrics(queries) - exported
        assert not missing, f"the {name} query metrics nobody exports: {sorted(missing)}"
