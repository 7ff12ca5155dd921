"""The worker through a real broker (embedded Tansu, or $STREAMREC_TEST_BOOTSTRAP).

Each test has its own topics and consumer group. Outputs are verified by a fresh read from
offset 0 once the pipeline is idle (Tansu's tailing consumers can skip records), never by
high watermarks or lag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from hier_stream import hier_log, hier_reference, user_path_changes_answers

from streamrec.kafka.clients import committed_offsets, read_topic
from streamrec.kafka.embedded import EmbeddedBroker
from streamrec.kafka.partitioners import partition_function
from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state import STATE_LAYOUT, SessionState, UserState
from streamrec.serving.state_store import StateStore
from streamrec.testing import click, offline_recommendations, worker_topics
from streamrec.tools.launch import WorkerProcess, settings_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]

N_ITEMS = 40
PARTITIONS = 3
#: every test runs the default engine; the semantics tests also run the Faust engine
ENGINES = ["native", "faust"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[16]), seed=1)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    return save_checkpoint(path, model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)]).path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One test's topics, group and worker processes (all stopped at the end)."""

    def __init__(
        self,
        bootstrap: str,
        name: Callable[[str], str],
        ckpt: Path,
        tmp: Path,
        engine: str = "native",
    ) -> None:
        self.bootstrap, self.ckpt, self.tmp, self.engine = bootstrap, ckpt, tmp, engine
        topics = worker_topics(bootstrap, name, PARTITIONS)
        self.clicks, self.recs, self.dead = topics.clicks, topics.recs, topics.dead
        self.app_id = topics.app_id
        self.conf = topics.conf
        self.settings = {
            **topics.settings(),
            "batching.max_events": 64,
            "batching.max_wait_ms": 5,
            "model.reload_interval_s": 0,
            "worker.engine": engine,
        }
        self.workers: list[WorkerProcess] = []
        self.metrics_ports: dict[int, int] = {}  # worker pid -> its /metrics port
        self.producer = Producer({**self.conf, "linger.ms": 2})

    def start_worker(self, datadir: Path | None = None) -> WorkerProcess:
        datadir = datadir or self.tmp / f"data{len(self.workers)}"
        port = free_port()
        w = WorkerProcess(
            self.ckpt,
            settings={**self.settings, "worker.metrics_port": port},
            data_dir=datadir,
            log_path=self.tmp / f"worker{len(self.workers)}.log",
            loglevel=os.environ.get("STREAMREC_TEST_WORKER_LOGLEVEL", "WARNING"),
        )
        self.metrics_ports[w.pid] = port
        self.workers.append(w)
        return w

    def produce(self, values: list[tuple[str, bytes]], rate: float | None = None) -> None:
        for i, (key, value) in enumerate(values):
            self.producer.produce(self.clicks, key=key.encode(), value=value)
            if rate and i % 10 == 9:
                self.producer.flush()
                time.sleep(10 / rate)
        assert self.producer.flush(30) == 0

    def read(self, topic: str) -> list[Any]:
        return read_topic(self.conf, topic, idle_timeout=1.0)

    def recommendations(self) -> list[dict[str, Any]]:
        return [json.loads(m.value()) for m in self.read(self.recs)]

    def wait_answered(self, click_ids: set[str], timeout: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        recs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            recs = self.recommendations()
            missing = click_ids - {r["click_id"] for r in recs}
            if not missing:
                return recs
            for w in self.workers:
                if w.proc.poll() is not None and w.proc.returncode not in (0, -9):
                    pytest.fail(f"worker died: {w.log_path.read_text()[-3000:]}")
            time.sleep(1.0)
        logs = "\n".join(w.log_path.read_text()[-2000:] for w in self.workers)
        dead = [json.loads(m.value()) for m in self.read(self.dead)]
        raise AssertionError(
            f"{len(missing)} clicks unanswered, e.g. {sorted(missing)[:5]}; group committed "
            f"{committed_offsets(self.conf, self.app_id, self.clicks)}; dead letters "
            f"{[(d.get('partition'), d.get('offset'), d.get('reason')) for d in dead][:10]}\n{logs}"
        )

    def clicks_in_log(self) -> list[Record]:
        return [
            Record(m.value(), m.key(), m.topic(), m.partition(), m.offset(), m.timestamp()[1] / 1e3)
            for m in self.read(self.clicks)
        ]

    def changelog_sessions(self) -> dict[str, SessionState]:
        """Final durable session states: the last changelog value per key (the Kafka key:
        the state key without its namespace, u: or a:)."""
        last: dict[str, bytes | None] = {}
        if self.engine == "faust":
            for m in self.read(f"{self.app_id}-sessions-v{STATE_LAYOUT}-changelog"):
                last[json.loads(m.key())[2:]] = m.value()
        else:
            for m in self.read(f"{self.app_id}-state-changelog"):
                if (m.key() or b"").startswith(b"s/"):
                    last[m.key()[4:].decode()] = m.value()
        return {k: SessionState.from_bytes(v) for k, v in last.items() if v}

    def changelog_users(self) -> dict[str, UserState]:
        """Final durable user states: the last changelog value per key (the user id: the
        state key without its namespace u:)."""
        last: dict[str, bytes | None] = {}
        if self.engine == "faust":
            for m in self.read(f"{self.app_id}-users-v{STATE_LAYOUT}-changelog"):
                last[json.loads(m.key())[2:]] = m.value()
        else:
            for m in self.read(f"{self.app_id}-state-changelog"):
                if (m.key() or b"").startswith(b"u/"):
                    last[m.key()[4:].decode()] = m.value()
        return {k: UserState.from_bytes(v) for k, v in last.items() if v}

    def close(self) -> None:
        for w in self.workers:
            w.stop()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture(params=["native"])
def service(
    request: pytest.FixtureRequest,
    kafka_bootstrap: str,
    unique_name: Callable[[str], str],
    checkpoint: Path,
    tmp_path: Path,
) -> Iterator[Service]:
    """The default engine; ``@pytest.mark.parametrize("service", ENGINES, indirect=True)``
    for both."""
    with Service(kafka_bootstrap, unique_name, checkpoint, tmp_path, request.param) as svc:
        yield svc


@pytest.fixture(params=["native"])
def isolated_service(
    request: pytest.FixtureRequest,
    isolated_bootstrap: str,
    unique_name: Callable[[str], str],
    checkpoint: Path,
    tmp_path: Path,
) -> Iterator[Service]:
    """A service on a broker of its own (see conftest.isolated_bootstrap)."""
    with Service(isolated_bootstrap, unique_name, checkpoint, tmp_path, request.param) as svc:
        yield svc


def make_sessions(n: int, length: int, seed: int = 0, users: bool = False) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {f"s{seed}-{j}": [f"i{rng.randrange(N_ITEMS)}" for _ in range(length)] for j in range(n)}


def interleave(sessions: dict[str, list[str]], seed: int = 0) -> list[tuple[str, bytes]]:
    """Clicks of all sessions, interleaved at random but in order within each session."""
    rng = random.Random(seed)
    pos = dict.fromkeys(sessions, 0)
    out = []
    live = list(sessions)
    while live:
        s = rng.choice(live)
        out.append((s, click(s, sessions[s][pos[s]])))
        pos[s] += 1
        if pos[s] == len(sessions[s]):
            live.remove(s)
    return out


def click_ids(svc: Service) -> set[str]:
    return {f"{r.topic}:{r.partition}:{r.offset}" for r in svc.clicks_in_log()}


def check_against_offline(recs: list[dict[str, Any]], sessions: dict[str, list[str]], ckpt: Path):
    """First answer of each click == the model run offline over the session prefix."""
    model = ServingModel.from_checkpoint(ckpt, "cpu", top_k=20)
    ref = {}
    for s, items in sessions.items():
        for j, (ids, scores) in enumerate(offline_recommendations(model, [items], k=20)):
            ref[(s, j)] = (ids, scores)
    first: dict[str, dict[str, Any]] = {}
    for r in sorted(recs, key=lambda r: (r["partition"], r["offset"])):
        first.setdefault(r["click_id"], r)
    by_session: dict[str, list[dict[str, Any]]] = {}
    for r in first.values():
        by_session.setdefault(r["session_id"], []).append(r)
    assert by_session.keys() == sessions.keys()
    for s, rs in by_session.items():
        assert [r["item_id"] for r in rs] == sessions[s]
        for j, r in enumerate(rs):
            ids, scores = ref[(s, j)]
            np.testing.assert_allclose(r["scores"], scores, rtol=1e-4, atol=1e-5)
            # ids may differ only where scores tie within float tolerance
            mismatch = [a for a, b in zip(r["items"], ids, strict=True) if a != b]
            assert not mismatch or np.ptp(r["scores"]) == 0, (s, j, r["items"], ids)


def reference_states(svc: Service) -> dict[str, SessionState]:
    """Session states of a crash-free run: the clicks log through the core in-process."""
    model = ServingModel.from_checkpoint(svc.ckpt, "cpu", top_k=20)
    store = StateStore()
    recs = svc.clicks_in_log()
    for p in range(PARTITIONS):
        part = [r for r in recs if r.partition == p]
        for i in range(0, len(part), 50):
            process_batch(part[i : i + 50], store, model, CoreConfig(top_k=20))
    return {k[2:]: s for k, s in store.iter_sessions()}  # without the namespace


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def wait_states_equal(svc: Service, timeout: float = 60) -> None:
    """The durable session states (changelog) reach those of a crash-free run."""
    want = reference_states(svc)
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_states_equal(svc.changelog_sessions(), want)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def metric(svc: Service, w: WorkerProcess, name: str) -> float:
    """Sum of a metric's samples on a running worker's /metrics endpoint."""
    import urllib.request

    port = svc.metrics_ports[w.pid]
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as f:
                text = f.read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline, f"no metrics endpoint on {port}"
            time.sleep(0.5)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


def assert_states_equal(got: dict[str, SessionState], want: dict[str, SessionState]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        a, b = got[k], want[k]
        assert (a.offset, a.n_events, a.recent_items) == (b.offset, b.n_events, b.recent_items), k
        np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-5)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("service", ENGINES, indirect=True)
def test_equivalence_with_offline_model(service: Service) -> None:
    sessions = make_sessions(30, 6, seed=1)
    service.start_worker()
    service.produce(interleave(sessions, seed=1))
    recs = service.wait_answered(click_ids(service))
    assert len({r["click_id"] for r in recs}) == 180
    assert not any(r["duplicate"] for r in recs)
    check_against_offline(recs, sessions, service.ckpt)
    assert {r["model_version"] for r in recs} == {
        ServingModel.from_checkpoint(service.ckpt, "cpu").version
    }


@pytest.mark.parametrize(
    ("isolated_service", "wipe"),
    [("native", False), ("native", True), ("faust", False), ("faust", True)],
    ids=["data-kept-native", "data-wiped-native", "data-kept-faust", "data-wiped-faust"],
    indirect=["isolated_service"],
)
def test_kill9_mid_stream_then_restart(isolated_service: Service, wipe: bool) -> None:
    service = isolated_service
    sessions = make_sessions(40, 10, seed=2)
    values = interleave(sessions, seed=2)
    datadir = service.tmp / "data"
    w = service.start_worker(datadir)
    service.produce(values[:250], rate=200)
    # wait until the worker is answering, then kill it mid-stream
    deadline = time.monotonic() + 90
    while len(service.recommendations()) < 100 and time.monotonic() < deadline:
        time.sleep(0.5)
    service.produce(values[250:300])
    w.kill9()
    # mid-stream: clicks were answered before the kill, and sessions with answered clicks
    # go on in the clicks produced only after it
    before = {r["click_id"]: r for r in service.recommendations()}
    answered_sessions = {r["session_id"] for r in before.values()}
    assert before and answered_sessions & {s for s, _ in values[300:]}
    if wipe:
        shutil.rmtree(datadir)
    service.produce(values[300:])
    service.start_worker(datadir)
    recs = service.wait_answered(click_ids(service), timeout=150)
    # every click answered at least once; answers to first deliveries match the offline run
    assert len({r["click_id"] for r in recs}) == len(values)
    check_against_offline(recs, sessions, service.ckpt)
    flagged = {r["click_id"] for r in recs if r["duplicate"]}
    assert flagged <= before.keys()  # only clicks answered before the crash come again
    # every answer after a click's first is flagged (issue 19: the native engine answered
    # 10 to 160 redelivered clicks again with duplicate: false, its changelog a second behind
    # its answers)
    unflagged = Counter(r["click_id"] for r in recs if not r["duplicate"])
    assert not [c for c, n in unflagged.items() if n > 1]
    wait_states_equal(service)


@pytest.mark.parametrize("service", ENGINES, indirect=True)
def test_bad_input_goes_to_dead_letters(service: Service) -> None:
    rng = random.Random(3)
    sessions = make_sessions(20, 5, seed=3)
    good = interleave(sessions, seed=3)
    bad_kinds: list[bytes] = [
        b"",
        b"{",
        b"null",
        b"[1,2]",
        b'{"session_id": 5, "item_id": "i1"}',
        b'{"session_id": "s", "item_id": ["i1"]}',
        b'{"item_id": "i1"}',
        b'{"session_id": "s", "item_id": "i1", "timestamp": 1e15}',
        b'{"session_id": "s", "item_id": "i1", "timestamp": "noon"}',
        b'{"session_id": "s", "item_id": "i1", "type": "buy"}',
        b"\x00\xff" * 30,
        b'{"session_id": "' + b"s" * 1000 + b'", "item_id": "i1"}',
        b'{"session_id": "s", "item_id": "' + b"x" * 30_000 + b'"}',
    ]
    mixed: list[tuple[str, bytes]] = []
    n_bad = 0
    gi = 0
    while gi < len(good) or n_bad < 2000:
        if n_bad < 2000 and (gi >= len(good) or rng.random() < 0.95):
            mixed.append((f"bad{n_bad % 7}", rng.choice(bad_kinds)))
            n_bad += 1
        else:
            mixed.append(good[gi])
            gi += 1
    service.start_worker()
    service.produce(mixed)
    recs = service.wait_answered(click_ids_of(service, valid=True), timeout=150)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dead = [json.loads(m.value()) for m in service.read(service.dead)]
        if len({(d["partition"], d["offset"]) for d in dead}) >= n_bad:
            break
        time.sleep(1)
    positions = {(d["partition"], d["offset"]) for d in dead}
    assert len(positions) == n_bad
    assert all(
        d["reason"]
        in {
            "empty",
            "unparseable",
            "not_an_object",
            "invalid",
            "oversized",
            "timestamp_out_of_range",
        }
        for d in dead
    )
    assert {r["click_id"] for r in recs} >= click_ids_of(service, valid=True)
    assert all(w.proc.poll() is None for w in service.workers)
    check_against_offline(recs, sessions, service.ckpt)


def click_ids_of(svc: Service, valid: bool) -> set[str]:
    from streamrec.serving.events import ClickEvent, decode

    out = set()
    for r in svc.clicks_in_log():
        if isinstance(decode(r.value), ClickEvent) == valid:
            out.add(f"{r.topic}:{r.partition}:{r.offset}")
    return out


@pytest.mark.parametrize("service", ENGINES, indirect=True)
def test_two_workers_answer_as_one(service: Service) -> None:
    sessions = make_sessions(40, 6, seed=4)
    service.start_worker()
    service.start_worker()
    service.produce(interleave(sessions, seed=4), rate=300)
    recs = service.wait_answered(click_ids(service), timeout=150)
    check_against_offline(recs, sessions, service.ckpt)
    wait_states_equal(service)
    # both workers took part: each served clicks, and together all of them
    served = [metric(service, w, "streamrec_clicks_total") for w in service.workers]
    assert all(n > 0 for n in served) and sum(served) >= len(click_ids(service)), served


def test_broker_pause_longer_than_session_timeout(
    unique_name: Callable[[str], str], checkpoint: Path, tmp_path: Path, external_broker: bool
) -> None:
    """Native engine only: the test waits, broker paused, until the worker's group session
    has expired, which librdkafka reports ("partitions lost"); the Faust worker (aiokafka)
    logs no sign of it at WARNING, so for Faust the expiry could not be asserted, only slept
    for, and a fixed sleep is what this test must not rely on."""
    if external_broker:
        pytest.skip("pauses its own embedded broker process")
    with (
        EmbeddedBroker(port=0) as broker,
        Service(broker.bootstrap, unique_name, checkpoint, tmp_path) as svc,
    ):
        sessions = make_sessions(20, 6, seed=5)
        values = interleave(sessions, seed=5)
        w = svc.start_worker()
        svc.produce(values[:60])
        svc.wait_answered(click_ids(svc), timeout=90)
        broker.pause()
        # paused until the worker's group session has expired (librdkafka declares its
        # partitions lost once no heartbeat got through for session.timeout.ms)
        wait_for(lambda: "partitions lost" in w.log_tail(100_000), 90, "session never expired")
        broker.resume()
        svc.produce(values[60:])
        recs = svc.wait_answered(click_ids(svc), timeout=150)
        check_against_offline(recs, sessions, checkpoint)
        assert all(w.proc.poll() is None for w in svc.workers)


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "stat").read_text().split(") ", 1)[1].split()[1] == me:
                    out.add(int(d.name))
            except (OSError, IndexError):
                pass
    return out


