"""Kafka client configuration: the pass-through mappings reach every client of every
component, shortcuts and mappings never silently disagree, the embedded broker's workarounds
stay on the embedded broker, and SASL OAUTHBEARER (OIDC client credentials) works as
librdkafka defines it. No broker needed: the configurations are checked as built."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from streamrec.engines.faust.transport import FaustConfigError, faust_app_kwargs
from streamrec.kafka import clients, tansu
from streamrec.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
NOWHERE = "127.0.0.1:9"  # nothing listens: clients are built, never connected


def _settings(broker: str = "kafka", **kafka: Any) -> Settings:
    return load_settings(kafka={"bootstrap_servers": NOWHERE, "broker": broker, **kafka})


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every client the product builds, as (kind, the properties handed to confluent-kafka);
    the real clients are still built."""
    seen: list[tuple[str, dict[str, Any]]] = []
    real = clients._build

    def record(factory: Any, props: dict[str, Any]) -> Any:
        seen.append((factory.__name__, dict(props)))
        return real(factory, props)

    monkeypatch.setattr(clients, "_build", record)
    yield seen


def test_no_module_builds_a_kafka_client_but_the_factory() -> None:
    """Every component gets the configuration because every client comes from
    streamrec.kafka.clients (the embedded broker's own start-up probe excepted)."""
    pattern = re.compile(r"\b(Producer|Consumer|AdminClient)\(")
    offenders = []
    for path in (ROOT / "streamrec").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("streamrec/kafka/clients.py", "streamrec/kafka/embedded.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "class " not in line:
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_mappings_reach_producers_consumers_and_admin() -> None:
    s = _settings(
        config={"compression.type": "lz4", "client.id": "web-1"},
        producer_config={"linger.ms": 7},
        consumer_config={"fetch.min.bytes": 1024},
    )
    conf = s.kafka.confluent_config()
    prod = clients.producer_config(conf)
    cons = clients.consumer_config(conf, "g")
    adm = clients.role_config(conf, "admin")
    assert prod["compression.type"] == cons["compression.type"] == adm["compression.type"]
    assert prod["client.id"] == cons["client.id"] == "web-1"  # the mapping over the default
    assert prod["linger.ms"] == 7 and "linger.ms" not in cons and "linger.ms" not in adm
    assert cons["fetch.min.bytes"] == 1024 and "fetch.min.bytes" not in prod
    assert not any(":" in k for k in (*prod, *cons, *adm))  # streamrec's own keys stay out


def test_the_environment_variable_takes_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA__CONFIG", '{"compression.type": "lz4", "linger.ms": 5}')
    assert load_settings().kafka.config == {"compression.type": "lz4", "linger.ms": 5}


def test_a_property_as_a_setting_points_at_the_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA__COMPRESSION_TYPE", "lz4")
    with pytest.raises(SettingsError, match=r"STREAMREC_KAFKA__CONFIG=.*compression\.type"):
        load_settings()


@pytest.mark.parametrize(
    ("shortcut", "prop", "value", "other"),
    [
        ("client_id", "client.id", "a", "b"),
        ("bootstrap_servers", "bootstrap.servers", "k1:9092", "k2:9092"),
        ("fetch_max_wait_ms", "fetch.wait.max.ms", 10, 500),
        ("sasl_mechanism", "sasl.mechanisms", "PLAIN", "SCRAM-SHA-512"),  # an alias too
    ],
)
def test_a_shortcut_and_a_mapping_that_disagree_name_both(
    shortcut: str, prop: str, value: Any, other: Any
) -> None:
    for field in ("config", "consumer_config", "producer_config"):
        with pytest.raises(SettingsError) as info:
            load_settings(kafka={shortcut: value, field: {prop: other}})
        assert f"kafka.{shortcut}" in str(info.value) and f"kafka.{field}" in str(info.value)
    # agreeing, or only one of them set: fine
    load_settings(kafka={shortcut: value, "config": {prop: value}})


@pytest.mark.parametrize("prop", ["group.id", "enable.auto.commit", "isolation.level"])
def test_what_the_guarantees_rest_on_cannot_be_overridden(prop: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(prop)):
        _settings(consumer_config={prop: "x"})


def test_clients_for_kafka_are_idempotent_with_client_default_group_timeouts() -> None:
    """On any cluster but the embedded broker: idempotent producers, acks=all, librdkafka's
    group timeouts and fetch wait; the embedded broker keeps its workarounds."""
    kafka = _settings("kafka").kafka.confluent_config()
    prod = clients.producer_config(kafka, {"linger.ms": 1})
    assert prod["enable.idempotence"] is True and prod["acks"] == "all"
    cons = clients.consumer_config(kafka, "g", joins_group=True)
    for prop in ("session.timeout.ms", "heartbeat.interval.ms", "fetch.wait.max.ms"):
        assert prop not in cons
    assert cons["isolation.level"] == "read_committed"

    embedded = _settings("embedded").kafka.confluent_config()
    assert clients.producer_config(embedded)["enable.idempotence"] is False
    cons = clients.consumer_config(embedded, "g", joins_group=True)
    assert cons["session.timeout.ms"] == tansu.GROUP_TIMEOUTS["session.timeout.ms"]
    assert cons["fetch.wait.max.ms"] == tansu.FETCH_MAX_WAIT_MS

    # set by the user, a group timeout is the user's on both
    mine = _settings("embedded", consumer_config={"session.timeout.ms": 30_000})
    cons = clients.consumer_config(mine.kafka.confluent_config(), "g", joins_group=True)
    assert cons["session.timeout.ms"] == 30_000


def test_the_worker_and_archiver_read_committed_with_idempotent_outputs(
    built: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> None:
    """The configurations the native worker and the archiver build for a Kafka cluster:
    read_committed (the embedded broker does not isolate transactions, Kafka does), the
    user's properties, idempotent producers; the embedded broker's timeouts absent."""
    from streamrec.engines.native.worker import NativeWorker
    from streamrec.loop.archiver import Archiver
    from streamrec.serving.served_model import ModelHolder
    from streamrec.testing import tiny_serving_model

    s = _settings(config={"compression.type": "lz4"})
    worker = NativeWorker(s, ModelHolder(tiny_serving_model(n_items=5)), datadir=tmp_path)
    archiver = Archiver(s.kafka.confluent_config(), "clicks", str(tmp_path / "archive"))
    worker.consumer.close()
    archiver.consumer.close()
    consumers = [p for kind, p in built if kind == "Consumer"]
    producers = [p for kind, p in built if kind == "Producer"]
    assert {p["group.id"] for p in consumers} == {s.worker.app_id, "streamrec-archiver"}
    for p in consumers:
        assert p["isolation.level"] == "read_committed"
        assert p["enable.auto.commit"] is False and p["compression.type"] == "lz4"
        assert "session.timeout.ms" not in p and "fetch.wait.max.ms" != 10
    (prod,) = producers
    assert prod["enable.idempotence"] is True and prod["acks"] == "all"
    assert prod["compression.type"] == "lz4"


def test_the_faust_engine_maps_what_aiokafka_has_and_refuses_the_rest() -> None:
    conf = _settings(
        config={"client.id": "web-1", "session.timeout.ms": 30_000},
        producer_config={"compression.type": "lz4", "acks": "all", "linger.ms": 5},
    ).kafka.confluent_config()
    kw = faust_app_kwargs(conf)
    assert kw["broker_client_id"] == "web-1" and kw["broker_session_timeout"] == 30.0
    assert kw["producer_compression_type"] == "lz4" and kw["producer_acks"] == -1
    assert kw["producer_linger"] == 0.005
    refused = _settings(config={"queue.buffering.max.kbytes": 1024, "socket.nagle.disable": True})
    with pytest.raises(
        FaustConfigError, match=re.escape("queue.buffering.max.kbytes, socket.nagle.disable")
    ):
        faust_app_kwargs(refused.kafka.confluent_config())


# ---- SASL OAUTHBEARER with OIDC client credentials (what managed Kafka services use) ------


def _unsigned_jwt() -> str:
    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{part({'alg': 'none'})}.{part({'sub': 'svc', 'iat': now, 'exp': now + 600})}."


@pytest.fixture
def token_endpoint() -> Iterator[tuple[str, list[tuple[str | None, bytes]]]]:
    """An OAuth token endpoint on loopback: (its URL, the requests it got)."""
    requests: list[tuple[str | None, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            requests.append((self.headers.get("Authorization"), body))
            out = json.dumps({"access_token": _unsigned_jwt(), "expires_in": 600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/token", requests
    server.shutdown()


OIDC = {
    "sasl.mechanism": "OAUTHBEARER",
    "sasl.oauthbearer.method": "oidc",
    "sasl.oauthbearer.client.id": "streamrec-svc",
    "sasl.oauthbearer.client.secret": "s3cret",
    "sasl.oauthbearer.scope": "kafka",
}


def test_oauthbearer_oidc_needs_its_client_credentials() -> None:
    with pytest.raises(SettingsError, match=re.escape("sasl.oauthbearer.token.endpoint.url")):
        _settings(security_protocol="SASL_SSL", config=OIDC)
    with pytest.raises(SettingsError, match="sasl_mechanism"):
        _settings(security_protocol="SASL_SSL")


def test_oauthbearer_oidc_clients_fetch_a_token_with_client_credentials(
    token_endpoint: tuple[str, list[tuple[str | None, bytes]]],
) -> None:
    url, requests = token_endpoint
    s = _settings(
        security_protocol="SASL_SSL",
        config={**OIDC, "sasl.oauthbearer.token.endpoint.url": url},
    )
    conf = s.kafka.confluent_config()
    builds: list[Callable[[], Any]] = [
        lambda: clients.producer(conf),
        lambda: clients.consumer(conf, "g"),
    ]
    for build in builds:
        before = len(requests)
        client = build()
        deadline = time.monotonic() + 10
        while len(requests) == before and time.monotonic() < deadline:
            client.poll(0.05)
        assert len(requests) > before, "no token request"
        auth, body = requests[-1]
        assert auth == "Basic " + base64.b64encode(b"streamrec-svc:s3cret").decode()
        assert b"grant_type=client_credentials" in body and b"scope=kafka" in body
        if hasattr(client, "close"):
            client.close()
        else:
            client.flush(0)
    with pytest.raises(FaustConfigError, match="OAUTHBEARER"):
        faust_app_kwargs(conf)


def test_a_property_librdkafka_does_not_know_is_one_line_naming_it() -> None:
    conf = _settings(config={"compresion.type": "lz4"}).kafka.confluent_config()
    with pytest.raises(clients.KafkaConfigError, match=re.escape("compresion.type")):
        clients.producer(conf)
