"""Message sequences against the archiver (issue 19), through the embedded broker.

The hostile corpus (test_hostile.py) sends one bad message between good clicks; here each
case is a *sequence* that the archiver must turn into few files and archive exactly once:
event times alternating between hours, scattered over many hours, dead letters between them,
a crash between the renames of one range, a resume offset above the broker's reported end.
Every check compares the archive with a fresh read of the topic from offset 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

from streamrec.kafka.clients import TopicSpec, ensure_topics, read_topic
from streamrec.loop.archive import Storage, hour_of, incomplete_ranges, list_archive
from streamrec.loop.archiver import Archiver
from streamrec.serving.events import ClickEvent, decode
from streamrec.testing import click

pytestmark = [pytest.mark.broker, pytest.mark.slow]
T0 = 1_767_225_600.0  # 2026-01-01T00:00Z
HOUR = 3600.0


@dataclass(frozen=True)
class Sequence:
    """Messages sent in order to one partition, and the most files they may become."""

    name: str
    messages: list[tuple[bytes, bytes | None]]
    max_files: int
    archiver: dict[str, Any] = field(default_factory=dict)


def _clicks(times: list[float], *, dead_every: int = 0) -> list[tuple[bytes, bytes | None]]:
    out: list[tuple[bytes, bytes | None]] = []
    for j, t in enumerate(times):
        key = f"s{j % 40}".encode()
        if dead_every and j % dead_every == dead_every - 1:
            out.append((key, b"{not json"))  # dead-lettered by the worker: not archived
        else:
            out.append((key, click(key.decode(), f"i{j % 30}", t=t, event_id=f"e{j}")))
    return out


SEQUENCES = [
    # one file per click on main (3,000 files): the hours alternate at every click
    Sequence("two hours alternating", _clicks([T0 + (j % 2) * HOUR + j for j in range(3000)]), 4),
    # more hours than a range may hold: a range is written every 24 hours, 100 files in all
    Sequence("a hundred hours, each once", _clicks([T0 + j * HOUR for j in range(100)]), 100),
    Sequence(
        "three hours round robin, dead letters between",
        _clicks([T0 + (j % 3) * HOUR + j for j in range(1500)], dead_every=7),
        6,
    ),
    Sequence(
        "two hours alternating, at most one open",
        _clicks([T0 + (j % 2) * HOUR for j in range(40)]),
        40,
        {"max_open_hours": 1},
    ),
]


def archived(directory: Path) -> list[tuple[int, int]]:
    """(partition, offset) of every archived row; each file's rows lie in its range and hour."""
    storage = Storage(str(directory))
    rows: list[tuple[int, int]] = []
    for f in list_archive(storage):
        t = pq.read_table(storage.join(f.path), columns=["partition", "offset", "Time"])
        parts, offs, times = (t[c].to_pylist() for c in ("partition", "offset", "Time"))
        assert all(
            p == f.partition and f.first <= o <= f.last for p, o in zip(parts, offs, strict=True)
        )
        assert {hour_of(x) for x in times} == {f.hour}, f.path
        rows += zip(parts, offs, strict=True)
    return rows


def valid_clicks(conf: dict[str, Any], topic: str) -> set[tuple[int, int]]:
    out = set()
    for m in read_topic(conf, topic, idle_timeout=1.0):
        ev = decode(m.value())
        if isinstance(ev, ClickEvent) and ev.type == "click":
            out.add((m.partition(), m.offset()))
    return out


def _topic(bootstrap: str, name: Callable[[str], str]) -> tuple[dict[str, Any], str]:
    conf = {"bootstrap.servers": bootstrap}
    topic = name("clicks")
    ensure_topics(conf, [TopicSpec(topic, 1)])
    return conf, topic


