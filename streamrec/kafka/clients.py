"""Kafka plumbing shared by the commands, the benchmarks and the tests (confluent-kafka).

Every client of the product is built here (:func:`producer`, :func:`consumer`,
:func:`admin`) from one flat client configuration
(:meth:`streamrec.settings.KafkaSettings.confluent_config`): the librdkafka properties of
every client, ``producer:``/``consumer:``-prefixed properties of one kind of client, and
``streamrec:broker`` (``embedded``, ``kafka`` or ``auto``). A plain dict of librdkafka
properties works too (the tests' ``{"bootstrap.servers": ...}``).

Precedence, lowest first: what the call site asks for (``linger.ms``, ``fetch.wait.max.ms``,
...), what the broker needs (:mod:`streamrec.kafka.tansu` on the embedded broker;
idempotence and ``acks=all`` on Kafka), the user's properties, and last what the call site
must have for its guarantees (``group.id``, ``enable.auto.commit``, ``isolation.level``;
the settings refuse a mapping that sets one).

Which broker: ``streamrec:broker`` when it says ``embedded`` or ``kafka``; otherwise the
cluster is asked once per process (:func:`cluster_kind`): the embedded broker answers with
a cluster id of its own (:data:`streamrec.kafka.tansu.EMBEDDED_CLUSTER_IDS`). The same probe
is every command's first contact (:func:`connect`): a broker that does not answer within
:data:`CONNECT_TIMEOUT_S` ends the command with one line naming the bootstrap servers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from streamrec.errors import StreamrecError
from streamrec.kafka import tansu
from streamrec.settings import BROKER_KEY, CONSUMER_PREFIX, PRODUCER_PREFIX, Settings

#: seconds a command waits for the cluster's first answer before it gives up
CONNECT_TIMEOUT_S = 10.0
BrokerKind = Literal["embedded", "kafka"]
#: the broker kind found per bootstrap list (asked once per process)
_kinds: dict[str, BrokerKind] = {}


class KafkaUnreachable(StreamrecError, ConnectionError):
    """The cluster did not answer (the message is one line naming the bootstrap servers)."""


class KafkaConfigError(StreamrecError, ValueError):
    """librdkafka refused a property of the configuration."""


def role_config(
    conf: Mapping[str, Any], role: Literal["producer", "consumer", "admin"]
) -> dict[str, Any]:
    """The librdkafka properties of one kind of client: every client's, then the role's
    (prefix removed); the other role's and streamrec's own keys left out."""
    out = {k: v for k, v in conf.items() if ":" not in k}
    prefix = {"producer": PRODUCER_PREFIX, "consumer": CONSUMER_PREFIX}.get(role)
    if prefix is not None:
        out.update({k[len(prefix) :]: v for k, v in conf.items() if k.startswith(prefix)})
    return out


def with_broker(conf: Mapping[str, Any], kind: BrokerKind) -> dict[str, Any]:
    """``conf`` marked for a broker kind (no probe needed)."""
    return {**conf, BROKER_KEY: kind}


def probe(conf: Mapping[str, Any], timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Ask the cluster for its metadata; returns its cluster id. Raises
    :class:`KafkaUnreachable` (one line: the servers, the setting, librdkafka's reason)."""
    errors: list[str] = []
    props = role_config(conf, "admin")
    client = AdminClient({**props, "log_level": 0, "error_cb": lambda e: errors.append(e.str())})  # type: ignore[dict-item]  # callbacks are allowed
    servers = props.get("bootstrap.servers", "?")
    try:
        meta = client.list_topics(timeout=timeout)
    except KafkaException as exc:
        client.poll(0)  # serve error_cb: the reason librdkafka saw (refused, DNS, auth)
        reason = (errors[-1] if errors else str(exc.args[0] if exc.args else exc)).strip()
        raise KafkaUnreachable(
            f"no answer from the Kafka cluster at {servers} within {timeout:.0f} s "
            f"(bootstrap servers: kafka.bootstrap_servers, STREAMREC_KAFKA__BOOTSTRAP_SERVERS): "
            f"{reason}"
        ) from None
    return str(meta.cluster_id or "")


