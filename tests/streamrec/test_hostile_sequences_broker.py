"""Issue 19's broker cases, each through the embedded broker and real workers: a re-created
clicks topic, a producer with another partitioner, a forged state on the changelog, a stray
record on the changelog, answers given again after kill -9. (The clock sequences run in the
core: test_hostile_sequences.py; kill -9 mid-stream: test_worker_e2e.py; the archiver:
test_archive.py.)"""

from __future__ import annotations

import base64
import json
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from test_worker_e2e import N_ITEMS, PARTITIONS, Service, wait_for

from streamrec.kafka.clients import TopicSpec, ensure_topics, topic_facts
from streamrec.kafka.partitioners import partition_function
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state import SessionState
from streamrec.testing import click, offline_recommendations

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[16]), seed=1)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    return save_checkpoint(path, model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)]).path


@pytest.fixture
def svc(
    kafka_bootstrap: str, unique_name: Callable[[str], str], checkpoint: Path, tmp_path: Path
) -> Any:
    with Service(kafka_bootstrap, unique_name, checkpoint, tmp_path) as s:
        yield s


def user_clicks(users: list[str], n: int, tag: str, t0: float) -> list[tuple[str, bytes]]:
    """``n`` clicks of each user (one session each), interleaved, with event ids (unique:
    these tests are not about click ids)."""
    return [
        (
            u,
            click(
                f"{u}-s", f"i{(j * 3 + i) % N_ITEMS}", user=u, t=t0 + j, event_id=f"{tag}{j}-{u}"
            ),
        )
        for j in range(n)
        for i, u in enumerate(users)
    ]


def answers_of(svc: Service, tag: str) -> dict[str, dict[str, Any]]:
    """Answers to the clicks whose event ids start with ``tag``, by click id."""
    return {
        r["click_id"]: r
        for r in svc.recommendations()
        if r["click_id"].split("/")[-1].startswith(tag)
    }


def wait_answers(svc: Service, tag: str, n: int, timeout: float = 120) -> dict[str, dict[str, Any]]:
    wait_for(lambda: len(answers_of(svc, tag)) >= n, timeout, f"{tag}: fewer than {n} answers")
    return answers_of(svc, tag)


def test_returning_users_after_the_clicks_topic_is_recreated(svc: Service) -> None:
    """Issue 19: the clicks topic deleted and created again restarts its offsets at 0; every
    click of a returning user was flagged a duplicate and never applied. Positions now name
    the topic's incarnation (its topic id): the returning users' clicks are applied."""
    users = [f"ret{i}" for i in range(8)]
    t0 = time.time() - 600
    w = svc.start_worker(svc.tmp / "data")
    svc.produce(user_clicks(users, 4, "a", t0))
    wait_answers(svc, "a", 32)
    assert w.stop() == 0
    before = topic_facts(svc.conf, svc.clicks).topic_id
    admin = AdminClient({**svc.conf, "log_level": 0})
    for f in admin.delete_topics([svc.clicks]).values():
        f.result(30)
    wait_for(lambda: svc.clicks not in admin.list_topics(timeout=10).topics, 30, "not deleted")
    ensure_topics(svc.conf, [TopicSpec(svc.clicks, PARTITIONS)])
    assert topic_facts(svc.conf, svc.clicks).topic_id != before
    svc.produce(user_clicks(users, 3, "b", t0 + 60))  # offsets 0.. again
    svc.start_worker(svc.tmp / "data")
    again = wait_answers(svc, "b", 24, timeout=150)
    assert not [c for c, r in again.items() if r["duplicate"]]
    # the sessions went on: each state holds the clicks of both lives of the topic
    wait_for(
        lambda: all(s.n_events == 7 for s in svc.changelog_sessions().values()),
        60,
        "sessions did not go on after the topic was re-created",
    )