def test_demo_runs_and_leaves_nothing_running(tmp_path: Path) -> None:
    """The demo (as ``streamrec demo --keep DIR``): every held-out click answered, the live
    Recall@20/MRR@20 it reports equal to the kept model run offline over the same sessions,
    the model and the worker log kept, and no process left behind."""
    from rich.console import Console

    from streamrec.data.synthetic import generate_clicks
    from streamrec.tools.demo import DemoOptions, _split, run_demo

    before = _children()
    opts = DemoOptions(sessions=300, items=60, epochs=1, units=16, rate=1000, show=2)
    summary = run_demo(
        dataclasses.replace(opts, keep_dir=tmp_path / "kept"),
        console=Console(quiet=True),
    )
    assert _children() - before == set()
    _, test = _split(generate_clicks(opts.sessions, opts.items, opts.users, seed=opts.seed), 0.1)
    assert summary["answered"] == summary["events"] == len(test)
    assert (tmp_path / "kept" / "worker.log").is_file()
    model = ServingModel.from_checkpoint(tmp_path / "kept" / "model", "cpu", top_k=20)
    hits, rr, n = 0, 0.0, 0
    for _, g in test.groupby("SessionId", sort=False):
        items = g.sort_values("Time", kind="stable")["ItemId"].astype(str).tolist()
        answers = offline_recommendations(model, [items], k=20)
        for (top, _scores), nxt in zip(answers, items[1:], strict=False):
            n += 1
            if nxt in top:
                hits += 1
                rr += 1 / (top.index(nxt) + 1)
    assert summary["recall@20"] == pytest.approx(hits / n, abs=1e-12)
    assert summary["mrr@20"] == pytest.approx(rr / n, abs=1e-9)
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]


