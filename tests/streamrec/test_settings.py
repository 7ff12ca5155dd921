"""Settings: defaults, environment overrides, .env files, and rejected invalid values."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from streamrec.engines.faust.transport import faust_app_kwargs
from streamrec.settings import Settings, SettingsError, get_settings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("STREAMREC_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env from the working directory
    get_settings.cache_clear()


def test_defaults() -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.kafka.security_protocol == "PLAINTEXT"
    assert s.topics.partitions == 4
    assert s.batching.max_events == 256
    assert s.model.device == "auto"
    assert s.state.session_gap_seconds == 1800
    assert s.state.user_ttl_seconds == 90 * 24 * 3600
    # unset: 10 ms on the embedded broker, the client's default on Kafka (test_kafka_config)
    assert s.kafka.fetch_max_wait_ms is None
    assert s.worker.torch_threads == 1
    assert s.kafka.confluent_config() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "client.id": "streamrec",
        "security.protocol": "PLAINTEXT",
        "streamrec:broker": "auto",
    }
    assert faust_app_kwargs(s.kafka.confluent_config()) == {
        "broker": "kafka://127.0.0.1:9092",
        "broker_client_id": "streamrec",
    }


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9093")
    monkeypatch.setenv("STREAMREC_TOPICS__PARTITIONS", "12")
    monkeypatch.setenv("STREAMREC_BATCHING__MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("STREAMREC_MODEL__DEVICE", "cpu")
    s = load_settings()
    assert s.kafka.bootstrap_list == ["k1:9092", "k2:9093"]
    assert faust_app_kwargs(s.kafka.confluent_config())["broker"] == (
        "kafka://k1:9092,kafka://k2:9093"
    )
    assert s.topics.partitions == 12
    assert s.batching.max_wait_ms == 2.5
    assert s.model.device == "cpu"


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("STREAMREC_TOPICS__CLICKS=clicks-from-dotenv\n")
    assert load_settings().topics.clicks == "clicks-from-dotenv"


def test_sasl_ssl_passes_through_to_both_clients(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMREC_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMREC_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("STREAMREC_KAFKA__SASL_PASSWORD", "s3cret")
    s = load_settings()
    conf = s.kafka.confluent_config()
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.password"] == "s3cret"
    assert "s3cret" not in repr(s)  # secrets are not printed
    creds = faust_app_kwargs(conf)["broker_credentials"]
    assert creds.username == "svc" and creds.mechanism.value == "SCRAM-SHA-512"


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("STREAMREC_TOPICS__PARTITIONS", "0", "topics.partitions"),
        ("STREAMREC_MODEL__DEVICE", "tpu", "model.device"),
        ("STREAMREC_BATCHING__MAX_EVENTS", "many", "batching.max_events"),
        ("STREAMREC_KAFKA__SECURITY_PROTOCOL", "SASL_SSL", "kafka"),
        ("STREAMREC_KAFKA__SSL_CAFILE", "/no/such/ca.pem", "kafka"),
    ],
)
def test_invalid_values_are_rejected_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert named in str(info.value)


def test_cli_fails_at_start_on_invalid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamrec.cli.main import main

    monkeypatch.setenv("STREAMREC_TOPICS__PARTITIONS", "-3")
    result = CliRunner().invoke(main, ["broker", "--port", "0"])
    assert result.exit_code != 0
    assert "topics.partitions" in result.output
    assert "STREAMREC_TOPICS__PARTITIONS" in result.output


def test_settings_are_immutable() -> None:
    s: Settings = load_settings()
    with pytest.raises(ValueError):
        s.topics.partitions = 3  # type: ignore[misc]  # frozen: the assignment must raise


def test_the_renamed_clock_setting_says_what_replaced_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_STATE__CLOCK_MIN_EVENTS", "5")
    with pytest.raises(SettingsError, match="clock_min_keys"):
        load_settings()