def test_a_burst_from_a_few_keys_ends_no_other_session(svc: Service) -> None:
    """Issue 19, item 1, through a worker that sweeps every second: 6 keys sending 60 clicks
    each at +23 h (all dead-lettered) and then at +55 min (under ``max_ahead_seconds``:
    accepted) moved the partitions' clocks, and the sweep ended 40 of 40 victim sessions.
    With one vote per key, a minority of a partition's keys cannot move its clock: every
    victim's session goes on. (More sequences, in the core: test_hostile_sequences.py.)"""
    svc.settings["state.sweep_interval_seconds"] = 1.0
    victims = [f"v{i}" for i in range(40)]  # about 13 a partition: every clock is trusted
    now = time.time()
    svc.start_worker()
    svc.produce(user_clicks(victims, 1, "a", now - 5))
    wait_answers(svc, "a", 40)
    attack = [
        (m, click(f"{m}-s", "i1", user=m, t=now + ahead + j * 0.01, event_id=f"x{ahead}-{j}-{m}"))
        for ahead in (23 * 3600, 55 * 60)
        for j in range(60)
        for m in (f"mallory{k}" for k in range(6))
    ]
    svc.produce(attack)
    wait_answers(svc, f"x{55 * 60}-", 360)  # the +55 min clicks are accepted, and voted
    wait_for(lambda: len(svc.read(svc.dead)) >= 360, 60, "the +23 h clicks: no dead letters")
    dead = [json.loads(m.value()) for m in svc.read(svc.dead)]
    assert [d["reason"] for d in dead] == ["timestamp_out_of_range"] * 360
    time.sleep(3)  # sweeps run at the partitions' clocks
    svc.produce(user_clicks(victims, 1, "b", now))
    wait_answers(svc, "b", 40)
    sessions = svc.changelog_sessions()
    assert {v: sessions[v].n_events for v in victims} == dict.fromkeys(victims, 2)


def _key_on_two_partitions() -> str:
    """A user id that librdkafka's and Java's partitioners put on different partitions."""
    crc, mm = partition_function("consistent_random"), partition_function("murmur2_random")
    return next(
        u
        for i in range(100)
        if crc((u := f"user{i}").encode(), PARTITIONS) != mm(u.encode(), PARTITIONS)
    )


def test_a_producer_with_another_partitioner_is_dead_lettered_not_forked(svc: Service) -> None:
    """Issue 19: a producer with Java's murmur2 put one user's clicks on a second partition;
    no dead letter, and the answers forked. Now the clicks on the partition the setting
    (``consistent_random``, librdkafka's) does not give the key are dead-lettered
    ``wrong_partition``, and the user's answers are those of its one session."""
    user = _key_on_two_partitions()
    java = Producer({**svc.conf, "partitioner": "murmur2_random", "log_level": 0})
    items = [f"i{(7 * j) % N_ITEMS}" for j in range(6)]
    t0 = time.time() - 60
    svc.start_worker()
    for j, item in enumerate(items):
        value = click("s", item, user=user, t=t0 + j, event_id=f"p{j}")
        (svc.producer if j % 2 == 0 else java).produce(svc.clicks, value, user.encode())
        assert svc.producer.flush(30) == 0 and java.flush(30) == 0
    got = wait_answers(svc, "p", 3)
    wait_for(lambda: len(svc.read(svc.dead)) >= 3, 60, "no dead letters")
    dead = [json.loads(m.value()) for m in svc.read(svc.dead)]
    assert sorted(d["reason"] for d in dead) == ["wrong_partition"] * 3
    kept = items[0::2]
    model = ServingModel.from_checkpoint(svc.ckpt, "cpu", top_k=20)
    ref = offline_recommendations(model, [kept], k=20)
    answers = sorted(got.values(), key=lambda r: r["offset"])
    assert [r["item_id"] for r in answers] == kept
    for r, (_, scores) in zip(answers, ref, strict=True):
        np.testing.assert_allclose(r["scores"], scores, rtol=1e-4, atol=1e-5)


def _changelog(svc: Service) -> str:
    return f"{svc.app_id}-state-changelog"


def test_a_forged_state_on_the_changelog_freezes_nobody(svc: Service) -> None:
    """Issue 19: a forged, well-formed state for a victim (offset 10^12), written to the
    changelog, froze the victim's clicks after the next recovery (all flagged duplicate).
    Recovered positions beyond the partition's end are no duplicate source."""
    victim = "victim"
    part = zlib.crc32(victim.encode()) % PARTITIONS
    t0 = time.time() - 300
    datadir = svc.tmp / "data"
    w = svc.start_worker(datadir)
    svc.produce(user_clicks([victim], 2, "a", t0))
    wait_answers(svc, "a", 2)
    assert w.stop() == 0
    incarnation = topic_facts(svc.conf, svc.clicks).topic_id
    forged = SessionState(
        f"{victim}-s", np.zeros(16, np.float32), "forged", victim, ["i1"], part, 10**12
    )
    forged.incarnation = incarnation
    p = Producer({**svc.conf, "log_level": 0})
    p.produce(_changelog(svc), forged.to_bytes(), f"s/u:{victim}".encode(), partition=part)
    assert p.flush(30) == 0
    shutil.rmtree(datadir)  # an empty disk: the whole changelog is replayed
    svc.start_worker(datadir)
    svc.produce(user_clicks([victim], 4, "b", t0 + 10))
    got = wait_answers(svc, "b", 4, timeout=150)
    assert [r["duplicate"] for r in got.values()] == [False] * 4


