"""The Faust engine's Kafka clients: the client configuration mapped onto Faust's app settings,
and the transport that applies what Faust has no setting for.

Faust talks to Kafka through aiokafka, which takes its own arguments rather than librdkafka
properties. The Faust engine's outputs (recommendations, dead letters) go through a
confluent-kafka producer (:class:`streamrec.engines.common.Outputs`) that takes the
configuration unchanged; Faust's own consumer (clicks, changelogs) and producer (changelogs)
get the properties of :data:`APP_SETTINGS` and the credentials (:func:`faust_app_kwargs`).
A property with no aiokafka counterpart is refused when the worker starts, naming it: it
would apply to some of the worker's clients and silently not to the others. SASL OAUTHBEARER
(OIDC) is librdkafka's own token flow and is refused too: run those clusters with the native
engine (the default).

:func:`streamrec_transport` replaces Faust's aiokafka transport: its consumer reads
``read_committed`` (Faust reads uncommitted records outside its own transactions), waits
``app.fetch_max_wait_ms`` on an empty fetch when set (Faust hard-codes 1500 ms, which the
embedded broker holds in full), and its producer is idempotent with ``acks=all`` when
``app.idempotent_producer`` (on Kafka; aiokafka cannot init one on the embedded broker).
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from streamrec.errors import StreamrecError
from streamrec.kafka.clients import role_config

if TYPE_CHECKING:  # faust is imported only where a Faust app is made
    from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport


class FaustConfigError(StreamrecError, ValueError):
    """A Kafka property the Faust engine cannot apply (the message names it)."""


def _seconds(ms: Any) -> float:
    return float(ms) / 1000.0


def _acks(value: Any) -> int:
    text = str(value).lower()
    return -1 if text in ("all", "-1") else int(text)


def _compression(value: Any) -> str | None:
    from aiokafka import codec

    text = str(value).lower()
    if text == "none":
        return None
    available = {"gzip": codec.has_gzip, "lz4": codec.has_lz4}
    available.update({"snappy": codec.has_snappy, "zstd": codec.has_zstd})
    if text not in available or not available[text]():
        raise FaustConfigError(f"compression.type={text} is not available to aiokafka")
    return text


#: librdkafka property -> (Faust app setting, conversion), for Faust's consumer and producer
APP_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "client.id": ("broker_client_id", str),
    "session.timeout.ms": ("broker_session_timeout", _seconds),
    "heartbeat.interval.ms": ("broker_heartbeat_interval", _seconds),
    "max.poll.interval.ms": ("broker_max_poll_interval", _seconds),
    "socket.timeout.ms": ("broker_request_timeout", _seconds),
    "check.crcs": ("broker_check_crcs", bool),
    "max.partition.fetch.bytes": ("consumer_max_fetch_size", int),
    "metadata.max.age.ms": ("consumer_metadata_max_age_ms", int),
    "connections.max.idle.ms": ("consumer_connections_max_idle_ms", int),
}
#: the same for the producer's properties (Faust's changelog producer)
PRODUCER_APP_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "acks": ("producer_acks", _acks),
    "compression.type": ("producer_compression_type", _compression),
    "linger.ms": ("producer_linger", _seconds),
    "batch.size": ("producer_max_batch_size", int),
    "message.max.bytes": ("producer_max_request_size", int),
    "request.timeout.ms": ("producer_request_timeout", _seconds),
}
#: properties that become the broker URL and the credentials, or the transport's own
_HANDLED = {
    "bootstrap.servers",
    "security.protocol",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
    "fetch.wait.max.ms",
    "enable.idempotence",
}


def faust_app_kwargs(conf: Mapping[str, Any]) -> dict[str, Any]:
    """``faust.App`` arguments for the client configuration ``conf``: the broker URL,
    credentials and the settings of :data:`APP_SETTINGS`. Raises :class:`FaustConfigError`
    naming every property it cannot apply."""
    consumer = role_config(conf, "consumer")
    producer = role_config(conf, "producer")
    if str(consumer.get("sasl.mechanism", "")).upper() == "OAUTHBEARER":
        raise FaustConfigError(
            "sasl.mechanism=OAUTHBEARER is librdkafka's token flow (OIDC client credentials), "
            "which the Faust engine (aiokafka) cannot run; use worker.engine=native"
        )
    kwargs: dict[str, Any] = {}
    refused: list[str] = []
    for props, table in ((consumer, APP_SETTINGS), (producer, PRODUCER_APP_SETTINGS)):
        for name, value in props.items():
            if name in table:
                setting, convert = table[name]
                kwargs[setting] = convert(value)
            elif (
                name not in _HANDLED
                and name not in APP_SETTINGS
                and name not in (PRODUCER_APP_SETTINGS)
            ):
                refused.append(name)
    if refused:
        raise FaustConfigError(
            "the Faust engine (aiokafka) has no equivalent of "
            + ", ".join(sorted(set(refused)))
            + "; remove them from kafka.config / kafka.consumer_config / kafka.producer_config "
            "or run worker.engine=native"
        )
    servers = str(consumer.get("bootstrap.servers", ""))
    kwargs["broker"] = ",".join(f"kafka://{s.strip()}" for s in servers.split(",") if s.strip())
    credentials = _credentials(consumer)
    if credentials is not None:
        kwargs["broker_credentials"] = credentials
    return kwargs


def _credentials(props: Mapping[str, Any]) -> Any:
    import faust

    protocol = str(props.get("security.protocol", "PLAINTEXT")).upper()
    mechanism = str(props.get("sasl.mechanism", "")).upper()
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=props.get("ssl.ca.location"))
        if props.get("ssl.certificate.location"):
            context.load_cert_chain(
                props["ssl.certificate.location"],
                props.get("ssl.key.location"),
                props.get("ssl.key.password"),
            )
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=props.get("sasl.username"),
            password=props.get("sasl.password") or "",
            mechanism=mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


class _TransportApp(Protocol):
    fetch_max_wait_ms: int | None
    idempotent_producer: bool


@functools.cache
def streamrec_transport() -> type[AIOKafkaTransport]:
    """Faust's aiokafka transport with a ``read_committed`` consumer that waits at most
    ``app.fetch_max_wait_ms`` on an empty fetch (when set), and a producer that is idempotent
    when ``app.idempotent_producer`` (see the module docstring)."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # both read by AIOKafkaConsumer.start() when it builds its Fetcher
            # (the app is a StreamrecApp: streamrec.engines.faust.app, a module above this one)
            app = cast(_TransportApp, self.app)
            if app.fetch_max_wait_ms is not None:
                consumer._fetch_max_wait_ms = int(app.fetch_max_wait_ms)
            consumer._isolation_level = "read_committed"
            return consumer

    class TransportConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class TransportProducer(faust_aiokafka.Producer):
        def _settings_extra(self) -> Mapping[str, Any]:
            app = cast(_TransportApp, self.app)
            if app.idempotent_producer:
                return {"acks": "all", "enable_idempotence": True}
            return super()._settings_extra()

    class StreamrecTransport(faust_aiokafka.Transport):
        Consumer = TransportConsumer
        Producer = TransportProducer

    return StreamrecTransport
