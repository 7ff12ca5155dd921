"""What both worker engines share: the output producer and publishing, the model swap and
the metrics of a swap. The engines differ only in how they consume and keep state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from streamrec.engines.live import LiveMetrics
from streamrec.errors import StreamrecError
from streamrec.kafka import clients
from streamrec.metrics import Metrics
from streamrec.serving.arms import Arms, Swap
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.events import make_dead_letter
from streamrec.serving.input_topic import InputTopic
from streamrec.serving.records import BatchResult
from streamrec.serving.served_model import ModelHolder, ServingModel
from streamrec.settings import Settings

log = logging.getLogger(__name__)


class DeliveryError(StreamrecError, RuntimeError):
    """The broker refused outputs or changelog records: stop without committing offsets."""


class Outputs:
    """The worker's producer: recommendations, dead letters (and the native changelog).

    Sends are asynchronous; an engine flushes before it commits the input offsets, so a click
    is committed only after its answer is on the broker. A refused record is kept in
    :attr:`errors` for the engine to stop on (nothing is dropped silently).
    """

    def __init__(self, settings: Settings, conf: Mapping[str, Any] | None = None) -> None:
        self.topics = settings.topics
        self.errors: list[str] = []
        #: called while :meth:`wait` waits for the broker (the engine's liveness beat)
        self.heartbeat: Callable[[], None] = lambda: None
        self.producer = clients.producer(
            settings.kafka.confluent_config() if conf is None else conf,
            {
                "linger.ms": 1,
                "acks": "all",
                "message.timeout.ms": 600_000,  # a broker away for minutes: keep trying
                "log_level": 3,
            },
        )

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: Callable[[Any, Any], None] | None = None,
    ) -> None:
        """Hand one record to the producer. A full local queue is waited out. Any other
        refusal never drops data silently: an output (recommendation, dead letter) too large
        for the broker is replaced by a dead letter ``output_too_large`` that says so;
        anything else raises :class:`DeliveryError` (the engine stops without committing)."""
        while True:
            try:
                self.producer.produce(
                    topic,
                    value,
                    key,
                    partition=partition,
                    on_delivery=on_delivery or self._on_delivery,
                )
                return
            except BufferError:  # local queue full: let librdkafka send, then retry
                self.producer.poll(0.05)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                code = err.code() if isinstance(err, KafkaError) else None
                outputs = (self.topics.recommendations, self.topics.dead_letter)
                if code == KafkaError.MSG_SIZE_TOO_LARGE and topic in outputs and value:
                    log.error(
                        "output of %d bytes to %s too large; dead-lettered", len(value), topic
                    )
                    dead = make_dead_letter(
                        value[:4096], "output_too_large", f"{len(value)} bytes to {topic}", key=key
                    )
                    topic, value, key, partition = (
                        self.topics.dead_letter,
                        dead.to_bytes(),
                        None,
                        -1,
                    )
                    continue
                msg = f"cannot produce to {topic}: {exc}"
                self.errors.append(msg)
                raise DeliveryError(
                    f"{msg}; stopping without committing (nothing is lost: the input is "
                    "consumed again from the last committed offset)"
                ) from exc

    def publish(self, res: BatchResult) -> None:
        """A batch's recommendations and dead letters."""
        for key, value in res.recommendation_values():
            self.produce(self.topics.recommendations, value, key)
        for d in res.dead_letters:
            self.produce(self.topics.dead_letter, d.to_bytes())

    def wait(self) -> None:
        """Wait until every output is acknowledged (a broker away: keep waiting, never drop)."""
        while (left := self.producer.flush(30)) > 0:
            self.heartbeat()  # waiting for the broker is not a hung loop
            log.warning("%d outputs not yet delivered; retrying", left)

    def flush(self) -> None:
        """:meth:`wait`, then raise :class:`DeliveryError` if an output was refused."""
        self.wait()
        self.raise_errors()

    def raise_errors(self) -> None:
        if self.errors:
            err, self.errors = self.errors, []
            raise DeliveryError(f"could not deliver outputs: {err[:3]}")

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")


class EngineBase:
    """The state every engine holds beside its consumer: settings, the client configuration
    (``conf``: :meth:`streamrec.settings.KafkaSettings.confluent_config`, as
    :func:`streamrec.kafka.clients.connect` marks it), model, metrics, clock, where its state
    lives and how long an empty fetch waits (``fetch_max_wait_ms``: the ``--fetch-wait-ms``
    option, over any configuration). An engine builds the rest in :meth:`_build`."""

    def __init__(
        self,
        settings: Settings,
        holder: ModelHolder,
        *,
        challenger: ModelHolder | None = None,
        challenger_share: float = 0.0,
        shadow: bool = False,
        metrics: Metrics | None = None,
        datadir: Path | None = None,
        fetch_max_wait_ms: int | None = None,
        conf: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.conf = dict(settings.kafka.confluent_config() if conf is None else conf)
        self.holder = holder
        #: the champion (``holder``) and the challenger, when one is served beside it
        self.arms = Arms(holder, challenger, share=challenger_share, shadow=shadow)
        self.metrics = metrics or Metrics()
        self.config = CoreConfig.from_settings(settings)
        self.clock = StreamClock.from_config(self.config)
        self.state_dir = Path(datadir or settings.state.directory)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        for h in (holder, challenger):
            if h is not None:
                h.on_refusal = lambda reason: self.metrics.model_refusals.labels(reason).inc()
        #: live metrics: counters and the metrics topic (None when switched off)
        self.live = (
            LiveMetrics(settings, self.metrics.registry, self.conf)
            if self.config.live_metrics
            else None
        )
        #: the clicks topic as the engine knows it (learnt at each assignment)
        self.input_topic = InputTopic(partitioner=settings.topics.partitioner)
        self._model_to_metrics()
        self._build()

    def _build(self) -> None:
        """The engine's own consumer, state and timers."""
        raise NotImplementedError

    def learn_input_topic(self, new_partitions: list[int]) -> None:
        """What the broker says of the clicks topic now: its incarnation (a topic re-created
        since, or a restarted embedded broker, has another: the end bounds of the old one go),
        partition count, and the end bounds of the partitions just assigned."""
        facts = clients.topic_facts(self.conf, self.settings.topics.clicks, new_partitions)
        topic = self.input_topic
        if facts.topic_id != topic.incarnation:
            if topic.incarnation:
                log.warning(
                    "topic %s has a new incarnation (%s, was %s): positions of the old one are "
                    "not duplicates",
                    self.settings.topics.clicks,
                    facts.topic_id,
                    topic.incarnation,
                )
            topic.ends.clear()
            topic.incarnation = facts.topic_id
        topic.partitions = facts.partitions
        topic.ends.update(facts.end_bounds)

    def _model_to_metrics(self) -> None:
        m = self.holder.current
        created = str(m.metadata.get("created_at", ""))
        self.metrics.set_model(m.name, m.version, str(m.device), created)
        if self.live is not None:
            self.live.set_arms(self.arms.models())

    def install_model(self, new: ServingModel) -> None:
        """Swap in a champion already loaded and validated (``ModelHolder.prepare_reload``,
        run off the serving path); call between batches."""
        self.install_swap(Swap(new))

    def install_swap(self, swap: Swap) -> None:
        """Install what ``Arms.prepare_reload`` loaded off the serving path; call between
        batches."""
        self.arms.install(swap)
        self._model_to_metrics()
        self.metrics.model_swaps.inc(
            int(swap.champion is not None) + int(swap.challenger is not None)
        )
