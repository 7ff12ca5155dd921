"""Running on a cluster, as an operator watches it: the client configuration on the wire
(lz4 batches), /healthz and /readyz, lag and state gauges that move, the broker kind found
by asking the cluster, and an unreachable broker ending each command in one line.

Through the embedded broker, with real worker processes. Lag is checked against what the
workers read and committed, never against the embedded broker's reported high watermark
(which is short by up to one record batch).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from streamrec.engines.native.store import RocksDBPartition
from streamrec.kafka import clients
from streamrec.kafka.clients import TopicSpec, ensure_topics, read_topic
from streamrec.serving.state import SessionState
from streamrec.serving.state_store import SESSIONS, USERS
from streamrec.testing import click, worker_topics
from streamrec.tools.launch import WorkerProcess

N_ITEMS = 30
PARTITIONS = 2
LZ4 = 3  # the compression codec bits of a record batch's attributes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[8]), seed=1)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    return save_checkpoint(path, model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)]).path


def _free_port() -> int:
    from streamrec.kafka.embedded import free_port

    return free_port()


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, why) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def samples(port: int, name: str) -> dict[str, float]:
    """The samples of one metric on /metrics: label text -> value."""
    _, text = get(port, "/metrics")
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            labels, value = line[len(name) :].rsplit(" ", 1)
            out[labels.strip()] = float(value)
    return out


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


async def _batch_codecs(bootstrap: str, topic: str, partition: int) -> list[int]:
    """The compression codec of every record batch of a partition, read with a raw Fetch
    request (the batches as the broker stores them, before any client decompresses them)."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.fetch import FetchRequest
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client.force_metadata_update()
        node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        request = FetchRequest(100, 1, 1 << 22, 0, [(topic, [(partition, 0, 1 << 22)])])
        response = await client.send(node, request)
        records = MemoryRecords(response.topics[0][1][0][-1])
        codecs = []
        while (batch := records.next_batch()) is not None:
            codecs.append(batch.compression_type)
        return codecs
    finally:
        await client.close()


# ---- no broker -------------------------------------------------------------------------------