def cluster_kind(conf: Mapping[str, Any]) -> BrokerKind:
    """``embedded`` or ``kafka``: what ``conf`` says, else what the cluster answers (once per
    bootstrap list and process)."""
    said = conf.get(BROKER_KEY, "auto")
    if said == "embedded" or said == "kafka":
        return "embedded" if said == "embedded" else "kafka"
    servers = str(conf.get("bootstrap.servers", ""))
    if servers not in _kinds:
        cluster_id = probe(conf)
        _kinds[servers] = "embedded" if cluster_id in tansu.EMBEDDED_CLUSTER_IDS else "kafka"
    return _kinds[servers]


def connect(settings: Settings, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """A command's first contact with the cluster: probe it (one line and a non-zero exit
    when it does not answer) and return the client configuration marked with its kind."""
    conf = settings.kafka.confluent_config()
    probe(conf, timeout)  # always: an explicit broker kind must not skip the check
    return with_broker(conf, cluster_kind(conf))


def is_embedded(conf: Mapping[str, Any]) -> bool:
    return cluster_kind(conf) == "embedded"


def _build(factory: Callable[[dict[str, Any]], Any], props: dict[str, Any]) -> Any:
    try:
        return factory(props)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        raise KafkaConfigError(
            f"Kafka client configuration refused: {err} (see kafka.config, "
            "kafka.producer_config, kafka.consumer_config)"
        ) from None


def producer_config(
    conf: Mapping[str, Any], site: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A producer's properties: ``site`` defaults < the broker's needs < the user's."""
    kind = tansu.PRODUCER_SETTINGS if is_embedded(conf) else KAFKA_PRODUCER_SETTINGS
    return {**(site or {}), **kind, **role_config(conf, "producer")}


def consumer_config(
    conf: Mapping[str, Any],
    group: str,
    *,
    joins_group: bool = False,
    fixed: Mapping[str, Any] | None = None,
    site: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A consumer's properties: ``site`` defaults < the broker's needs (the embedded
    broker's group timeouts and short fetch wait) < the user's < ``fixed`` (group, offsets,
    isolation), which no configuration overrides."""
    kind: dict[str, Any] = {}
    if is_embedded(conf):
        kind["fetch.wait.max.ms"] = tansu.FETCH_MAX_WAIT_MS
        if joins_group:
            kind.update(tansu.GROUP_TIMEOUTS)
    return {
        **(site or {}),
        **kind,
        **role_config(conf, "consumer"),
        "group.id": group,
        "isolation.level": "read_committed",
        **(fixed or {}),
    }


def producer(conf: Mapping[str, Any], site: Mapping[str, Any] | None = None) -> Producer:
    """A producer for ``conf`` (see :func:`producer_config`)."""
    built: Producer = _build(Producer, producer_config(conf, site))
    return built


def consumer(
    conf: Mapping[str, Any],
    group: str,
    *,
    joins_group: bool = False,
    fixed: Mapping[str, Any] | None = None,
    site: Mapping[str, Any] | None = None,
) -> Consumer:
    """A consumer for ``conf`` (see :func:`consumer_config`)."""
    props = consumer_config(conf, group, joins_group=joins_group, fixed=fixed, site=site)
    built: Consumer = _build(Consumer, props)
    return built


def admin(conf: Mapping[str, Any]) -> AdminClient:
    """An admin client for ``conf`` (every client's properties only)."""
    built: AdminClient = _build(AdminClient, {**role_config(conf, "admin"), "log_level": 0})
    return built


def end_reader(conf: Mapping[str, Any]) -> tansu.ReaderFactory:
    """Makes the consumers that read past reported end offsets (no group commits)."""

    def make() -> Consumer:
        return consumer(
            conf,
            f"streamrec-endcheck-{time.monotonic_ns()}",
            fixed={"enable.auto.commit": False},
            site={"fetch.wait.max.ms": 10, "log_level": 0},
        )

    return make


def true_end_offsets(
    conf: Mapping[str, Any], reported: Mapping[tuple[str, int], int]
) -> dict[tuple[str, int], int]:
    """The log end offsets: the reported ones on Kafka; on the embedded broker, which reports
    them short by up to one record batch, found by reading past them
    (:func:`streamrec.kafka.tansu.true_end_offsets`)."""
    if not is_embedded(conf):
        return dict(reported)
    return tansu.true_end_offsets(end_reader(conf), reported)


#: producers on Kafka: nothing lost or written twice by a retry
KAFKA_PRODUCER_SETTINGS: dict[str, Any] = {"enable.idempotence": True, "acks": "all"}


def lag_by_partition(
    consumer: Consumer, topic: str, committed: Mapping[int, int]
) -> dict[int, tuple[int, int]]:
    """(end offset, lag) of each partition in ``committed`` (partition -> the group's next
    offset, negative: none yet), from what the consumer already knows (no broker call): the
    end is the high watermark of its last fetch, raised to its position (the embedded broker
    under-reports the high watermark by up to one record batch; a position past it proves
    the log is longer), and the lag is the end minus the committed offset."""
    out: dict[int, tuple[int, int]] = {}
    tps = [TopicPartition(topic, p) for p in committed]
    try:
        positions = {tp.partition: tp.offset for tp in consumer.position(tps)}
    except KafkaException:
        positions = {}
    for p, done in committed.items():
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
        except KafkaException:
            high = -1
        end = max(high, positions.get(p, -1), done)
        if end < 0:
            continue  # nothing known yet
        out[p] = (end, max(0, end - max(done, 0)))
    return out


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int = 1
    config: tuple[tuple[str, str], ...] = ()


def ensure_topics(
    client_config: Mapping[str, Any], topics: Iterable[TopicSpec], timeout: float = 30
) -> None:
    """Create the topics that do not exist yet, with their final partition counts.

    Partitions are never added afterwards (Tansu cannot, and adding them would move keys).
    """
    client = admin(client_config)
    existing = client.list_topics(timeout=timeout).topics
    wanted = [
        NewTopic(t.name, t.partitions, t.replication_factor, config=dict(t.config))
        for t in topics
        if t.name not in existing
    ]
    if not wanted:
        return
    for name, future in client.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        _wait_for_topic(client, name, timeout)


def ensure_service_topics(settings: Settings, conf: Mapping[str, Any] | None = None) -> None:
    """Create the clicks, recommendations and dead-letter topics with their partition counts."""
    t = settings.topics
    ensure_topics(
        conf if conf is not None else settings.kafka.confluent_config(),
        [
            TopicSpec(name, t.partitions, t.replication_factor)
            for name in (t.clicks, t.recommendations, t.dead_letter)
        ],
    )


def _wait_for_topic(client: AdminClient, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = client.list_topics(topic=name, timeout=timeout).topics.get(name)
        if meta is not None and meta.error is None and meta.partitions:
            return
        time.sleep(0.05)
    raise TimeoutError(f"topic {name} did not appear within {timeout} s")


def partition_count(client_config: Mapping[str, Any], topic: str, timeout: float = 10) -> int:
    meta = admin(client_config).list_topics(topic=topic, timeout=timeout).topics[topic]
    return len(meta.partitions)


@dataclass(frozen=True)
class TopicFacts:
    """What the broker says of a topic now: its id (``""`` if the broker reports none), its
    partition count, and for the partitions asked about an offset their logs do not reach."""

    topic_id: str
    partitions: int
    end_bounds: dict[int, int]


def topic_facts(
    conf: Mapping[str, Any], topic: str, partitions: Iterable[int] = (), timeout: float = 30
) -> TopicFacts:
    """The topic's id (Kafka's topic ids, KIP-516; the embedded broker gives a new one to
    every topic it creates), its partition count, and an end bound per partition of
    ``partitions``: the high watermark, plus on the embedded broker what it may under-report
    (:data:`streamrec.kafka.tansu.END_UNDER_REPORT`)."""
    client = admin(conf)  # held until the answer: a dropped client cancels its requests
    desc = client.describe_topics(TopicCollection([topic]))[topic].result(timeout)
    uuid = desc.topic_id
    topic_id = (
        ""
        if uuid is None
        or (uuid.get_most_significant_bits() == 0 and uuid.get_least_significant_bits() == 0)
        else str(uuid)
    )
    bounds: dict[int, int] = {}
    wanted = list(partitions)
    if wanted:
        slack = tansu.END_UNDER_REPORT if is_embedded(conf) else 0
        reader = consumer(
            conf,
            f"streamrec-ends-{time.monotonic_ns()}",
            fixed={"enable.auto.commit": False},
            site={"log_level": 0},
        )
        try:
            for p in wanted:
                _, high = reader.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                bounds[p] = max(high, 0) + slack
        finally:
            reader.close()
    return TopicFacts(topic_id, len(desc.partitions), bounds)


def committed_offsets(
    client_config: Mapping[str, Any], group: str, topic: str, timeout: float = 10
) -> list[int]:
    """The offsets ``group`` has committed on each partition of ``topic`` (negative: none)."""
    reader = consumer(client_config, group, site={"log_level": 0})
    try:
        parts = [TopicPartition(topic, p) for p in range(partition_count(client_config, topic))]
        return [tp.offset for tp in reader.committed(parts, timeout=timeout)]
    finally:
        reader.close()


def read_topic(
    client_config: Mapping[str, Any],
    topic: str,
    *,
    idle_timeout: float = 3.0,
    max_wait: float = 60.0,
) -> list[Any]:
    """Every record of ``topic`` from offset 0, read by a fresh consumer (no group commits).

    Reading from the start once the producers are idle is the reliable way to verify a
    topic's content on Tansu, whose tailing consumers can skip records under concurrent writes.
    Returns confluent-kafka ``Message`` objects in (partition, offset) order.
    """
    reader = consumer(
        client_config,
        f"streamrec-reader-{time.monotonic_ns()}",
        fixed={"enable.auto.commit": False, "auto.offset.reset": "earliest"},
        site={"fetch.wait.max.ms": 10, "log_level": 0},
    )
    try:
        n = partition_count(client_config, topic)
        reader.assign([TopicPartition(topic, p, 0) for p in range(n)])
        records: list[Any] = []
        start = last = time.monotonic()
        while time.monotonic() - last < idle_timeout and time.monotonic() - start < max_wait:
            batch = reader.consume(num_messages=10_000, timeout=0.2)
            for msg in batch:
                if msg.error() is None:
                    records.append(msg)
            if batch:
                last = time.monotonic()
        records.sort(key=lambda m: (m.partition(), m.offset()))
        return records
    finally:
        reader.close()


def tail(
    client_config: Mapping[str, Any],
    topic: str,
    *,
    from_beginning: bool = False,
    stopped: Callable[[], bool] = lambda: False,
) -> Iterator[Any]:
    """Records of ``topic`` as they arrive (confluent-kafka ``Message``s), until ``stopped()``.

    For display: a tailing consumer can skip records on the embedded broker, so figures come
    from :func:`read_topic`. Joins no group (see :func:`streamrec.kafka.tansu.assign_all`).
    """
    reader = consumer(
        client_config,
        f"streamrec-tail-{time.time_ns()}",
        fixed={"enable.auto.commit": False},
        site={"fetch.wait.max.ms": 10, "log_level": 0},
    )
    try:
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        tansu.assign_all(reader, topic, partition_count(client_config, topic), start)
        while not stopped():
            msg = reader.poll(0.2)
            if msg is not None and msg.error() is None:
                yield msg
    finally:
        reader.close()
