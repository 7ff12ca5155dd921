"""One typed settings object for the whole service, grouped by subsystem.

Values come from (highest first): explicit arguments, environment variables with the prefix
``STREAMREC_`` and ``__`` between levels (``STREAMREC_KAFKA__BOOTSTRAP_SERVERS``), a ``.env``
file in the working directory, then the defaults below. Invalid values fail at start with a
message that names the setting (see :func:`load_settings`).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamrec.errors import StreamrecError

#: librdkafka's keyed partitioners (streamrec.kafka.partitioners has each one)
Partitioner = Literal[
    "consistent_random", "consistent", "murmur2_random", "murmur2", "fnv1a_random", "fnv1a"
]


class SettingsError(StreamrecError, ValueError):
    """Raised when the configuration is invalid; the message names each bad setting."""


class InsecureSettingWarning(UserWarning):
    """A setting that works but exposes credentials or data (logged at start)."""


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: a librdkafka property value as JSON gives it (librdkafka takes strings, numbers, booleans)
ConfigValue = str | int | float | bool

#: typed shortcut -> the librdkafka property it sets (both may be given only if they agree)
SHORTCUTS: dict[str, str] = {
    "bootstrap_servers": "bootstrap.servers",
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_username": "sasl.username",
    "sasl_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "fetch_max_wait_ms": "fetch.wait.max.ms",
}
#: librdkafka's other names for a property
_ALIASES = {"sasl.mechanisms": "sasl.mechanism", "compression.codec": "compression.type"}
#: properties streamrec sets itself, per client, for its guarantees (offsets committed only
#: after the outputs are on the broker, transactions isolated, eager rebalancing): a mapping
#: that sets one is refused
RESERVED = frozenset(
    {
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "isolation.level",
        "enable.partition.eof",
        "partition.assignment.strategy",
        "group.protocol",
        "transactional.id",
    }
)
#: the role prefixes of the flat client configuration (:meth:`KafkaSettings.confluent_config`)
PRODUCER_PREFIX = "producer:"
CONSUMER_PREFIX = "consumer:"
#: the key of the flat client configuration that says which broker it is for
BROKER_KEY = "streamrec:broker"


def _canonical(name: str) -> str:
    return _ALIASES.get(name, name)


class KafkaSettings(_Group):
    """Connection to the Kafka cluster, passed through to confluent-kafka and to Faust.

    ``config`` (every client), ``producer_config`` and ``consumer_config`` pass librdkafka
    properties through unchanged (``STREAMREC_KAFKA__CONFIG='{"compression.type": "lz4"}'``);
    the typed fields are shortcuts for the properties in :data:`SHORTCUTS`. A shortcut that
    was set and a mapping that sets its property to another value is an error naming both.
    """

    bootstrap_servers: str = Field("127.0.0.1:9092", min_length=1)
    client_id: str = Field("streamrec", min_length=1, max_length=200)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    #: Longest wait of an empty fetch. None: 10 ms on the embedded broker (it holds an empty
    #: fetch for the whole wait even when data arrives, so this bounds click-to-recommendation
    #: latency there), the client's default (librdkafka 500 ms) on Kafka, which answers a
    #: fetch as soon as data arrives.
    fetch_max_wait_ms: int | None = Field(None, ge=1, le=60_000)
    #: Which broker this is: ``auto`` asks the cluster (the embedded broker, Tansu, answers
    #: with its own cluster id); ``embedded`` applies the embedded broker's workarounds
    #: (streamrec.kafka.tansu); ``kafka``: none of them (idempotent producers, acks=all,
    #: client-default group timeouts).
    broker: Literal["auto", "kafka", "embedded"] = "auto"
    #: librdkafka properties for every client (producers, consumers, admin) of every command
    config: dict[str, ConfigValue] = Field(default_factory=dict, repr=False)
    #: librdkafka properties for producers only (after ``config``)
    producer_config: dict[str, ConfigValue] = Field(default_factory=dict, repr=False)
    #: librdkafka properties for consumers only (after ``config``)
    consumer_config: dict[str, ConfigValue] = Field(default_factory=dict, repr=False)

    @model_validator(mode="after")
    def _check_mappings(self) -> KafkaSettings:
        for field, mapping in self._mappings():
            for name in mapping:
                if _canonical(name) in RESERVED:
                    raise ValueError(
                        f"kafka.{field} sets {name!r}, which streamrec sets itself for its "
                        "delivery guarantees; remove it"
                    )
        for shortcut, prop in SHORTCUTS.items():
            if shortcut not in self.model_fields_set:
                continue
            value = self._shortcut_value(shortcut)
            for field, mapping in self._mappings():
                for name, given in mapping.items():
                    if _canonical(name) == prop and str(given) != str(value):
                        raise ValueError(
                            f"kafka.{shortcut} ({_env_name('kafka', shortcut)}) and "
                            f"kafka.{field}[{name!r}] disagree; set one of them"
                        )
        return self

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        common = self.common_config()
        protocol = str(common.get("security.protocol", "PLAINTEXT")).upper()
        mechanism = str(common.get("sasl.mechanism", "")).upper()
        if protocol.startswith("SASL"):
            _check_sasl(protocol, mechanism, common)
        if protocol == "PLAINTEXT" and (self.sasl_username or self.sasl_password):
            warnings.warn(
                "kafka.security_protocol=PLAINTEXT with SASL credentials: the credentials are "
                "not used, and a protocol change to SASL_PLAINTEXT would send them unencrypted; "
                "use SASL_SSL",
                InsecureSettingWarning,
                stacklevel=2,
            )
        if protocol == "SASL_PLAINTEXT" and mechanism in ("PLAIN", "OAUTHBEARER"):
            warnings.warn(
                f"kafka.security_protocol=SASL_PLAINTEXT with sasl.mechanism={mechanism} sends "
                "the credentials unencrypted over the network; use SASL_SSL (or SCRAM)",
                InsecureSettingWarning,
                stacklevel=2,
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return self

    def _mappings(self) -> list[tuple[str, dict[str, ConfigValue]]]:
        return [
            ("config", self.config),
            ("producer_config", self.producer_config),
            ("consumer_config", self.consumer_config),
        ]

    def _shortcut_value(self, shortcut: str) -> Any:
        value = getattr(self, shortcut)
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, Path):
            return str(value)
        return value

    @property
    def bootstrap_list(self) -> list[str]:
        servers = str(self.common_config()["bootstrap.servers"])
        return [s.strip() for s in servers.split(",") if s.strip()]

    def common_config(self) -> dict[str, Any]:
        """The librdkafka properties of every client: the shortcuts, then ``config``."""
        conf: dict[str, Any] = {}
        for shortcut, prop in SHORTCUTS.items():
            value = self._shortcut_value(shortcut)
            if value is not None and prop != "fetch.wait.max.ms":
                conf[prop] = value
        conf.update({_canonical(k): v for k, v in self.config.items()})
        return conf

    def confluent_config(self) -> dict[str, Any]:
        """The flat client configuration every command passes around: the properties of
        every client, ``producer:``/``consumer:``-prefixed properties of one kind of client,
        and which broker it is for (:data:`BROKER_KEY`). Build clients from it with
        :mod:`streamrec.kafka.clients` (``producer``, ``consumer``, ``admin``), which split it.
        """
        conf = self.common_config()
        if self.fetch_max_wait_ms is not None:
            conf[CONSUMER_PREFIX + "fetch.wait.max.ms"] = self.fetch_max_wait_ms
        for name, value in self.producer_config.items():
            conf[PRODUCER_PREFIX + _canonical(name)] = value
        for name, value in self.consumer_config.items():
            conf[CONSUMER_PREFIX + _canonical(name)] = value
        conf[BROKER_KEY] = self.broker
        return conf


def _check_sasl(protocol: str, mechanism: str, conf: dict[str, Any]) -> None:
    """What a SASL protocol needs: a mechanism, and its credentials (PLAIN/SCRAM: user and
    password; OAUTHBEARER with ``sasl.oauthbearer.method=oidc``: the client credentials and
    the token endpoint, as librdkafka defines them)."""
    if not mechanism:
        raise ValueError(
            f"security_protocol={protocol} needs sasl_mechanism (or sasl.mechanism in kafka.config)"
        )
    if mechanism == "OAUTHBEARER":
        if str(conf.get("sasl.oauthbearer.method", "default")).lower() == "oidc":
            missing = [
                p
                for p in (
                    "sasl.oauthbearer.client.id",
                    "sasl.oauthbearer.client.secret",
                    "sasl.oauthbearer.token.endpoint.url",
                )
                if not conf.get(p)
            ]
            if missing:
                raise ValueError(
                    "sasl.oauthbearer.method=oidc needs " + ", ".join(missing) + " in kafka.config"
                )
        return
    if not (conf.get("sasl.username") and conf.get("sasl.password")):
        raise ValueError(
            f"security_protocol={protocol} with sasl.mechanism={mechanism} needs "
            "sasl_username and sasl_password"
        )


def _env_name(*path: str) -> str:
    return "STREAMREC_" + "__".join(p.upper() for p in path)


class TopicSettings(_Group):
    """Topic names and partition counts (create topics with their final partition count)."""

    clicks: str = Field("streamrec-clicks", min_length=1, max_length=249)
    recommendations: str = Field("streamrec-recommendations", min_length=1, max_length=249)
    dead_letter: str = Field("streamrec-dead-letter", min_length=1, max_length=249)
    partitions: int = Field(4, ge=1, le=1024)
    #: The live metrics topic (None: ``<app_id>-live-metrics``), one per worker group.
    live_metrics: str | None = Field(None, min_length=1, max_length=249)
    replication_factor: int = Field(1, ge=1, le=16)
    #: The partitioner of the clicks' producers (librdkafka's names): a click on another
    #: partition than its key's is dead-lettered ``wrong_partition``. ``consistent_random``:
    #: librdkafka's default (confluent-kafka, ``streamrec produce``); ``murmur2_random``: the
    #: Java client's; ``fnv1a_random``.
    partitioner: Partitioner = "consistent_random"


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
    #: An event time whose skew (event time - arrival) is more than this behind its
    #: partition's clock (the median skew of its recently active keys, one vote per key) is
    #: dead-lettered as timestamp_out_of_range.
    max_skew_seconds: float = Field(30 * 24 * 3600.0, gt=0)
    #: Recently active keys per partition whose skews make the partition's clock (each key
    #: votes once, with its latest accepted event): keys fewer than half of them cannot move it.
    clock_window: int = Field(1001, ge=1, le=100_000)
    #: Keys that must vote before a partition's clock is used (checks, sweep).
    clock_min_keys: int = Field(8, ge=1, le=100_000)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        # a setting of an earlier release: say what replaced it, not "extra inputs"
        if isinstance(data, dict) and "clock_min_events" in data:
            raise ValueError(
                "state.clock_min_events is now state.clock_min_keys (STREAMREC_STATE__"
                "CLOCK_MIN_KEYS): the clock counts keys, one vote each, so the old value does not "
                "carry over"
            )
        return data

    @model_validator(mode="after")
    def _check_clock(self) -> StateSettings:
        if self.clock_min_keys > self.clock_window:
            raise ValueError("clock_min_keys must not exceed clock_window")
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
    #: A/B: the share of keys (user id, else session id, by a stable hash) the registry's
    #: challenger answers; 0: none (``streamrec worker --challenger-share``).
    challenger_share: float = Field(0.0, ge=0, le=1)
    #: Shadow: the registry's challenger scores every click too, with states of its own; only
    #: the champion's answer is published (``streamrec worker --shadow``).
    shadow: bool = False
    #: How the top-k is found (docs/architecture.md, "Retrieval"). ``exact``: every item is
    #: scored; ``ann``: an approximate index (usearch HNSW, built beside the checkpoint when
    #: published, else at load) proposes candidates, which are scored exactly; ``auto``: ann
    #: on CPU from 500,000 items, exact below that and on a GPU.
    retrieval: Literal["exact", "ann", "auto"] = "auto"
    #: ann: candidates per click re-scored exactly
    ann_candidates: int = Field(100, ge=1, le=10_000)
    #: ann: search breadth per query (HNSW ef); more is slower and closer to exact
    ann_expansion_search: int = Field(128, ge=1, le=100_000)
    #: ann: graph degree and build breadth (HNSW M, efConstruction); changing them rebuilds
    ann_connectivity: int = Field(16, ge=2, le=256)
    ann_expansion_add: int = Field(128, ge=1, le=100_000)
    #: ann: ``hnsw`` (the graph), ``head``: exact scores over the ``ann_head_items`` items
    #: with the largest vectors, no graph, or ``head+hnsw``: the candidates of both
    #: (bench/results/catalogue-scale.md compares them at 1M items); ``head+successors``: the
    #: head, and the clicked item's ``ann_successors`` most frequent next items in the
    #: training log (a table published beside the checkpoint; not used if its hash differs)
    ann_index: Literal["hnsw", "head", "head+hnsw", "head+successors"] = "hnsw"
    ann_head_items: int = Field(130_000, ge=1)
    ann_successors: int = Field(20, ge=1, le=1_000)
    #: exact retrieval: scores in bf16, a shortlist re-scored in float32 and kept where a
    #: rounding bound proves it (else float32): the float32 top-k items, faster on CPUs with
    #: bf16 dot products (bench/results/catalogue-scale.md)
    bf16_shortlist: bool = False


class WorkerSettings(_Group):
    """Identity and ports of a worker process."""

    app_id: str = Field("streamrec", min_length=1, max_length=200)
    metrics_port: int = Field(9108, ge=0, le=65_535)
    #: Address of the metrics and health endpoints (/metrics, /healthz, /readyz). The
    #: default keeps them on this machine; a container whose metrics are scraped from
    #: another one sets 0.0.0.0 (docker-compose.yml does), behind its network's rules.
    metrics_host: str = Field("127.0.0.1", min_length=1, max_length=255)
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
    #: Live metrics: every click that continues a session is scored against the answer to
    #: the session's previous click (Recall@k, MRR@k per model version and arm), exported in
    #: /metrics and published to the live metrics topic with every checkpoint.
    live_metrics: bool = True


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
        msg = item["msg"]
        if item["type"] == "extra_forbidden" and item["loc"][:1] == ("kafka",):
            # e.g. STREAMREC_KAFKA__COMPRESSION_TYPE: a librdkafka property, not a shortcut
            prop = str(item["loc"][-1]).replace("_", ".")
            msg = (
                f"not a setting; librdkafka properties go in kafka.config, e.g. "
                f"STREAMREC_KAFKA__CONFIG='{{\"{prop}\": ...}}'"
            )
        lines.append(f"{where} ({env}): {msg}")
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