def test_demo_retrain_publishes_swaps_and_shows_new_items(tmp_path: Path) -> None:
    """README: ``streamrec demo --retrain``: the archive fills, a retrain publishes, the
    worker swaps to the second version and new items appear in its recommendations. (It
    hung once: its probes had no event time and were dead-lettered by the partition clock,
    the log's times lying months back; and a gate that kept v1 left it waiting forever.)"""
    from rich.console import Console

    from streamrec.loop import registry
    from streamrec.tools.demo import DemoOptions, run_retrain_demo

    before = _children()
    opts = DemoOptions(sessions=600, epochs=1, keep_dir=tmp_path / "kept")
    out = run_retrain_demo(opts, console=Console(quiet=True))
    assert _children() - before == set()
    versions = [r["decision"]["version"] for r in registry.read_log(tmp_path / "kept" / "models")]
    assert len(versions) == 2 and all(versions), versions  # both cycles published
    assert out["version"] == versions[1]
    assert out["new_items"] > 0 and out["new_items_shown"] > 0
    assert 0 <= out["swap_seconds"] < 60


@pytest.mark.parametrize("service", ENGINES, indirect=True)
def test_hot_swap_reencodes_live_sessions(service: Service) -> None:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    watch = service.tmp / "ckpts"
    shutil.copytree(service.ckpt, watch / "v1")
    service.ckpt = watch
    service.settings["model.reload_interval_s"] = 1
    old = ServingModel.from_checkpoint(watch / "v1", "cpu", top_k=20)
    sessions = make_sessions(8, 6, seed=6)
    first = {s: items[:3] for s, items in sessions.items()}
    service.start_worker()
    service.produce(interleave(first, seed=6))
    recs = service.wait_answered(click_ids(service))
    assert {r["model_version"] for r in recs} == {old.version}
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[16]), seed=99)
    save_checkpoint(watch / "v2", model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)])
    new = ServingModel.from_checkpoint(watch / "v2", "cpu", top_k=20)
    deadline = time.monotonic() + 60
    probe = 0
    while time.monotonic() < deadline:  # until the worker serves v2
        service.produce([(f"probe{probe}", click(f"probe{probe}", "i1"))])
        probe += 1
        answered = service.wait_answered(click_ids(service))
        if any(r["model_version"] == new.version for r in answered):
            break
        time.sleep(1)
    rest = {s: items[3:] for s, items in sessions.items()}
    service.produce(interleave(rest, seed=7))
    recs = service.wait_answered(click_ids(service))
    later = [r for r in recs if r["session_id"] in sessions and r["item_id"] is not None]
    later = [r for r in later if r["model_version"] == new.version]
    assert len(later) == sum(len(v) for v in rest.values())
    # sessions begun under v1 continue as if v2 had served them from the start
    ref = {}
    for s, items in sessions.items():
        for j, (ids, scores) in enumerate(offline_recommendations(new, [items], k=20)):
            ref[(s, j + 1)] = (ids, scores)
    for s in sessions:
        mine = sorted((r for r in later if r["session_id"] == s), key=lambda r: r["offset"])
        for j, r in enumerate(mine):
            ids, scores = ref[(s, 4 + j)]
            np.testing.assert_allclose(r["scores"], scores, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# HRNN and p-RNN through the broker: user ids, explicit session ends, a SIGKILL mid-stream


def _hier_checkpoint(kind: str, svc: Service, request: pytest.FixtureRequest) -> Path:
    """HRNN: the trained one of the session; p-RNN: an untrained one (no user state)."""
    import torch

    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.prnn import PRNN

    if kind == "hrnn":
        trained = Path(request.getfixturevalue("trained_hrnn"))
        served = ServingModel.from_checkpoint(trained, "cpu", top_k=20)
        assert user_path_changes_answers(served, hier_log()[2]) > 0.5  # the user path matters
        return trained
    path = svc.tmp / kind
    torch.manual_seed(11)
    model = PRNN(
        N_ITEMS, [5], id_hidden=12, feature_hidden=6, feature_values=[torch.rand(N_ITEMS, 5)]
    )
    return save_checkpoint(path, model.eval(), "prnn", [str(j) for j in range(N_ITEMS)]).path


def _rewind_group(svc: Service) -> None:
    """Commit offset 0 on every clicks partition for the worker group: every click is
    delivered again, as after a crash that lost its commits. The broker takes commits only
    from a member, so this joins the group (once the killed worker's session has expired and
    all partitions come to it), commits and leaves."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {**svc.conf, "group.id": svc.app_id, "log_level": 0, "enable.auto.commit": False,
         "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
    )  # fmt: skip
    try:
        consumer.subscribe([svc.clicks])
        deadline = time.monotonic() + 90
        while len(consumer.assignment()) < PARTITIONS:
            assert time.monotonic() < deadline, "never got the group's partitions"
            consumer.poll(0.2)
        consumer.commit(
            offsets=[TopicPartition(svc.clicks, p, 0) for p in range(PARTITIONS)],
            asynchronous=False,
        )
    finally:
        consumer.close()
    assert committed_offsets(svc.conf, svc.app_id, svc.clicks) == [0] * PARTITIONS


@pytest.mark.parametrize("kind", ["hrnn", "prnn"])
@pytest.mark.parametrize("isolated_service", ENGINES, indirect=True)
def test_hier_models_served_with_kill9_and_redelivery(
    isolated_service: Service, kind: str, request: pytest.FixtureRequest
) -> None:
    """HRNN: a trained one, whose user state changes the answers (an untrained HRNN's user
    path is zero: no bug in the user state could show)."""
    from trainer.hier import evaluate_users

    svc = isolated_service
    train, test, values = hier_log()
    svc.ckpt = _hier_checkpoint(kind, svc, request)
    model = ServingModel.from_checkpoint(svc.ckpt, "cpu", top_k=20)
    assert (model.user_state_dim > 0) == (kind == "hrnn")
    gap = 1800.0
    svc.settings["state.session_gap_seconds"] = gap
    svc.settings["model.top_k"] = 20
    cut = len(values) * 2 // 5
    datadir = svc.tmp / "data"
    w = svc.start_worker(datadir)
    svc.produce(values[:cut])
    # kill -9 once some answers are durable (their offsets committed) and before the rest of
    # the stream is produced: sessions are open across the crash
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sum(max(o, 0) for o in committed_offsets(svc.conf, svc.app_id, svc.clicks)) > 0:
            break
        time.sleep(0.5)
    w.kill9()
    before = {a["click_id"]: a for a in svc.recommendations()}
    assert before, "killed before any answer"
    assert sum(max(o, 0) for o in committed_offsets(svc.conf, svc.app_id, svc.clicks)) > 0
    open_users = {a["user_id"] for a in before.values()}
    later_users = {u for u, _ in values[cut:]}
    assert open_users & later_users, "no session spans the crash"
    # Every click comes again: the answered ones whose states were durable must be flagged.
    # Faust: the broker takes commits only from group members, and a killed Faust (aiokafka)
    # member stays listed in its group on Tansu (docs/architecture.md), so no outside client
    # gets to rewind its group; there only the clicks the crash left uncommitted come again.
    rewound = svc.engine == "native"
    if rewound:
        _rewind_group(svc)
    svc.produce(values[cut:])
    svc.start_worker(datadir)
    log_records = svc.clicks_in_log()
    key_of: dict[str, str] = {}
    time_of: dict[str, float] = {}  # click id -> the click's event time
    for m in log_records:
        cid = f"{m.topic}:{m.partition}:{m.offset}"
        key_of[cid] = (m.key or b"").decode()
        ev = json.loads(m.value or b"null")
        if ev["type"] == "click":
            time_of[cid] = ev["timestamp"]
    recs = svc.wait_answered(set(time_of), timeout=150)
    # the reference: top-20 after each click in stream order
    click_events = [e for _, v in values if (e := json.loads(v))["type"] == "click"]
    index = {(e["session_id"], e["timestamp"], e["item_id"]): n for n, e in enumerate(click_events)}
    ref = hier_reference(model, values, gap)

    def ref_index(answer: dict[str, Any]) -> int:
        return index[(answer["session_id"], time_of[answer["click_id"]], answer["item_id"])]

    first: dict[str, dict[str, Any]] = {}
    for a in recs:
        first.setdefault(a["click_id"], a)
        ids, scores = ref[ref_index(a)]
        if not a["duplicate"]:  # every answer not flagged is the model's, state applied once
            np.testing.assert_allclose(a["scores"], scores, rtol=1e-4, atol=1e-5)
            assert a["items"] == ids or np.ptp(a["scores"]) == 0
        assert a["user_id"] == key_of[a["click_id"]]
    assert first.keys() == set(time_of)
    for c, a in first.items():  # first answers, the answers before the crash among them
        ids, scores = ref[ref_index(a)]
        np.testing.assert_allclose(a["scores"], scores, rtol=1e-4, atol=1e-5)
        if c in before:
            assert before[c]["scores"] == a["scores"]
    # redelivered clicks whose states were durable are answered again, flagged; nothing else is
    flagged = {a["click_id"] for a in recs if a["duplicate"]}
    assert flagged <= before.keys()
    if rewound:
        assert flagged
    # the metrics of the held-out last sessions equal the offline per-user evaluation
    test_ids = set(test["SessionId"])
    rank: list[int] = []  # 1-based position of the next item in the answer, 0: not in it
    for a in first.values():
        if a["session_id"] in test_ids:
            j = ref_index(a)
            nxt = next(
                (e for e in click_events[j + 1 :] if e["session_id"] == a["session_id"]), None
            )
            if nxt is not None:
                items = a["items"]
                rank.append(items.index(nxt["item_id"]) + 1 if nxt["item_id"] in items else 0)
    offline = evaluate_users(
        load_checkpoint_model(svc.ckpt), train, test, model.item_index, ks=(20,)
    )
    assert len(rank) == offline["n_events"]
    assert np.mean([x > 0 for x in rank]) == pytest.approx(offline["recall@20"], abs=1e-9)
    mrr = np.mean([1 / x if x else 0.0 for x in rank])
    assert mrr == pytest.approx(offline["mrr@20"], abs=1e-6)


def load_checkpoint_model(path: Path) -> Any:
    from streamrec.model.checkpoint import load_checkpoint

    return load_checkpoint(path, "cpu").model


@pytest.mark.parametrize("service", ENGINES, indirect=True)
def test_idle_sweep_and_user_ttl_in_a_running_worker(service: Service) -> None:
    """In event time: sessions idle past the gap are closed (their clicks recorded in the user
    state), users idle past the TTL are dropped; durable in the changelog, counted in
    /metrics. Nothing but the timestamps of later clicks moves the clock."""
    t0 = 1.7e9
    service.settings.update(
        {
            "state.session_gap_seconds": 100,
            "state.user_ttl_seconds": 1000,
            "state.sweep_interval_seconds": 0.5,
        }
    )
    w = service.start_worker()
    service.produce(
        [
            ("u1", click("a", "i1", user="u1", t=t0)),
            ("u1", click("a", "i2", user="u1", t=t0 + 10)),
            ("u2", click("b", "i3", user="u2", t=t0 + 20)),
        ]
    )
    service.wait_answered(click_ids(service))
    # the sessions stay open while no later event time is seen (wall time does not end them)
    wait_for(lambda: set(service.changelog_sessions()) == {"u1", "u2"}, 60, "states not stored")
    tick1 = tick(service, "tick1", t0 + 200)
    wait_for(lambda: set(service.changelog_sessions()) == tick1, 60, "idle sessions never closed")
    users = service.changelog_users()
    assert users["u1"].sessions == [["i1", "i2"]] and users["u2"].sessions == [["i3"]]
    assert metric(service, w, "streamrec_sessions_ended_total") == 2
    # 1000 s after their last click the users expire (and the tick session closes)
    tick2 = tick(service, "tick2", t0 + 1500, n=40)
    wait_for(lambda: not service.changelog_users(), 60, "idle users never expired")
    wait_for(lambda: set(service.changelog_sessions()) == tick2, 60, "tick1 never closed")
    assert metric(service, w, "streamrec_sessions_ended_total") == 2 + len(tick1)


@pytest.mark.parametrize("service", ENGINES, indirect=True)
def test_idle_sweep_after_a_restart_finds_the_states_stored_before_it(service: Service) -> None:
    """States written before a restart are swept after it: the native engine's index is in its
    RocksDB; the Faust engine's is in memory and is read back from the tables' databases after
    the rebalance (streamrec/engines/faust/idle.py), else these sessions would never close."""
    t0 = 1.7e9
    service.settings.update({"state.session_gap_seconds": 100, "state.sweep_interval_seconds": 0.5})
    datadir = service.tmp / "restart-data"
    w = service.start_worker(datadir)
    service.produce(
        [
            ("u1", click("a", "i1", user="u1", t=t0)),
            ("u2", click("b", "i3", user="u2", t=t0 + 20)),
        ]
    )
    service.wait_answered(click_ids(service))
    wait_for(lambda: set(service.changelog_sessions()) == {"u1", "u2"}, 60, "states not stored")
    assert w.stop() == 0
    w = service.start_worker(datadir)  # the same local state: nothing replayed into the index
    tick1 = tick(service, "tick1", t0 + 200)
    wait_for(
        lambda: set(service.changelog_sessions()) == tick1, 90, "states from before never closed"
    )
    assert metric(service, w, "streamrec_sessions_ended_total") == 2


def tick(svc: Service, name: str, t: float, n: int = 12) -> set[str]:
    """``n`` sessions on every partition (their keys are the partition's under the producers'
    partitioner), one click each, from event time ``t``; returns the session ids. Each
    partition has its own clock, one vote per key, trusted once 8 keys vote and moved only by
    more than half of its recent keys (issue 19): the keys, not the messages, move it, so
    ``n`` must be at least 8 and outnumber the partition's earlier keys."""
    partition_of = partition_function("consistent_random")
    by_partition: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    i = 0
    while any(len(sids) < n for sids in by_partition.values()):
        sid = f"{name}-{i}"
        sids = by_partition[partition_of(sid.encode(), PARTITIONS)]
        if len(sids) < n:
            sids.append(sid)
        i += 1
    for p, sids in by_partition.items():
        for j, sid in enumerate(sids):
            svc.producer.produce(svc.clicks, click(sid, "i4", t=t + j), sid.encode(), partition=p)
    assert svc.producer.flush(30) == 0
    return {sid for sids in by_partition.values() for sid in sids}


@pytest.mark.parametrize("service", ENGINES, indirect=True)
def test_partly_written_checkpoint_is_not_swapped_in(service: Service) -> None:
    """A checkpoint directory copied in non-atomically (tensor file cut short) is rejected:
    the worker keeps serving the old model and stays up; a complete one written after it is
    swapped in."""
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    watch = service.tmp / "ckpts"
    shutil.copytree(service.ckpt, watch / "v1")
    service.ckpt = watch
    service.settings["model.reload_interval_s"] = 0.5
    old = ServingModel.from_checkpoint(watch / "v1", "cpu", top_k=20)
    w = service.start_worker()
    probes = iter(range(1000))

    def probe_version() -> str:
        sid = f"probe{next(probes)}"
        service.produce([(sid, click(sid, "i1"))])
        answers = service.wait_answered(click_ids(service))
        return str(next(a["model_version"] for a in answers if a["session_id"] == sid))

    assert probe_version() == old.version
    ids = [f"i{j}" for j in range(N_ITEMS)]
    full = save_checkpoint(
        service.tmp / "v2",
        GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[16]), seed=5),
        "gru4rec",
        ids,
    ).path
    partial = watch / "v2"
    partial.mkdir()
    tensors = (full / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(tensors[: len(tensors) // 2])
    shutil.copy(full / "checkpoint.json", partial / "checkpoint.json")
    wait_for(lambda: "rejected" in w.log_tail(100_000), 60, "partial checkpoint never looked at")
    assert probe_version() == old.version and w.alive()
    new = save_checkpoint(
        watch / "v3", GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[16]), seed=6), "gru4rec", ids
    ).path
    version = ServingModel.from_checkpoint(new, "cpu").version
    wait_for(lambda: probe_version() == version, 90, "complete checkpoint never swapped in")
    assert w.alive()


def _streamrec_cli(
    svc: Service, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``streamrec ARGS`` in a child process, configured like the service's workers."""
    return subprocess.run(
        [sys.executable, "-m", "streamrec", *args],
        env={**os.environ, **settings_env(svc.settings)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _log_file(path: Path, sessions: dict[str, list[str]], t0: float) -> Path:
    rows = [
        (s, item, t0 + 1000 * n + j)
        for n, (s, items) in enumerate(sessions.items())
        for j, item in enumerate(items)
    ]
    with open(path, "w") as f:
        f.write("SessionId\tItemId\tTime\n")
        f.writelines(f"{s}\t{i}\t{t}\n" for s, i, t in rows)
    return path


def test_streamrec_cli_produce_tail_replay_and_engine_flag(service: Service) -> None:
    """``streamrec worker --engine faust`` (settings say native) serves through Faust tables;
    ``streamrec produce`` publishes a log whose answers match the offline run; ``streamrec tail``
    prints them; ``streamrec replay`` reports the live Recall/MRR of the offline model."""
    t0 = 1.7e9
    service.settings["worker.engine"] = "native"
    w = WorkerProcess(
        service.ckpt,
        settings=service.settings,
        data_dir=service.tmp / "data",
        log_path=service.tmp / "worker.log",
        args=["--engine", "faust"],
    )
    service.workers.append(w)
    first = make_sessions(10, 5, seed=8)
    res = _streamrec_cli(service, "produce", str(_log_file(service.tmp / "a.tsv", first, t0)))
    assert res.returncode == 0, res.stderr
    recs = service.wait_answered(click_ids(service), timeout=150)
    check_against_offline(recs, first, service.ckpt)
    # the Faust engine ran: its table changelog exists, the native one does not
    topics = set(service.producer.list_topics(timeout=10).topics)
    assert f"{service.app_id}-sessions-v{STATE_LAYOUT}-changelog" in topics
    assert f"{service.app_id}-state-changelog" not in topics
    res = _streamrec_cli(service, "tail", "--from-beginning", "--raw", "--max", str(len(recs)))
    assert res.returncode == 0, res.stderr
    tailed = [json.loads(line) for line in res.stdout.splitlines()]
    assert sorted(r["click_id"] for r in tailed) == sorted(r["click_id"] for r in recs)
    second = make_sessions(10, 5, seed=9)
    res = _streamrec_cli(
        service, "replay", str(_log_file(service.tmp / "b.tsv", second, t0 + 1e5)), "-k", "20"
    )
    assert res.returncode == 0, res.stderr
    model = ServingModel.from_checkpoint(service.ckpt, "cpu", top_k=20)
    hits, rr, n = 0, 0.0, 0
    for items in second.values():
        for (top, _), nxt in zip(
            offline_recommendations(model, [items], k=20), items[1:], strict=False
        ):
            n += 1
            if nxt in top:
                hits += 1
                rr += 1 / (top.index(nxt) + 1)
    assert f"answered {n + len(second)}/{n + len(second)} clicks" in res.stdout
    assert f"live Recall@20={hits / n:.4f} MRR@20={rr / n:.4f} (n={n})" in res.stdout