def test_a_stray_record_on_the_changelog_does_not_stop_recovery(svc: Service) -> None:
    """Issue 19: one record with a non-state key on the changelog made every empty-disk
    restart fail with the layout error (whose remedy throws away every user's history). It
    is skipped, counted and dead-lettered; the users' states come back and their sessions go
    on."""
    users = [f"u{i}" for i in range(6)]
    t0 = time.time() - 300
    datadir = svc.tmp / "data"
    w = svc.start_worker(datadir)
    svc.produce(user_clicks(users, 2, "a", t0))
    wait_answers(svc, "a", 12)
    assert w.stop() == 0
    p = Producer({**svc.conf, "log_level": 0})
    for q in range(PARTITIONS):
        p.produce(_changelog(svc), b"not a state", b"junk", partition=q)
        p.produce(_changelog(svc), b"x", None, partition=q)
    assert p.flush(30) == 0
    shutil.rmtree(datadir)
    w = svc.start_worker(datadir)
    svc.produce(user_clicks(users, 2, "b", t0 + 10))
    got = wait_answers(svc, "b", 12, timeout=150)
    assert w.proc.poll() is None, w.log_path.read_text()[-2000:]
    assert not any(r["duplicate"] for r in got.values())

    # each stray record is a dead letter naming the changelog, its partition, offset and key
    def strays() -> set[tuple[int, str | None, bytes]]:
        return {
            (d["partition"], d["key_b64"], base64.b64decode(d["original_b64"]))
            for d in (json.loads(m.value()) for m in svc.read(svc.dead))
            if d["reason"] == "changelog_record" and d["topic"] == _changelog(svc)
        }

    junk = base64.b64encode(b"junk").decode()
    want = {(q, k, v) for q in range(PARTITIONS) for k, v in ((junk, b"not a state"), (None, b"x"))}
    wait_for(lambda: strays() == want, 60, "the stray changelog records were not dead-lettered")
    wait_for(
        lambda: (
            {u: s.n_events for u, s in svc.changelog_sessions().items()} == dict.fromkeys(users, 4)
        ),
        60,
        "the users' sessions did not go on from their recovered states",
    )


@pytest.mark.parametrize("wipe", [False, True], ids=["data-kept", "data-wiped"])
def test_every_answer_given_before_a_kill_is_flagged_when_given_again(
    svc: Service, wipe: bool
) -> None:
    """Issue 19: after kill -9, the native worker answered clicks it had answered before
    with ``duplicate: false`` (10 of them over five kills with the data kept, 160 with it
    wiped): its state reached the changelog at the checkpoint, a second after its answers.
    With no checkpoint before the kill (a long commit interval), every click is redelivered:
    each was answered once unflagged, and each answer after the restart is flagged."""
    svc.settings["worker.commit_interval_s"] = 600
    users = [f"k{i}" for i in range(6)]
    datadir = svc.tmp / "data"
    w = svc.start_worker(datadir)
    svc.produce(user_clicks(users, 5, "a", time.time() - 300))
    first = wait_answers(svc, "a", 30)
    w.kill9()
    if wipe:
        shutil.rmtree(datadir)
    svc.start_worker(datadir)

    def again() -> list[dict[str, Any]]:
        return [r for r in svc.recommendations() if r["click_id"] in first]

    wait_for(lambda: len(again()) >= 60, 150, "the redelivered clicks were not all answered")
    answers = again()
    unflagged = [r["click_id"] for r in answers if not r["duplicate"]]
    assert sorted(unflagged) == sorted(first)  # one first answer each, no second one
    assert sorted(r["click_id"] for r in answers if r["duplicate"]) == sorted(first)
    assert {u: s.n_events for u, s in svc.changelog_sessions().items()} == dict.fromkeys(users, 5)
