"""One typed settings object for the whole service, grouped by subsystem.

Values come from (highest first): explicit arguments, environment variables with the prefix
``STREAMREC_`` and ``__`` between levels (``STREAMREC_KAFKA__BOOTSTRAP_SERVERS``), a ``.env``
file in the working directory, then the defaults below. Invalid values fail at start with a
message that names the setting (see :func:`load_settings`).
"""

from __future__ import annotations

import ssl
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamrec.errors import StreamrecError


class SettingsError(StreamrecError, ValueError):
    """Raised when the configuration is invalid; the message names each bad setting."""


class InsecureSettingWarning(UserWarning):
    """A setting that works but exposes credentials or data (logged at start)."""


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Group):
    """Connection to the Kafka cluster, passed through to confluent-kafka and to Faust."""

    bootstrap_servers: str = Field("127.0.0.1:9092", min_length=1)
    client_id: str = Field("streamrec", min_length=1, max_length=200)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    #: Longest wait of an empty fetch. Faust hard-codes 1500 ms; Tansu holds an empty fetch for
    #: the whole wait even when data arrives, so this bounds click-to-recommendation latency.
    fetch_max_wait_ms: int = Field(10, ge=1, le=60_000)

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        uses_sasl = self.security_protocol.startswith("SASL")
        if uses_sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism, "
                "sasl_username and sasl_password"
            )
        if self.security_protocol == "PLAINTEXT" and (self.sasl_username or self.sasl_password):
            warnings.warn(
                "kafka.security_protocol=PLAINTEXT with SASL credentials: the credentials are "
                "not used, and a protocol change to SASL_PLAINTEXT would send them unencrypted; "
                "use SASL_SSL",
                InsecureSettingWarning,
                stacklevel=2,
            )
        if self.security_protocol == "SASL_PLAINTEXT" and self.sasl_mechanism == "PLAIN":
            warnings.warn(
                "kafka.security_protocol=SASL_PLAINTEXT with sasl_mechanism=PLAIN sends the "
                "password unencrypted over the network; use SASL_SSL (or a SCRAM mechanism)",
                InsecureSettingWarning,
                stacklevel=2,
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return self

    @property
    def bootstrap_list(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def confluent_config(self) -> dict[str, Any]:
        """Configuration for confluent-kafka producers, consumers and admin clients."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.ssl_cafile:
            conf["ssl.ca.location"] = str(self.ssl_cafile)
        if self.ssl_certfile:
            conf["ssl.certificate.location"] = str(self.ssl_certfile)
        if self.ssl_keyfile:
            conf["ssl.key.location"] = str(self.ssl_keyfile)
        return conf

    def faust_broker_kwargs(self) -> dict[str, Any]:
        """``broker`` and ``broker_credentials`` arguments for ``faust.App``."""
        import faust  # imported lazily: the settings module must stay cheap to import

        kwargs: dict[str, Any] = {
            "broker": ",".join(f"kafka://{s}" for s in self.bootstrap_list),
        }
        ssl_context = None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            ssl_context = ssl.create_default_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
            if self.ssl_certfile:
                ssl_context.load_cert_chain(
                    str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None
                )
        if self.sasl_mechanism:
            password = self.sasl_password.get_secret_value() if self.sasl_password else ""
            kwargs["broker_credentials"] = faust.SASLCredentials(
                username=self.sasl_username,
                password=password,
                mechanism=self.sasl_mechanism,
                ssl_context=ssl_context,
            )
        elif ssl_context is not None:
            kwargs["broker_credentials"] = faust.SSLCredentials(ssl_context)
        return kwargs


class TopicSettings(_Group):
    """Topic names and partition counts (create topics with their final partition count)."""

    clicks: str = Field("streamrec-clicks", min_length=1, max_length=249)
    recommendations: str = Field("streamrec-recommendations", min_length=1, max_length=249)
    dead_letter: str = Field("streamrec-dead-letter", min_length=1, max_length=249)
    partitions: int = Field(4, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1, le=16)


class StateSettings(_Group):
    """Where worker state lives and how long sessions stay open."""

    directory: Path = Path("var/state")
    session_gap_seconds: float = Field(1800.0, gt=0)
    recent_items: int = Field(50, ge=1, le=10_000)
    #: Cap on one encoded state in bytes: the oldest recent items (users: the oldest session
    #: summaries) are dropped to fit, so no changelog record exceeds the producer's limit
    #: (message.max.bytes, 1 MB by default).
    max_state_bytes: int = Field(512 * 1024, ge=4096, le=900_000)
    #: Event ids remembered per open session: a click whose event_id is among them is a
    #: duplicate (answered, flagged, not applied).
    dedup_event_ids: int = Field(32, ge=0, le=1000)
    #: An event time more than this ahead of the record's arrival is dead-lettered as
    #: timestamp_out_of_range (a client clock hours fast, a CreateTime in 2286).
    max_ahead_seconds: float = Field(3600.0, gt=0)
    #: An event time whose skew (event time - arrival) is more than this away from the median
    #: skew of its partition's recent events is dead-lettered as timestamp_out_of_range.
    max_skew_seconds: float = Field(30 * 24 * 3600.0, gt=0)
    #: Recent events per partition whose median skew is the partition's clock.
    clock_window: int = Field(101, ge=1, le=100_000)
    #: Events a partition must have seen before its clock is used (checks, sweep).
    clock_min_events: int = Field(8, ge=1, le=100_000)

    @model_validator(mode="after")
    def _check_clock(self) -> StateSettings:
        if self.clock_min_events > self.clock_window:
            raise ValueError("clock_min_events must not exceed clock_window")
        return self

    recent_sessions: int = Field(10, ge=0, le=1000)
    sweep_interval_seconds: float = Field(30.0, gt=0)
    #: User (HRNN) states idle longer than this are dropped by the sweep; None keeps them.
    user_ttl_seconds: float | None = Field(90 * 24 * 3600.0, gt=0)


class BatchSettings(_Group):
    """Micro-batching: up to ``max_events`` events or whatever came within ``max_wait_ms``."""

    max_events: int = Field(256, ge=1, le=65_536)
    max_wait_ms: float = Field(5.0, ge=0, le=60_000)


class ModelSettings(_Group):
    """Which checkpoint to serve and where to run it."""

    path: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    top_k: int = Field(20, ge=1, le=1000)
    reload_interval_s: float = Field(1.0, ge=0)
    #: Precision of the all-items scoring matmul (GRU4Rec). bfloat16 is several times faster on
    #: CPUs with bf16 dot products and on GPUs; its scores differ from float32 in the third
    #: significant digit, so near-ties can swap places in the top-k.
    score_dtype: Literal["float32", "bfloat16"] = "float32"
    #: Quality gate of a hot swap: on the held-out slice stored in the checkpoint
    #: (data_stats.holdout_sessions), Recall@20 must reach this share of the checkpoint's
    #: own offline figure (metrics["holdout_recall@20"]).
    gate_ratio: float = Field(0.8, ge=0, le=1)
    #: How the top-k is found (docs/architecture.md, "Retrieval"). ``exact``: every item is
    #: scored; ``ann``: an approximate index (usearch HNSW, built beside the checkpoint when
    #: published, else at load) proposes candidates, which are scored exactly; ``auto``: ann
    #: on CPU from 100,000 items, exact below that and on a GPU.
    retrieval: Literal["exact", "ann", "auto"] = "auto"
    #: ann: candidates per click re-scored exactly
    ann_candidates: int = Field(100, ge=1, le=10_000)
    #: ann: search breadth per query (HNSW ef); more is slower and closer to exact
    ann_expansion_search: int = Field(128, ge=1, le=100_000)
    #: ann: graph degree and build breadth (HNSW M, efConstruction); changing them rebuilds
    ann_connectivity: int = Field(16, ge=2, le=256)
    ann_expansion_add: int = Field(128, ge=1, le=100_000)
    #: exact retrieval: scores in bf16, a shortlist re-scored in float32 and kept where a
    #: rounding bound proves it (else float32): the float32 top-k items, faster on CPUs with
    #: bf16 dot products (bench/results/catalogue-scale.md)
    bf16_shortlist: bool = False


class WorkerSettings(_Group):
    """Identity and ports of a worker process."""

    app_id: str = Field("streamrec", min_length=1, max_length=200)
    metrics_port: int = Field(9108, ge=0, le=65_535)
    #: Address the /metrics endpoint listens on (0.0.0.0: every interface, as a container
    #: needs; 127.0.0.1 keeps it local).
    metrics_host: str = Field("0.0.0.0", min_length=1, max_length=255)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: torch intra-op threads on CPU. One leaves the other cores to the event loop; more made
    #: small GRU steps many times slower on busy cores (bench/results/serving-cpu.md).
    torch_threads: int = Field(1, ge=1, le=256)
    #: ``native``: confluent-kafka consumer, RocksDB per partition, changelog written at
    #: checkpoints (streamrec/engines/native/). ``faust``: the same pipeline as a Faust agent
    #: with Faust tables (streamrec/engines/faust/); about 3x slower per event
    #: (bench/results/serving-cpu.md).
    engine: Literal["native", "faust"] = "native"
    #: Native engine: seconds between checkpoints (outputs and changelog flushed, input
    #: offsets committed, state written to RocksDB). Shorter: less to redo after a crash.
    commit_interval_s: float = Field(1.0, gt=0, le=3600)


class Settings(BaseSettings):
    """All settings of a streamrec process."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    state: StateSettings = StateSettings()
    batching: BatchSettings = BatchSettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "settings"
        env = "STREAMREC_" + "__".join(str(p) for p in item["loc"]).upper()
        lines.append(f"{where} ({env}): {item['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, raising :class:`SettingsError` that names every invalid setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return load_settings()
