"""Every workaround for the embedded broker (Tansu 0.6, see ../shared/docs/kafka-broker.md).

Production runs on Apache Kafka; the demo and the tests run on Tansu, which speaks the Kafka
protocol with a few gaps. Each workaround here names the broker behaviour it works around,
and applies only to the embedded broker: :mod:`streamrec.kafka.clients` decides which broker
a configuration is for (``kafka.broker``, else the cluster id the broker answers with:
:data:`EMBEDDED_CLUSTER_IDS`) and adds these settings only there.
``tests/streamrec/test_tansu.py`` shows each quirk on the embedded broker.

* Group joins wait about ``session.timeout.ms / 2``: :data:`GROUP_TIMEOUTS` (consumers that
  join a group) and :data:`FAUST_APP_SETTINGS` (Faust's 60 s default made a worker take
  ~35 s to be ready).
* An empty fetch is held for the whole ``fetch.wait.max.ms`` even when data arrives:
  :data:`FETCH_MAX_WAIT_MS` (and Faust's hard-coded 1500 ms is replaced by the engine's
  transport, :mod:`streamrec.engines.faust.transport`).
* ListOffsets(LATEST) is the base offset of the last batch + 1, not the log end:
  :func:`true_end_offsets` (native recovery) and :func:`patch_faust_highwaters` (Faust).
  High watermarks and lag are wrong there, so Faust's recovery consistency check is off,
  and the lag the workers export is raised to what they have read
  (:func:`streamrec.kafka.clients.lag_by_partition`). The clicks partitions' end bounds
  (what a state's recorded position must lie below, ``streamrec.serving.input_topic``) add
  :data:`END_UNDER_REPORT` to the reported end: the true end would need a read past it, and
  a live partition never goes idle.
* aiokafka cannot init an idempotent producer on it (InitProducerId v0 only), and tailing
  consumers can skip records while several producers write: producers here are not
  idempotent (:data:`PRODUCER_SETTINGS`), and outputs are checked by a fresh read from
  offset 0 (``streamrec.kafka.clients.read_topic``).
* Transactions are accepted but not isolated: a ``read_committed`` consumer (every consumer
  here is one) still reads the records of aborted transactions. Not worked around; on Kafka
  they are never served.
* A group join costs seconds: read-only tools assign partitions instead of subscribing
  (:func:`assign_all`; harmless on Kafka).
* A leader that leaves while its group re-forms (another member left first) stays the
  group's leader: every later member waits for its assignment forever. Consumers that
  subscribe call :class:`JoinWatch`, which frees the group (:func:`release_departed_leader`).
* Not worked around, only measured: every record batch is one object of its in-memory store,
  and every fetch that has data to return first lists every batch object of the partition,
  with no retention (DeleteRecords is unimplemented). A consumer tailing a log at a steady
  rate costs the broker in proportion to the batches written so far: at 100 records/s it
  used 6% of a core with 1k batches in the log and 92% with 43k
  (``bench/results/tansu-tail-cost.md``), and long soaks saturate it
  (``bench/results/soak.md``). Benchmarks on it stay short, or low-rate, or batch their
  producers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, TopicPartition

#: cluster ids of the embedded broker: the one :class:`streamrec.kafka.embedded.EmbeddedBroker`
#: gives it, and Tansu's default (any Tansu has the quirks below)
EMBEDDED_CLUSTER_IDS = ("streamrec-embedded", "tansu_cluster")
#: consumer group timeouts: a join completes in about half the session timeout
GROUP_TIMEOUTS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
#: the longest wait of an empty fetch, which the embedded broker holds in full
FETCH_MAX_WAIT_MS = 10
#: the same for Faust, plus no recovery consistency check (it compares against the wrong
#: high watermark and raises ConsistencyError on restart)
FAUST_APP_SETTINGS: dict[str, Any] = {
    "broker_session_timeout": 6,
    "broker_heartbeat_interval": 1,
    "recovery_consistency_check": False,
}
#: records the reported end of a partition may lie below its true end: one producer batch (up
#: to librdkafka's default batch.num.messages). Added only on the embedded broker (on Kafka the
#: reported end is exact) to the bound a state's recorded position is checked against
#: (``streamrec.serving.input_topic``: a forged position below it freezes nothing for long)
END_UNDER_REPORT = 10_000
#: producers: not idempotent (see the module docstring)
PRODUCER_SETTINGS: dict[str, Any] = {"enable.idempotence": False}

#: a fresh consumer of no group, for reading past the reported ends
ReaderFactory = Callable[[], Consumer]
_faust_reader: ReaderFactory | None = None
log = logging.getLogger(__name__)


def true_end_offsets(
    reader: ReaderFactory,
    reported: Mapping[tuple[str, int], int],
    idle_timeout: float = 1.0,
    max_wait: float = 30.0,
) -> dict[tuple[str, int], int]:
    """End offsets found by reading past the reported ones; (topic, partition) -> offset.

    ``reader`` makes the consumer that reads (built by the caller, with the configuration's
    properties). Only for the embedded broker: on Kafka the reported ends are right.
    """
    result = dict(reported)
    if not reported:
        return result
    consumer = reader()
    try:
        # Connect first: a fresh client's first fetch can take longer than the idle timeout on
        # a busy machine, and stopping then would silently keep the under-reported offsets.
        consumer.list_topics(timeout=max_wait)
        consumer.assign([TopicPartition(t, p, max(o, 0)) for (t, p), o in reported.items()])
        start = last = time.monotonic()
        while time.monotonic() - last < idle_timeout and time.monotonic() - start < max_wait:
            for msg in consumer.consume(num_messages=10_000, timeout=0.1):
                if msg.error() is not None:
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                # set on every record consume() returns without an error
                assert topic is not None and partition is not None and offset is not None
                key = (topic, partition)
                result[key] = max(result[key], offset + 1)
                last = time.monotonic()
    finally:
        consumer.close()
    return result


def monkeypatch(target: object, **attributes: Any) -> None:
    """Set ``attributes`` on a third-party class or function: the Faust patches here and in
    :mod:`streamrec.engines.faust.compat`. Dynamic on purpose: assigning to a method of a
    class is what a type checker rightly refuses everywhere else."""
    for name, value in attributes.items():
        setattr(target, name, value)


def patch_faust_highwaters(reader: ReaderFactory) -> None:
    """Quirk: ListOffsets(LATEST) answers the base offset of the last record batch + 1.

    Faust reads a changelog only up to that "highwater" when it rebuilds a table, so on the
    embedded broker it silently dropped the last batch of every changelog partition (tables
    came back stale after a lost data directory). Patched, Faust's highwaters are the
    :func:`true_end_offsets` read by ``reader``'s consumers. Idempotent; for the embedded
    broker only.
    """
    global _faust_reader
    _faust_reader = reader
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread, "_streamrec_patched", False):
        return
    original = AIOKafkaConsumerThread._highwaters

    async def _highwaters(self: Any, partitions: Any) -> Mapping[Any, int]:
        reported = await original(self, partitions)
        if _faust_reader is None or self.consumer.in_transaction:
            return reported
        by_key = {(tp.topic, tp.partition): int(o) for tp, o in reported.items() if o is not None}
        corrected = await asyncio.to_thread(true_end_offsets, _faust_reader, by_key)
        return {tp: corrected.get((tp.topic, tp.partition), o) for tp, o in reported.items()}

    monkeypatch(AIOKafkaConsumerThread, _highwaters=_highwaters, _streamrec_patched=True)


def assign_all(consumer: Consumer, topic: str, partitions: int, start: int) -> None:
    """Read the ``partitions`` of ``topic`` from ``start`` without joining a group (a join
    waits for half the session timeout here); for tools that only read."""
    consumer.assign([TopicPartition(topic, p, start) for p in range(partitions)])


# -- a departed leader ------------------------------------------------------------------------
#: session timeouts a member waits for an assignment before :class:`JoinWatch` acts (a join
#: here takes about half of one)
DEPARTED_LEADER_AFTER_SESSIONS = 3
#: assignment protocols a probe offers: the group's own is among them (librdkafka's default
#: is range, then roundrobin)
PROBE_PROTOCOLS = ("range", "roundrobin", "cooperative-sticky")


def release_departed_leader(
    client_config: Mapping[str, Any],
    group: str,
    topics: Sequence[str],
    session_timeout_ms: int = 6000,
) -> str | None:
    """Quirk: a leader that leaves its group while the group re-forms stays its leader.

    Tansu (0.6, also its main branch as of this writing) removes a member that leaves a
    *forming* group without clearing the group's leader when that member was it (leaving a
    formed group clears it, and so does a leader missing its heartbeats). Every member that
    joins later is told that the departed member leads, waits for the assignment it never
    sends, and rejoins, forever: the group's state reads UNKNOWN and no member gets a
    partition. It happens when two members stop and the leader is not the first to leave
    (issue 19: a worker frozen past its session timeout lost the lead to the other one, which
    was then stopped second). Only the expiry path clears the lead, so the departed leader is
    made a member again, to expire after one session timeout:

    1. join as a new member (a probe) to learn the group's leader from the join response;
    2. a heartbeat as that leader answering UNKNOWN_MEMBER_ID shows that it is no member (on
       Apache Kafka a leader always is one: nothing more is done);
    3. join under the leader's member id; the broker expires it after the session timeout,
       and the next join of a waiting member makes that member the leader.

    Returns the departed leader's member id, or None when there was none. The probe leaves
    (or, when the broker made it the leader, expires). Plaintext connections only (the
    embedded broker's); on another protocol nothing is done.
    """
    if str(client_config.get("security.protocol", "PLAINTEXT")).upper() != "PLAINTEXT":
        return None
    return asyncio.run(
        _release_departed_leader(
            str(client_config["bootstrap.servers"]), group, list(topics), session_timeout_ms
        )
    )


async def _release_departed_leader(
    bootstrap: str, group: str, topics: list[str], session_timeout_ms: int
) -> str | None:
    from aiokafka.client import AIOKafkaClient, ConnectionGroup, CoordinationType
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
    from aiokafka.errors import UnknownMemberIdError
    from aiokafka.protocol.group import HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest

    metadata = ConsumerProtocolMemberMetadata(0, topics, b"").encode()
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id="streamrec-group-repair")
    await client.bootstrap()
    try:
        node = await client.coordinator_lookup(CoordinationType.GROUP, group)

        async def send(request: Any) -> Any:
            return await client.send(node, request, group=ConnectionGroup.COORDINATION)

        def join(member_id: str) -> Any:
            protocols = [(name, metadata) for name in PROBE_PROTOCOLS]
            timeout = session_timeout_ms
            return JoinGroupRequest(group, timeout, timeout, member_id, None, "consumer", protocols)

        probe = (await send(join(""))).member_id  # MEMBER_ID_REQUIRED names the new id
        joined = await send(join(probe))
        leader = joined.leader_id
        if joined.error_code != 0 or not leader or leader == probe:
            return None  # no leader to free (the probe leads, or joined nothing)
        await send(LeaveGroupRequest(group, probe))
        beat = await send(HeartbeatRequest(group, joined.generation_id, leader))
        if beat.error_code != UnknownMemberIdError.errno:
            return None  # the leader is a member: nothing of ours to fix
        await send(join(leader))
        return str(leader)
    finally:
        await client.close()


class JoinWatch:
    """Frees a group held by a departed leader (:func:`release_departed_leader`) for a
    consumer that waits too long for its partitions.

    The consumer calls :meth:`waiting` when it subscribes and when its partitions are
    revoked or lost, :meth:`assigned` when it gets an assignment (an empty one included), and
    :meth:`check` on every turn of its loop; after ``DEPARTED_LEADER_AFTER_SESSIONS`` session
    timeouts without an assignment, ``check`` runs the repair in a thread of its own (again
    after as long, while the wait goes on). ``enabled`` is for the embedded broker only
    (:func:`streamrec.kafka.clients.is_embedded`): on Apache Kafka a member waits that long
    only while a rebalance is held up, and a probe would cost one more rebalance.
    """

    def __init__(
        self,
        client_config: Mapping[str, Any],
        group: str,
        topics: Sequence[str],
        session_timeout_ms: int,
        *,
        enabled: bool = True,
    ) -> None:
        self.client_config, self.group, self.topics = dict(client_config), group, list(topics)
        self.enabled = enabled
        self.session_timeout_ms = session_timeout_ms
        self.after_s = DEPARTED_LEADER_AFTER_SESSIONS * session_timeout_ms / 1000
        self.released: list[str] = []
        self._since: float | None = None
        self._thread: threading.Thread | None = None

    def waiting(self) -> None:
        self._since = time.monotonic()

    def assigned(self) -> None:
        self._since = None

    def check(self) -> None:
        since = self._since
        if not self.enabled or since is None or time.monotonic() - since < self.after_s:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._since = time.monotonic()
        self._thread = threading.Thread(
            target=self._release, name="streamrec-group-repair", daemon=True
        )
        self._thread.start()

    def _release(self) -> None:
        try:
            leader = release_departed_leader(
                self.client_config, self.group, self.topics, self.session_timeout_ms
            )
        except Exception as exc:  # a repair that fails is retried after another wait
            log.warning(
                "group %s: no assignment yet; checking its leader failed: %s", self.group, exc
            )
            return
        if leader is not None:
            self.released.append(leader)
            log.warning(
                "group %s: its leader %s had left while the group re-formed, and the embedded "
                "broker kept it as leader (no member could get partitions); it is released "
                "and expires after the session timeout",
                self.group,
                leader,
            )
