"""Issue 13's operator-facing items: produce errors, settings and their warnings."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamrec.engines.common import DeliveryError, Outputs
from streamrec.settings import InsecureSettingWarning, Settings, SettingsError, load_settings


class _Refusing:
    """A producer whose produce() raises what librdkafka raises synchronously."""

    def __init__(self, code: int, on_topics: set[str]) -> None:
        self.code, self.on_topics = code, on_topics
        self.sent: list[tuple[str, bytes | None]] = []

    def produce(self, topic: str, value: bytes | None, key: Any = None, **kw: Any) -> None:
        if topic in self.on_topics:
            raise KafkaException(KafkaError(self.code))
        self.sent.append((topic, value))

    def poll(self, timeout: float) -> int:
        return 0


def _outputs(producer: _Refusing) -> Outputs:
    out = Outputs(load_settings(kafka={"bootstrap_servers": "127.0.0.1:9", "broker": "kafka"}))
    out.producer = producer  # type: ignore[assignment]  # a stand-in for confluent's Producer
    return out


def test_an_oversized_output_becomes_a_dead_letter_not_a_crash() -> None:
    s = Settings()
    prod = _Refusing(KafkaError.MSG_SIZE_TOO_LARGE, {s.topics.recommendations})
    out = _outputs(prod)
    out.produce(s.topics.recommendations, b"x" * 2_000_000, b"k")
    ((topic, value),) = prod.sent
    assert topic == s.topics.dead_letter
    dead = json.loads(value or b"")
    assert dead["reason"] == "output_too_large" and dead["original_size"] == 4096
    assert not out.errors


def test_other_produce_errors_stop_with_a_message_and_are_never_dropped() -> None:
    prod = _Refusing(KafkaError.MSG_SIZE_TOO_LARGE, {"app-state-changelog"})
    out = _outputs(prod)
    with pytest.raises(DeliveryError, match="stopping without committing"):
        out.produce("app-state-changelog", b"x", b"s/a:k", 0)
    assert out.errors and not prod.sent
    prod = _Refusing(KafkaError.TOPIC_AUTHORIZATION_FAILED, {Settings().topics.recommendations})
    with pytest.raises(DeliveryError):
        _outputs(prod).produce(Settings().topics.recommendations, b"{}", b"k")


def test_metrics_host_setting() -> None:
    # local by default; a container scraped from outside sets 0.0.0.0 (docker-compose.yml)
    assert Settings().worker.metrics_host == "127.0.0.1"
    assert load_settings(worker={"metrics_host": "127.0.0.1"}).worker.metrics_host == "127.0.0.1"


@pytest.mark.parametrize(
    ("kafka", "warns"),
    [
        ({"security_protocol": "PLAINTEXT", "sasl_username": "u", "sasl_password": "p"}, True),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "u",
                "sasl_password": "p",
            },
            True,
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "u",
                "sasl_password": "p",
            },
            False,
        ),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "u",
                "sasl_password": "p",
            },
            False,
        ),
        ({}, False),
    ],
)
def test_credentials_over_an_unencrypted_protocol_warn(kafka: dict[str, str], warns: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_settings(kafka=kafka)
    got = [w for w in caught if issubclass(w.category, InsecureSettingWarning)]
    assert bool(got) == warns


def test_state_bounds_in_settings() -> None:
    st = Settings().state
    assert st.max_state_bytes < 1_000_000 and st.max_ahead_seconds == 3600.0
    with pytest.raises(SettingsError, match="max_state_bytes"):
        load_settings(state={"max_state_bytes": 2_000_000})
    with pytest.raises(SettingsError, match="clock_min_keys"):
        load_settings(state={"clock_window": 4, "clock_min_keys": 8})