def test_state_counts_follow_writes_checkpoints_recovery_and_reopening(tmp_path: Path) -> None:
    """The native engine's state gauges come from these counts."""
    st = RocksDBPartition(tmp_path / "p0", 0)
    state = SessionState("s", np.zeros(4, np.float32), "v", None, ["i1"], 0, 1, 1.7e9, 1.7e9, 1)
    for k in ("u:a", "u:b", "a:c"):
        st.write(SESSIONS, k, state.to_bytes())
    st.write(USERS, "u:a", b"user")
    assert st.state_counts() == (3, 1) and st.counts == {SESSIONS: 0, USERS: 0}
    st.begin_checkpoint()
    st.write(SESSIONS, "u:b", state.to_bytes())  # an update: no new state
    st.write(SESSIONS, "a:c", None)
    assert st.state_counts() == (2, 1)
    st.commit(5)
    assert st.counts == {SESSIONS: 3, USERS: 1} and st.state_counts() == (2, 1)
    st.begin_checkpoint()
    st.commit(6)
    st.recover([(b"s/u:z", state.to_bytes(), 7), (b"s/u:a", None, 8), (b"s/u:z", b"x", 9)])
    assert st.state_counts() == (2, 1)  # u:b, u:z
    st.close()
    again = RocksDBPartition(tmp_path / "p0", 0)
    assert again.state_counts() == (2, 1)
    again.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["worker", "--model", "/nonexistent"],
        ["produce", "LOG"],
        ["tail", "--max", "1"],
        ["archive", "--dir", "ARCHIVE", "--metrics-port", "0"],
        ["replay", "LOG"],
    ],
)
def test_an_unreachable_broker_ends_a_command_in_one_line(args: list[str], tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    log.write_text("SessionId\tItemId\tTime\n1\ti1\t1\n1\ti2\t2\n")
    args = [str(log) if a == "LOG" else str(tmp_path / "a") if a == "ARCHIVE" else a for a in args]
    env = {**os.environ, "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "streamrec", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    seconds = time.monotonic() - t0
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stderr
    assert seconds < 30, seconds
    assert 1 <= len(err) <= 3, done.stderr
    assert "127.0.0.1:1" in err[-1] and "STREAMREC_KAFKA__BOOTSTRAP_SERVERS" in err[-1]


# ---- through the embedded broker -------------------------------------------------------------


@pytest.mark.broker
def test_the_embedded_broker_is_recognised_by_asking_it(kafka_bootstrap: str) -> None:
    conf = {"bootstrap.servers": kafka_bootstrap}
    expected = "kafka" if os.environ.get("STREAMREC_TEST_BOOTSTRAP") else "embedded"
    assert clients.cluster_kind(conf) == expected
    assert clients.cluster_kind(clients.with_broker(conf, "kafka")) == "kafka"


@pytest.mark.broker
@pytest.mark.slow
def test_worker_on_lz4_healthy_with_lag_and_state_gauges_that_move(
    isolated_bootstrap: str,
    unique_name: Callable[[str], str],
    checkpoint: Path,
    tmp_path: Path,
    external_broker: bool,
) -> None:
    """A worker configured with kafka.config compression.type=lz4 serves clicks and its
    outputs are lz4 batches; /healthz and /readyz answer 200 once ready; the lag is what it
    read and has not committed (no commit for an hour here), 0 after the checkpoint of a
    clean stop; the state gauges count the sessions, down again after their end events."""
    topics = worker_topics(isolated_bootstrap, unique_name, PARTITIONS)
    port = _free_port()
    settings = {
        **topics.settings(),
        "worker.metrics_port": port,
        "worker.commit_interval_s": 3600,  # nothing committed until the clean stop
        "state.sweep_interval_seconds": 1,  # the gauges' refresh without checkpoints
        "kafka.config": json.dumps({"compression.type": "lz4"}),
        "model.reload_interval_s": 0,
    }

    def start(name: str) -> WorkerProcess:
        return WorkerProcess(
            checkpoint,
            settings=settings,
            data_dir=tmp_path / "data",
            log_path=tmp_path / f"{name}.log",
        )

    worker = start("first")
    try:
        wait_for("/readyz", lambda: get(port, "/readyz")[0] == 200)
        assert get(port, "/healthz")[0] == 200
        producer = Producer({**topics.conf, "linger.ms": 2})
        users = [f"user{j}" for j in range(6)]
        for n in range(3):
            for u in users:
                producer.produce(topics.clicks, key=u, value=click(f"{u}-s", f"i{n}", user=u))
        assert producer.flush(30) == 0
        wait_for(
            "18 answers", lambda: len(read_topic(topics.conf, topics.recs, idle_timeout=1.0)) >= 18
        )
        group = f'group="{topics.app_id}"'
        wait_for(
            "the lag of 18 clicks and 6 sessions",
            lambda: (
                sum(samples(port, "streamrec_consumer_lag").values()) == 18
                and samples(port, "streamrec_session_states") == {"": 6.0}
            ),
        )
        lag = samples(port, "streamrec_consumer_lag")
        assert len(lag) == PARTITIONS and all(group in labels for labels in lag)
        for u in users[:2]:
            producer.produce(
                topics.clicks, key=u, value=click(f"{u}-s", None, type="session_end", user=u)
            )
        assert producer.flush(30) == 0
        wait_for("4 sessions", lambda: samples(port, "streamrec_session_states") == {"": 4.0})
        codecs = [
            c
            for p in range(PARTITIONS)
            for c in asyncio.run(_batch_codecs(isolated_bootstrap, topics.recs, p))
        ]
        assert codecs and set(codecs) == {LZ4}, codecs
    finally:
        worker.stop()
    worker = start("second")  # the same disk: its state and the committed offsets
    try:
        wait_for("/readyz", lambda: get(port, "/readyz")[0] == 200)
        wait_for(
            "no lag",
            lambda: (
                len(samples(port, "streamrec_consumer_lag")) == PARTITIONS
                and sum(samples(port, "streamrec_consumer_lag").values()) == 0
            ),
        )
        assert samples(port, "streamrec_session_states") == {"": 4.0}
    finally:
        worker.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_readyz_is_503_while_a_new_partition_recovers_its_state(
    isolated_bootstrap: str, unique_name: Callable[[str], str], checkpoint: Path, tmp_path: Path
) -> None:
    """A worker on an empty disk replays the changelog before it is ready: /readyz says so
    (503, "recovering"), /healthz stays 200, and /readyz is 200 after."""
    topics = worker_topics(isolated_bootstrap, unique_name, 1)
    changelog = f"{topics.app_id}-state-changelog"
    ensure_topics(topics.conf, [TopicSpec(changelog, 1, config=(("cleanup.policy", "compact"),))])
    state = SessionState("s", np.zeros(8, np.float32), "v", None, ["i1"], 0, 1, 1.7e9, 1.7e9, 1)
    value = state.to_bytes()
    producer = Producer({**topics.conf, "linger.ms": 20, "batch.num.messages": 10_000})
    for j in range(150_000):
        while True:
            try:
                producer.produce(changelog, value, f"s/a:s{j}".encode(), 0)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0
    port = _free_port()
    worker = WorkerProcess(
        checkpoint,
        settings={**topics.settings(), "worker.metrics_port": port, "model.reload_interval_s": 0},
        data_dir=tmp_path / "data",
        log_path=tmp_path / "worker.log",
    )
    seen: list[tuple[int, str, int]] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status, body = get(port, "/readyz")
            seen.append((status, body.strip(), get(port, "/healthz")[0]))
            if status == 200:
                break
            time.sleep(0.02)
        recovering = [s for s in seen if "recovering" in s[1]]
        assert recovering and all(st == 503 and alive == 200 for st, _, alive in recovering)
        assert seen[-1][0] == 200, seen[-5:]
        assert samples(port, "streamrec_session_states") == {"": 150_000.0}
    finally:
        worker.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_faust_worker_on_lz4_healthy_with_lag_and_state_gauges_that_move(
    isolated_bootstrap: str, unique_name: Callable[[str], str], checkpoint: Path, tmp_path: Path
) -> None:
    """The Faust engine: the same configuration applies (outputs lz4 through its
    confluent-kafka producer, changelogs through aiokafka's), /readyz answers 200 once its
    tables are recovered, the lag gauge covers its partitions and reaches 0, and the state
    gauges follow the sessions up and down."""
    topics = worker_topics(isolated_bootstrap, unique_name, PARTITIONS)
    port = _free_port()
    worker = WorkerProcess(
        checkpoint,
        settings={
            **topics.settings(),
            "worker.engine": "faust",
            "worker.metrics_port": port,
            "state.sweep_interval_seconds": 1,
            "kafka.config": json.dumps({"compression.type": "lz4"}),
            "model.reload_interval_s": 0,
        },
        data_dir=tmp_path / "data",
        log_path=tmp_path / "faust.log",
    )
    try:
        wait_for("/readyz", lambda: get(port, "/readyz")[0] == 200)
        assert get(port, "/healthz")[0] == 200
        producer = Producer({**topics.conf, "linger.ms": 2})
        users = [f"user{j}" for j in range(6)]
        for n in range(3):
            for u in users:
                producer.produce(topics.clicks, key=u, value=click(f"{u}-s", f"i{n}", user=u))
        assert producer.flush(30) == 0
        wait_for(
            "18 answers",
            lambda: len(read_topic(topics.conf, topics.recs, idle_timeout=1.0)) >= 18,
        )
        wait_for("6 sessions", lambda: samples(port, "streamrec_session_states") == {"": 6.0})
        wait_for(
            "the lag of every partition at 0",
            lambda: (
                len(samples(port, "streamrec_consumer_lag")) == PARTITIONS
                and sum(samples(port, "streamrec_consumer_lag").values()) == 0
            ),
        )
        for u in users[:2]:
            end = click(f"{u}-s", None, type="session_end", user=u)
            producer.produce(topics.clicks, key=u, value=end)
        assert producer.flush(30) == 0
        wait_for("4 sessions", lambda: samples(port, "streamrec_session_states") == {"": 4.0})
        codecs = [
            c
            for p in range(PARTITIONS)
            for c in asyncio.run(_batch_codecs(isolated_bootstrap, topics.recs, p))
        ]
        assert codecs and set(codecs) == {LZ4}, codecs
    finally:
        worker.stop()
