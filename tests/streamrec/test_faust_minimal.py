"""A minimal Faust app on the broker: RocksDB table state survives a restart with its data
directory kept, and is rebuilt from the changelog when the directory is wiped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from streamrec.kafka.clients import TopicSpec, committed_offsets, ensure_topics, read_topic
from streamrec.processes import stop_process

pytestmark = [pytest.mark.broker, pytest.mark.slow]

APP = Path(__file__).parent / "apps" / "faust_counter.py"
KEYS = [f"user-{i}" for i in range(6)]


def _produce(bootstrap: str, topic: str, values: list[tuple[str, int]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "log_level": 0})
    for key, value in values:
        producer.produce(topic, key=json.dumps(key), value=json.dumps(value))
    assert producer.flush(20) == 0


def _wait_for_outputs(bootstrap: str, topic: str, n: int, log: Path, timeout: float = 90) -> list:
    deadline = time.monotonic() + timeout
    records: list = []
    while time.monotonic() < deadline:
        records = read_topic({"bootstrap.servers": bootstrap}, topic, idle_timeout=1.0)
        if len(records) >= n:
            return records
        time.sleep(1.0)
    got = sorted(
        (m.partition(), m.offset(), json.loads(m.key()), json.loads(m.value())) for m in records
    )
    per_partition = [sum(1 for g in got if g[0] == p) for p in range(2)]
    raise AssertionError(
        f"expected {n} outputs on {topic}, got {len(records)} {per_partition}: "
        f"{got[-70:]}\n" + log.read_text()[-4000:]
    )


def _wait_committed(bootstrap: str, group: str, topic: str, n: int, timeout: float = 30) -> None:
    """Wait until the group has committed offsets for all ``n`` input records.

    The app is at-least-once: stopped before its commit, it would read its last events again
    after the restart and count them twice. This test is about table recovery, so it stops the
    worker only once everything it read is committed.
    """
    conf = {"bootstrap.servers": bootstrap}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sum(max(o, 0) for o in committed_offsets(conf, group, topic))
        if done >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"group {group} committed {done} of {n} offsets on {topic}")


def _last_total_per_key(records: list) -> dict[str, int]:
    # Per partition, outputs are in offset order, so the last one per key is the newest total.
    last: dict[str, int] = {}
    for msg in records:
        last[json.loads(msg.key())] = json.loads(msg.value())
    return last


class Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), "worker", "-l", "warning"],
            env=env,
            stdout=self._log,
            stderr=self._log,
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def test_table_survives_restart_and_rebuilds_from_changelog(
    isolated_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    kafka_bootstrap = isolated_bootstrap
    in_topic, out_topic, app_id = unique_name("in"), unique_name("out"), unique_name("app")
    conf = {"bootstrap.servers": kafka_bootstrap}
    ensure_topics(conf, [TopicSpec(in_topic, 2), TopicSpec(out_topic, 2)])
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "COUNTER_APP_ID": app_id,
        "COUNTER_BOOTSTRAP": kafka_bootstrap,
        "COUNTER_DATA_DIR": str(data_dir),
        "COUNTER_IN": in_topic,
        "COUNTER_OUT": out_topic,
    }
    expected: dict[str, int] = defaultdict(int)
    produced = 0
    phases = ["fresh", "restart with data kept", "restart with data wiped"]
    for phase_no, phase in enumerate(phases):
        if phase == "restart with data wiped":
            shutil.rmtree(data_dir)
        values = [(KEYS[i % len(KEYS)], phase_no * 100 + i) for i in range(60)]
        # Inputs are written before the worker starts: a Tansu consumer that tails a partition
        # while it is being written can skip records (broker notes), which is not what this
        # test is about.
        _produce(kafka_bootstrap, in_topic, values)
        worker = Worker(env, tmp_path / "worker.log")
        try:
            produced += len(values)
            for key, value in values:
                expected[key] += value
            try:
                records = _wait_for_outputs(
                    kafka_bootstrap, out_topic, produced, log=tmp_path / "worker.log"
                )
            except AssertionError as exc:
                inputs = read_topic(conf, in_topic, idle_timeout=1.0)
                per_partition = [sum(1 for m in inputs if m.partition() == p) for p in range(2)]
                committed = committed_offsets(conf, app_id, in_topic)
                raise AssertionError(
                    f"{phase}: inputs per partition {per_partition}, committed {committed}; {exc}"
                ) from None
            _wait_committed(kafka_bootstrap, app_id, in_topic, produced)
        finally:
            worker.stop()
        assert worker.proc.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
        # at least once: every input answered; a redelivered one is answered again (with the
        # unchanged total, the counter being idempotent)
        assert len(records) >= produced, phase
        totals = _last_total_per_key(records)
        wrong = {k for k in expected if totals.get(k) != expected[k]}
        assert not wrong, (
            f"{phase}: totals {totals} != {dict(expected)}; outputs of those keys: "
            + str(
                [
                    (m.partition(), m.offset(), json.loads(m.key()), json.loads(m.value()))
                    for m in records
                    if json.loads(m.key()) in wrong
                ]
            )
        )
        if phase != "restart with data wiped":
            assert any(data_dir.rglob("*")), "the RocksDB data directory was not written"
