"""The native worker's checkpoint order under broker failures, driven on demand through the
checkpoint's clients (a producer whose deliveries the test acknowledges or refuses, a consumer
whose commit fails), with a real RocksDB partition: changelog -> acknowledged -> offsets
committed -> RocksDB. No timing, no kill."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamrec.engines.common import DeliveryError, Outputs
from streamrec.engines.native.checkpoint import Checkpoints
from streamrec.engines.native.store import RocksDBPartition
from streamrec.metrics import Metrics
from streamrec.serving.state_store import SESSIONS
from streamrec.settings import load_settings

CLICKS, CHANGELOG = "clicks", "app-state-changelog"


@dataclass
class _Msg:
    _topic: str
    _partition: int
    _offset: int

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


@dataclass
class Broker:
    """Stands in for the broker behind the checkpoint's producer and consumer: records are
    held until :meth:`deliver` acknowledges them (or refuses those of ``refuse``); commits
    are recorded, or fail with ``commit_error``. ``events`` is what happened, in order."""

    refuse: set[str] = field(default_factory=set)
    commit_error: int | None = None
    queued: list[tuple[str, int, Any]] = field(default_factory=list)
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    commits: list[dict[int, int]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    on_commit: Any = None

    # the producer
    def produce(self, topic: str, value: Any, key: Any = None, **kw: Any) -> None:
        self.queued.append((topic, kw.get("partition", 0), kw["on_delivery"]))

    def deliver(self) -> None:
        for topic, partition, callback in self.queued:
            if topic in self.refuse:
                callback(
                    KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), _Msg(topic, partition, -1)
                )
                self.events.append(f"refused {topic}")
                continue
            end = self.ends.get((topic, partition), -1) + 1
            self.ends[(topic, partition)] = end
            callback(None, _Msg(topic, partition, end))
            self.events.append(f"delivered {topic}")
        self.queued.clear()

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        self.deliver()
        return 0

    def __len__(self) -> int:
        return len(self.queued)

    # the consumer
    def commit(self, offsets: list[Any], asynchronous: bool = True) -> None:
        if self.on_commit is not None:
            self.on_commit()
        if self.commit_error is not None:
            self.events.append("commit failed")
            raise KafkaException(KafkaError(self.commit_error))
        self.commits.append({tp.partition: tp.offset for tp in offsets})
        self.events.append("commit")


def _checkpoints(broker: Broker, part: RocksDBPartition) -> Checkpoints:
    parts = {0: part}
    # the broker kind named, so that no cluster is asked (nothing listens on port 9)
    outputs = Outputs(load_settings(kafka={"bootstrap_servers": "127.0.0.1:9", "broker": "kafka"}))
    ck = Checkpoints(broker, outputs, parts, CLICKS, CHANGELOG, Metrics())  # type: ignore[arg-type]  # a stand-in consumer
    outputs.producer = broker  # type: ignore[assignment]  # a stand-in for confluent's Producer
    return ck


def _durable(path: Path) -> tuple[bytes | None, bytes | None, int]:
    """What a restart finds in the partition's RocksDB."""
    p = RocksDBPartition(path, 0)
    try:
        return p.db.get(SESSIONS + b"a"), p.db.get(SESSIONS + b"b"), p.changelog_offset
    finally:
        p.close()


def _first_checkpoint(tmp_path: Path, broker: Broker) -> tuple[Checkpoints, RocksDBPartition]:
    part = RocksDBPartition(tmp_path / "0", 0)
    ck = _checkpoints(broker, part)
    part.write(SESSIONS, "a", b"1")
    ck.begin({0: 10}, 0.0)
    assert ck.finish(block=True)
    assert broker.commits == [{0: 10}]
    return ck, part


def test_offsets_are_committed_after_the_changelog_is_acknowledged_and_before_rocksdb(
    tmp_path: Path,
) -> None:
    broker = Broker()
    ck, part = _first_checkpoint(tmp_path, broker)
    part.write(SESSIONS, "b", b"2")
    ck.begin({0: 20}, 0.0)
    seen_at_commit = []
    broker.on_commit = lambda: seen_at_commit.append(
        (part.db.get(SESSIONS + b"b"), part.changelog_offset, list(broker.queued))
    )
    assert not ck.finish(block=False)  # the changelog record is not acknowledged yet
    assert broker.commits == [{0: 10}] and part.db.get(SESSIONS + b"b") is None
    broker.deliver()
    assert ck.finish(block=False)
    assert broker.commits == [{0: 10}, {0: 20}]
    # at the commit: the changelog had it, RocksDB not yet
    assert seen_at_commit == [(None, 0, [])]
    part.close()
    assert _durable(tmp_path / "0") == (b"1", b"2", 1)
    assert broker.events == ["delivered " + CHANGELOG, "commit", "delivered " + CHANGELOG, "commit"]


def test_a_refused_changelog_record_stops_without_committing_or_writing_rocksdb(
    tmp_path: Path,
) -> None:
    broker = Broker()
    ck, part = _first_checkpoint(tmp_path, broker)
    part.write(SESSIONS, "a", b"changed")
    part.write(SESSIONS, "b", b"2")
    ck.begin({0: 20}, 0.0)
    broker.refuse = {CHANGELOG}
    with pytest.raises(DeliveryError):
        ck.finish(block=True)
    assert broker.commits == [{0: 10}]  # nothing more committed: the input is read again
    part.close()
    assert _durable(tmp_path / "0") == (b"1", None, 0)  # the database is not ahead


def test_a_refused_output_of_the_interval_stops_the_checkpoint_too(tmp_path: Path) -> None:
    broker = Broker()
    ck, part = _first_checkpoint(tmp_path, broker)
    ck.outputs.produce("recs", b"{}", b"k")  # an answer of the interval, refused
    part.write(SESSIONS, "b", b"2")
    ck.begin({0: 20}, 0.0)
    broker.refuse = {"recs"}
    with pytest.raises(DeliveryError):
        ck.finish(block=True)
    assert broker.commits == [{0: 10}]
    part.close()
    assert _durable(tmp_path / "0") == (b"1", None, 0)


def test_a_failed_offset_commit_is_not_fatal_and_the_state_is_still_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit refused (a rebalance under way): the changelog has the states, so they go to
    RocksDB; the next owner reads the events again and the states' offsets mark them applied."""
    broker = Broker()
    ck, part = _first_checkpoint(tmp_path, broker)
    part.write(SESSIONS, "b", b"2")
    ck.begin({0: 20}, 0.0)
    broker.commit_error = KafkaError.REBALANCE_IN_PROGRESS
    with caplog.at_level(logging.WARNING):
        assert ck.finish(block=True)
    assert "offset commit failed" in caplog.text
    assert broker.commits == [{0: 10}] and ck.in_flight is None
    part.close()
    assert _durable(tmp_path / "0") == (b"1", b"2", 1)


def test_a_lost_partition_is_forgotten_by_the_checkpoint_begun_and_the_committed_offsets(
    tmp_path: Path,
) -> None:
    broker = Broker()
    ck, part = _first_checkpoint(tmp_path, broker)
    assert ck.committed == {0: 10}
    ck.begin({0: 20}, 0.0)
    ck.forget(0)
    assert ck.committed == {}
    assert ck.in_flight is not None and ck.in_flight.offsets == {}
    part.close()