def _send(conf: dict[str, Any], topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    p = Producer({**conf, "linger.ms": 5, "log_level": 0})
    for key, value in messages:
        p.produce(topic, key=key, value=value, partition=0)
    assert p.flush(30) == 0


@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: s.name)
def test_a_sequence_becomes_few_files_each_click_archived_once(
    seq: Sequence, kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    conf, topic = _topic(kafka_bootstrap, unique_name)
    _send(conf, topic, seq.messages)
    arch = tmp_path / "archive"
    a = Archiver(conf, topic, str(arch), group=topic, flush_interval_s=60, **seq.archiver)
    a.run(until_caught_up=True, idle_s=1.0, max_s=120)
    rows = archived(arch)
    assert len(rows) == len(set(rows)), "a click archived twice"
    assert set(rows) == valid_clicks(conf, topic), "a click missing, or a dead letter archived"
    files = list_archive(Storage(str(arch)))
    assert len(files) <= seq.max_files, f"{len(files)} files"


def test_a_crash_between_the_renames_of_one_range_is_archived_again_once(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """Three hours in one range: the archiver dies after the first of its three files is
    renamed. That file is never listed (its range is incomplete), the next archiver removes
    it and archives the range again: every click once."""
    conf, topic = _topic(kafka_bootstrap, unique_name)
    _send(conf, topic, _clicks([T0 + (j % 3) * HOUR + j for j in range(300)]))
    arch = tmp_path / "archive"

    class Crash(Exception):
        pass

    def crash(_f: object) -> None:
        raise Crash

    a = Archiver(conf, topic, str(arch), group=topic, flush_events=150, on_flush=crash)
    with pytest.raises(Crash):
        a.run(max_s=120)
    storage = Storage(str(arch))
    assert list_archive(storage) == [] and len(incomplete_ranges(storage)) == 1
    Archiver(conf, topic, str(arch), group=topic).run(until_caught_up=True, idle_s=1.0, max_s=120)
    rows = archived(arch)
    assert len(rows) == len(set(rows)) == 300 and set(rows) == valid_clicks(conf, topic)
    assert incomplete_ranges(storage) == []


class _SlowFirstFetch:
    """The archiver's consumer, except that its partitions stay paused (nothing is fetched)
    for the first ``hold`` consume calls after they are assigned, as on a loaded machine or a
    slow broker."""

    def __init__(self, consumer: Any, hold: int) -> None:
        self._consumer, self._hold = consumer, hold
        self._paused: list[Any] = []

    def subscribe(self, topics: list[str], on_assign: Any, **kwargs: Any) -> None:
        def assigned(consumer: Any, parts: list[Any]) -> None:
            on_assign(consumer, parts)
            consumer.pause(parts)
            self._paused = list(parts)

        self._consumer.subscribe(topics, on_assign=assigned, **kwargs)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        msgs = list(self._consumer.consume(num_messages=num_messages, timeout=timeout))
        if self._paused:
            self._hold -= 1
            if self._hold <= 0:
                self._consumer.resume(self._paused)
                self._paused = []
        return msgs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def test_until_caught_up_reads_past_a_reported_end_below_the_resume_offset(
    kafka_bootstrap: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    external_broker: bool,
) -> None:
    """Issue 19, case 7: after kill -9s the embedded broker reported an end offset below the
    offset the archiver resumed at, so ``--until-caught-up`` stopped before reading anything
    ("archived 0 clicks", 115 clicks never archived). Here: 100 clicks in one record batch
    (the reported end is then 1), the first 50 archived by an archiver that died before its
    commit, and a second archiver whose first fetches after the assignment come back empty."""
    conf, topic = _topic(kafka_bootstrap, unique_name)
    p = Producer({**conf, "linger.ms": 1000, "log_level": 0})
    for j in range(100):  # one flush after all of them: one record batch
        p.produce(topic, key=f"s{j}".encode(), value=click(f"s{j}", "i1", t=T0 + j), partition=0)
    assert p.flush(30) == 0
    arch = tmp_path / "archive"

    class Crash(Exception):
        pass

    def crash(_f: object) -> None:
        raise Crash

    first = Archiver(conf, topic, str(arch), group=topic, flush_events=50, on_flush=crash)
    with pytest.raises(Crash):
        first.run(max_s=120)
    assert len(archived(arch)) == 50  # renamed, never committed: the resume offset is 50
    second = Archiver(conf, topic, str(arch), group=topic)
    from confluent_kafka import TopicPartition

    _, reported = second.consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    if not external_broker:
        assert reported < 50  # the precondition: the reported end is below the resume offset
    # the archiver's consumer, wrapped: any object with its methods will do (a test seam)
    second.consumer = _SlowFirstFetch(second.consumer, hold=30)  # type: ignore[assignment]
    stats = second.run(until_caught_up=True, idle_s=0.5, max_s=120)
    assert stats.archived == 50, json.dumps(stats.__dict__)
    rows = archived(arch)
    assert len(rows) == len(set(rows)) == 100 and set(rows) == valid_clicks(conf, topic)
