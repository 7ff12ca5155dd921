"""``streamrec archive`` against a real broker: exactly once across crashes.

Every check compares the archive with a fresh read of the clicks topic from offset 0 (never
high watermarks), by (partition, offset).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer
from faulty_files import FaultyFiles, InjectedFault

from streamrec.kafka.clients import TopicSpec, committed_offsets, ensure_topics, read_topic
from streamrec.loop.archive import TMP_PREFIX, Storage, list_archive
from streamrec.loop.archiver import Archiver
from streamrec.serving.events import ClickEvent, decode
from streamrec.testing import click
from streamrec.tools.launch import settings_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]
PARTITIONS = 3
T0 = 1_767_225_600.0  # 2026-01-01T00:00Z


def archived_rows(directory: Path) -> list[tuple[int, int]]:
    storage = Storage(str(directory))
    rows: list[tuple[int, int]] = []
    for f in list_archive(storage):
        t = pq.read_table(storage.join(f.path), columns=["partition", "offset", "Time"])
        parts, offs = t["partition"].to_pylist(), t["offset"].to_pylist()
        assert all(
            p == f.partition and f.first <= o <= f.last for p, o in zip(parts, offs, strict=True)
        )
        rows += zip(parts, offs, strict=True)
    return rows


def valid_clicks(conf: dict, topic: str) -> set[tuple[int, int]]:
    out = set()
    for m in read_topic(conf, topic, idle_timeout=1.0):
        ev = decode(m.value())
        if isinstance(ev, ClickEvent) and ev.type == "click":
            out.add((m.partition(), m.offset()))
    return out


def produce(conf: dict, topic: str, start: int, n: int, bad_every: int = 0) -> None:
    p = Producer({**conf, "linger.ms": 5})
    for j in range(start, start + n):
        if bad_every and j % bad_every == 0:
            value = b"{not json" if j % 2 else click(f"s{j % 50}", None)  # both dead-lettered
        else:
            # event times span several hours, so files are cut at hour boundaries too
            value = click(f"s{j % 50}", f"i{j % 37}", t=T0 + j * 7.0, event_id=f"e{j}")
        p.produce(topic, key=f"s{j % 50}".encode(), value=value)
    assert p.flush(30) == 0


def start_archiver(bootstrap: str, topic: str, directory: Path, log: Path, *args: str):
    env = {
        **os.environ,
        **settings_env(
            {
                "kafka.bootstrap_servers": bootstrap,
                "topics.clicks": topic,
                "topics.partitions": PARTITIONS,
                "worker.app_id": topic,
            }
        ),
    }
    cmd = [sys.executable, "-m", "streamrec", "archive", "--dir", str(directory), *args]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def test_kill9_mid_file_then_restart_archives_each_click_once(
    isolated_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    conf = {"bootstrap.servers": isolated_bootstrap}
    topic = unique_name("clicks")
    ensure_topics(conf, [TopicSpec(topic, PARTITIONS)])
    arch = tmp_path / "archive"
    produce(conf, topic, 0, 3000, bad_every=23)
    a = start_archiver(isolated_bootstrap, topic, arch, tmp_path / "a1.log", "--flush-events", "97")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(list_archive(Storage(str(arch)))) < 4:
            assert a.poll() is None, (tmp_path / "a1.log").read_text()
            time.sleep(0.05)
        produce(conf, topic, 3000, 500, bad_every=23)  # the archiver is mid-stream
        a.kill()  # SIGKILL: buffers half full, maybe a file half written
        a.wait()
    finally:
        if a.poll() is None:
            a.kill()
    first = archived_rows(arch)
    assert 0 < len(first) < 3500
    # a temporary file left by a crash is ignored and removed on restart
    leftover = arch / "date=2026-01-01" / "hour=00" / f"{TMP_PREFIX}dead-p0-000000000000-1.parquet"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a file")
    produce(conf, topic, 3500, 500, bad_every=23)
    b = start_archiver(isolated_bootstrap, topic, arch, tmp_path / "a2.log", "--until-caught-up")
    assert b.wait(180) == 0, (tmp_path / "a2.log").read_text()
    rows = archived_rows(arch)
    want = valid_clicks(conf, topic)
    assert len(want) == 4000 - len(range(0, 4000, 23))  # dead letters are not clicks
    assert len(rows) == len(set(rows)), "a click archived twice"
    assert set(rows) == want, "a click missing, or a dead letter archived"
    assert not leftover.exists()


def test_crash_between_rename_and_commit_is_not_written_twice(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    conf = {"bootstrap.servers": kafka_bootstrap}
    topic = unique_name("clicks")
    ensure_topics(conf, [TopicSpec(topic, PARTITIONS)])
    produce(conf, topic, 0, 600)
    arch = str(tmp_path / "archive")

    class Crash(Exception):
        pass

    def crash(_f: object) -> None:  # after the rename, before the commit
        raise Crash

    a = Archiver(conf, topic, arch, group=topic, flush_events=50, on_flush=crash)
    with pytest.raises(Crash):
        a.run(max_s=120)
    written = archived_rows(tmp_path / "archive")
    assert len(written) == 50  # one file renamed, its offsets never committed
    b = Archiver(conf, topic, arch, group=topic, flush_events=30)  # cut elsewhere (see above)
    b.run(until_caught_up=True, idle_s=1.5, max_s=120)
    rows = archived_rows(tmp_path / "archive")
    assert len(rows) == len(set(rows)) == 600
    assert set(rows) == valid_clicks(conf, topic)


@pytest.mark.parametrize(
    ("step", "after"),
    [("write", False), ("sync", False), ("rename", False), ("sync_dir", True)],
    ids=["write-fails", "fsync-fails", "rename-fails", "crash-between-rename-and-commit"],
)
def test_a_failure_at_any_step_of_a_file_archives_each_click_once(
    kafka_bootstrap: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    step: str,
    after: bool,
) -> None:
    """The archiver's third file fails at one step (a full disk, a failed fsync or rename, or
    a crash after the rename and before the commit), driven through the storage's write steps
    (tests/streamrec/faulty_files.py), not by timing a kill. Nothing it committed is missing
    from the archive; a restart archives every valid click exactly once, and no temporary file
    is left."""
    conf = {"bootstrap.servers": kafka_bootstrap}
    topic = unique_name("clicks")
    ensure_topics(conf, [TopicSpec(topic, PARTITIONS)])
    produce(conf, topic, 0, 600, bad_every=23)
    want = valid_clicks(conf, topic)
    arch = tmp_path / "archive"
    files = FaultyFiles(step, nth=3, after=after)
    a = Archiver(conf, topic, Storage(arch, files=files), group=topic, flush_events=40)
    with pytest.raises(InjectedFault):
        a.run(until_caught_up=True, idle_s=1.0, max_s=120)
    assert files.failed and files.steps().count("rename") >= 2
    archived = set(archived_rows(arch))
    committed = committed_offsets(conf, topic, topic)
    for p, c in enumerate(committed):  # never a committed valid click that is not archived
        missing = {(q, o) for q, o in want if q == p and o < c} - archived
        assert not missing, f"partition {p}: committed {c}, clicks lost: {sorted(missing)[:5]}"
    if after:  # the file of the crash is there, its offsets not committed
        ends = {p: max(o for q, o in archived if q == p) for p, _ in archived}
        assert any(end >= committed[p] for p, end in ends.items())
    # files cut elsewhere than before: a range written again would not replace its old file
    b = Archiver(conf, topic, str(arch), group=topic, flush_events=25)
    b.run(until_caught_up=True, idle_s=1.0, max_s=120)
    rows = archived_rows(arch)
    assert len(rows) == len(set(rows)), "a click archived twice"
    assert set(rows) == want, "a click missing, or a dead letter archived"
    assert not [f for f in Storage(arch).list_files() if TMP_PREFIX in f]


def test_two_archivers_share_the_partitions(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    conf = {"bootstrap.servers": kafka_bootstrap}
    topic = unique_name("clicks")
    ensure_topics(conf, [TopicSpec(topic, PARTITIONS)])
    arch = tmp_path / "archive"
    a = start_archiver(kafka_bootstrap, topic, arch, tmp_path / "a.log", "--flush-events", "50")
    b = start_archiver(kafka_bootstrap, topic, arch, tmp_path / "b.log", "--flush-events", "50")
    try:
        time.sleep(4)  # both join the group (about session.timeout / 2 on Tansu)
        produce(conf, topic, 0, 2000, bad_every=31)
        want = valid_clicks(conf, topic)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(archived_rows(arch)) < len(want):
            time.sleep(0.5)
    finally:
        for p in (a, b):
            p.terminate()
            p.wait(30)
    rows = archived_rows(arch)
    assert len(rows) == len(set(rows)) and set(rows) == want
    # both took part: each reports what it archived when it stops
    counts = []
    for log in ("a.log", "b.log"):
        m = re.search(r"archived ([\d,]+) clicks", (tmp_path / log).read_text())
        assert m is not None, (tmp_path / log).read_text()[-2000:]
        counts.append(int(m[1].replace(",", "")))
    assert sum(counts) == len(want) and min(counts) > 0, counts


def test_until_caught_up_with_a_partition_that_gets_nothing_new(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """A second run where only one partition has new clicks exits once the others are
    known to be archived to their end (it used to wait for a message from every partition)."""
    conf = {"bootstrap.servers": kafka_bootstrap}
    topic = unique_name("clicks")
    ensure_topics(conf, [TopicSpec(topic, PARTITIONS)])
    produce(conf, topic, 0, 300)
    arch = str(tmp_path / "archive")
    Archiver(conf, topic, arch, group=topic).run(until_caught_up=True, idle_s=1.0, max_s=120)
    p = Producer({**conf, "log_level": 0})
    # all into partition 0: sessions whose keys the producers' partitioner puts there (a click
    # on another partition than its key's is dead-lettered, and so not archived)
    sessions = [s for j in range(300, 400) if zlib.crc32((s := f"s{j}").encode()) % PARTITIONS == 0]
    for j, sid in enumerate(sessions[:20], start=300):
        p.produce(topic, click(sid, "i1", t=T0 + j, event_id=f"e{j}"), sid, partition=0)
    assert p.flush(30) == 0
    second = Archiver(conf, topic, arch, group=topic)
    stats = second.run(until_caught_up=True, idle_s=1.0, max_s=90)
    assert stats.seconds < 90  # stopped by being caught up, not by max_s
    rows = archived_rows(tmp_path / "archive")
    assert len(rows) == len(set(rows)) == len(valid_clicks(conf, topic)) == 320


def test_the_archive_holds_exactly_what_the_worker_admits(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """Issue 19: a wrong key, no key, and times +2 h, -40 d and +23 h were dead-lettered by
    the worker and archived anyway (the archiver only decoded), and a click without a body
    time was archived with the archiver's wall time. The archiver now admits records with the
    worker's own decision (serving.admission), and archives a body-less click at its
    CreateTime, as the worker uses it."""
    conf = {"bootstrap.servers": kafka_bootstrap}
    topic = unique_name("clicks")
    ensure_topics(conf, [TopicSpec(topic, PARTITIONS)])
    now = time.time()
    p = Producer({**conf, "log_level": 0})
    for j in range(40):  # good clicks of 40 keys: the partitions' clocks are trusted
        p.produce(topic, click(f"g{j}", "i1", t=now - 60, event_id=f"g{j}"), f"g{j}")
    p.flush(30)
    hostile = [
        (b"mallory", click("h1", "i1", user="alice", t=now)),  # the body's key is alice
        (None, click("h2", "i1", t=now)),  # no key
        (b"h3", click("h3", "i1", t=now + 2 * 3600)),
        (b"h4", click("h4", "i1", t=now - 40 * 86400)),
        (b"h5", click("h5", "i1", t=now + 23 * 3600)),
    ]
    for key, value in hostile:
        p.produce(topic, value, key)
    created_ms = int((now - 30) * 1000)
    p.produce(topic, b'{"session_id": "nobody", "item_id": "i2"}', b"nobody", timestamp=created_ms)
    assert p.flush(30) == 0
    arch = tmp_path / "archive"
    Archiver(conf, topic, str(arch), group=topic).run(until_caught_up=True, idle_s=1.0, max_s=120)
    storage = Storage(str(arch))
    times: dict[str, float] = {}
    for f in list_archive(storage):
        t = pq.read_table(storage.join(f.path), columns=["SessionId", "Time"])
        times.update(zip(t["SessionId"].to_pylist(), t["Time"].to_pylist(), strict=True))
    assert set(times) == {f"g{j}" for j in range(40)} | {"nobody"}
    assert times["nobody"] == pytest.approx(created_ms / 1000.0)
