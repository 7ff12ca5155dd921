"""The Faust worker: topics, tables, one thin agent and two timers around the pipeline.

* The agent takes micro-batches (``stream.take_events(max_events, within=max_wait)``) and runs
  :func:`streamrec.serving.pipeline.process_batch` in a one-thread executor, so neither the
  model step nor the decoding blocks the event loop (heartbeats keep flowing). Its state is
  the tables, one input partition at a time
  (:class:`~streamrec.engines.faust.tables.FaustPartition`): reads happen in that thread;
  writes are buffered and applied on the event loop afterwards, because Faust's changelog
  producer is not thread-safe.
* Recommendations and dead letters go out through a confluent-kafka producer from the
  executor thread and are flushed before the batch returns, i.e. before its events are acked;
  state writes go through the Faust tables (RocksDB + changelog), which Faust flushes before
  it commits offsets. So a committed offset always has its outputs and changelog on the broker.
* :class:`StreamrecApp` uses the transport of
  :func:`streamrec.engines.faust.transport.streamrec_transport`: a ``read_committed``
  consumer that waits ``StreamrecApp.fetch_max_wait_ms`` on an empty fetch (on the embedded
  broker 10 ms instead of Faust's hard-coded 1500 ms), and an idempotent producer on Kafka.
  The client configuration reaches Faust through
  :func:`~streamrec.engines.faust.transport.faust_app_kwargs`, which refuses what aiokafka
  cannot apply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust

from streamrec.engines.common import EngineBase, Outputs
from streamrec.engines.faust import compat
from streamrec.engines.faust.idle import IdleIndex
from streamrec.engines.faust.tables import FaustPartition
from streamrec.engines.faust.transport import faust_app_kwargs, streamrec_transport
from streamrec.kafka import clients, tansu
from streamrec.serving.arms import Models
from streamrec.serving.expiry import end_idle_sessions, expire_idle_users
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import BatchResult, Record, SweepResult
from streamrec.serving.state import STATE_LAYOUT
from streamrec.serving.state_store import SESSIONS, USERS, StateStore

log = logging.getLogger(__name__)

#: the idle sweep's work per step, while it holds the lock that batches wait for: chunks of
#: SWEEP_CHUNK_KEYS keys (index seeding: SWEEP_SEED_RECORDS records) until SWEEP_STEP_S is spent
SWEEP_STEP_S = 0.03
SWEEP_CHUNK_KEYS = 16
SWEEP_SEED_RECORDS = 2000
#: seconds between the liveness beats and the lag and state-count updates of the metrics
OBSERVE_INTERVAL_S = 1.0


class StreamrecApp(faust.App):
    """faust.App on the transport of :func:`streamrec_transport`: its consumer waits at most
    ``fetch_max_wait_ms`` on an empty fetch (None: Faust's own wait) and reads committed
    records; its producer is idempotent when ``idempotent_producer``."""

    fetch_max_wait_ms: int | None = None
    idempotent_producer: bool = False

    def _new_transport(self) -> Any:
        url = self.conf.broker_consumer[0]
        if url.scheme not in ("kafka", "aiokafka"):
            return super()._new_transport()
        return streamrec_transport()(self.conf.broker_consumer, self)


class Worker(EngineBase):
    """Everything one worker process holds: app, topics, tables, model, metrics."""

    def _build(self) -> None:
        settings, holder = self.settings, self.holder
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="streamrec-step")
        conf = self.conf
        app_kwargs = faust_app_kwargs(conf)  # refuses what aiokafka cannot apply, first
        embedded = clients.is_embedded(conf)
        self.outputs = Outputs(settings, conf=conf)
        self._live_generation: int | None = None
        self.lock = asyncio.Lock()
        self._topic_generation: int | None = None  # the consumer generation input_topic is of
        t = settings.topics
        w = settings.worker
        # Faust 0.15.3 loses inputs in two ways after a table recovery, and the embedded broker
        # under-reports end offsets: each loses data without its patch (compat's docstring).
        compat.install(clients.end_reader(conf) if embedded else None)
        app = StreamrecApp(
            w.app_id,
            **{**(tansu.FAUST_APP_SETTINGS if embedded else {}), **app_kwargs},
            store="rocksdb://",
            datadir=str(self.state_dir),
            processing_guarantee="at_least_once",
            broker_commit_interval=1.0,
            consumer_auto_offset_reset="earliest",
            topic_partitions=t.partitions,
            topic_replication_factor=t.replication_factor,
            topic_allow_declare=True,
            web_enabled=False,
            stream_buffer_maxsize=max(4096, 4 * settings.batching.max_events),
            broker_max_poll_records=max(500, settings.batching.max_events),
        )
        app.fetch_max_wait_ms = self._fetch_wait(embedded)
        producer_props = clients.role_config(conf, "producer")
        app.idempotent_producer = not embedded and str(
            producer_props.get("enable.idempotence", True)
        ).lower() not in ("false", "0")
        self.app = app
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw"}
        raw["value_serializer"] = "raw"
        self.clicks = app.topic(t.clicks, partitions=t.partitions, **raw)
        self.recs = app.topic(t.recommendations, partitions=t.partitions, **raw)
        self.dead = app.topic(t.dead_letter, partitions=t.partitions, **raw)
        # bytes values are stored and logged raw; str keys as JSON strings
        table: dict[str, Any] = {"key_type": str, "value_type": bytes, "partitions": t.partitions}
        # state layout 2 (namespaced keys, streamrec.serving.state.STATE_LAYOUT): new table
        # names, so the tables (and changelogs) of layout 1 are never read as if they were
        # namespaced
        self.sessions = app.Table(f"sessions-v{STATE_LAYOUT}", **table)
        self.users = app.Table(f"users-v{STATE_LAYOUT}", **table)
        self.tables = {SESSIONS: self.sessions, USERS: self.users}
        # last-activity indexes for the sweep (idle.py), rebuilt after every rebalance
        self.idle_sessions = IdleIndex()
        self.idle_users = IdleIndex()
        self.indexes = {SESSIONS: self.idle_sessions, USERS: self.idle_users}
        self._idle_generation: int | None = None
        app.agent(self.clicks, name="streamrec.clicks")(self._agent)
        app.timer(settings.state.sweep_interval_seconds)(self._sweep)
        app.timer(OBSERVE_INTERVAL_S)(self._observe)
        self.metrics.health.ready_check = self._ready
        if settings.model.reload_interval_s > 0 and holder.watch_dir is not None:
            app.timer(settings.model.reload_interval_s)(self._reload)

    def _fetch_wait(self, embedded: bool) -> int | None:
        """The consumer's longest empty-fetch wait: ``--fetch-wait-ms``, else the configured
        ``fetch.wait.max.ms``, else the embedded broker's, else Faust's own."""
        if self.fetch_max_wait_ms is not None:
            return self.fetch_max_wait_ms
        configured = clients.role_config(self.conf, "consumer").get("fetch.wait.max.ms")
        if configured is not None:
            return int(configured)
        return tansu.FETCH_MAX_WAIT_MS if embedded else None

    # ---- agent -------------------------------------------------------------------------
    async def _agent(self, stream: faust.StreamT) -> None:
        b = self.settings.batching
        within = b.max_wait_ms / 1000.0
        # faust's StreamT lacks take_events, which the Stream an agent is given has
        batches = stream.take_events(b.max_events, within=within)  # type: ignore[attr-defined]
        async for events in batches:
            await self.handle(events)

    async def handle(self, events: Sequence[faust.EventT]) -> BatchResult:
        received = time.time()
        records = [
            Record(
                e.message.value,
                e.message.key,
                e.message.topic,
                e.message.partition,
                e.message.offset,
                e.message.timestamp,
                received,
            )
            for e in events
        ]
        async with self.lock:
            parts = self._partitions({r.partition for r in records})
            model = self.arms.models()
            if self.live is not None and self.app.consumer_generation_id != self._live_generation:
                self.live.reset()  # a new assignment: read again where partitions are counted
                self._live_generation = self.app.consumer_generation_id
            loop = asyncio.get_running_loop()
            generation = self.app.consumer_generation_id
            if generation != self._topic_generation:  # a new assignment: learn the topic again
                actives = sorted(self._assigned_clicks())
                await loop.run_in_executor(self.executor, self.learn_input_topic, actives)
                self._topic_generation = generation
            store = StateStore(parts)
            res = await loop.run_in_executor(self.executor, self._step, records, store, model)
            self._apply(parts)
        self.metrics.observe_batch(len(records), res.stats, res.latencies(), res.model_seconds)
        return res

    def _partitions(self, partitions: Iterable[int]) -> dict[int, FaustPartition]:
        topic = self.clicks.get_topic_name()
        return {p: FaustPartition(self.tables, topic, p) for p in partitions}

    def _step(self, records: list[Record], store: StateStore, model: Any) -> BatchResult:
        """Executor thread: the core, then the outputs, delivered before the batch is acked.

        Outputs go through a confluent-kafka producer (C; ~100x cheaper per message than
        Faust's ``topic.send``) and are flushed here, so a batch's events are acked (and
        their offsets later committed) only after its recommendations are on the broker.
        """
        live = self.live
        if live is not None:
            live.load_watermarks({r.partition for r in records if not live.known(r.partition)})
        res = process_batch(
            records, store, model, self.config, clock=self.clock, topic=self.input_topic
        )
        self.outputs.publish(res)
        if live is not None:
            # durable before the batch's table writes reach the changelog (engines/live.py)
            live.add(res)
            live.publish(flush=True)
        self.outputs.flush()
        return res

    def _apply(self, partitions: Mapping[int, FaustPartition]) -> None:
        """Write the buffered state changes into the tables (event loop only)."""
        for part in partitions.values():
            part.apply(self.indexes)

    # ---- timers ------------------------------------------------------------------------
    async def _sweep(self) -> None:
        """The idle sweep in bounded steps (:meth:`_sweep_step`), through the last-activity
        indexes: the lock is released between steps, so a batch waits at most one step."""
        loop = asyncio.get_running_loop()
        while True:
            async with self.lock:
                if self.app.rebalancing or not self.app.tables.actives_ready:
                    return  # the tables are being restored: the next tick goes on
                actives = self._active_partitions()
                parts = self._partitions(actives)
                # faust.stores.rocksdb.Store: one rocksdict per partition in ``_dbs`` (read
                # here, on the event loop, which opens and closes them)
                rocks: tuple[Any, Any] = (self.sessions.data, self.users.data)
                dbs = tuple({p: db for p, db in r._dbs.items() if p in actives} for r in rocks)
                model = self.arms.models()
                t0 = time.monotonic()
                res, more = await loop.run_in_executor(
                    self.executor, self._sweep_step, StateStore(parts), model, sorted(actives), dbs
                )
                self._apply(parts)
                self.metrics.sweep_seconds.observe(time.monotonic() - t0)
            self.metrics.observe_sweep(res)
            if not more:
                return
            await asyncio.sleep(0)

    def _assigned_clicks(self) -> set[int]:
        clicks = self.clicks.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == clicks}

    def _active_partitions(self) -> set[int]:
        """The clicks partitions assigned here as actives; after a new assignment (consumer
        generation) the indexes start over, to be seeded from the local databases."""
        actives = self._assigned_clicks()
        generation = self.app.consumer_generation_id
        if generation != self._idle_generation:
            self.idle_sessions.reset(actives)
            self.idle_users.reset(actives)
            self._idle_generation = generation
        return actives

    def _sweep_step(
        self,
        store: StateStore,
        model: Models,
        partitions: list[int],
        dbs: tuple[Mapping[int, Any], ...],
    ) -> tuple[SweepResult, bool]:
        """Executor thread, under the lock: one step of seeding and sweeping, chunk by chunk
        until :data:`SWEEP_STEP_S` is spent. Returns (result, whether more is due)."""
        deadline = time.monotonic() + SWEEP_STEP_S
        self._seed_indexes(dbs, deadline)
        more = self.idle_sessions.seeding or self.idle_users.seeding
        res = SweepResult(counted=False)
        for p in partitions:
            if not self._sweep_partition(store, model, p, deadline, res):
                return res, True  # out of time
        return res, more

    def _seed_indexes(self, dbs: tuple[Mapping[int, Any], ...], deadline: float) -> None:
        """Read the local databases (sessions', users') into the indexes, until done or
        ``deadline``."""
        for index, table_dbs, table in (
            (self.idle_sessions, dbs[0], self.sessions),
            (self.idle_users, dbs[1], self.users),
        ):
            rocks: Any = table.data  # faust.stores.rocksdb.Store
            decode, skip = rocks._decode_key, (rocks.offset_key,)
            while index.seeding:
                if not index.seed(table_dbs, decode, SWEEP_SEED_RECORDS, skip):
                    break
                if time.monotonic() >= deadline:
                    break

    def _sweep_partition(
        self, store: StateStore, model: Models, p: int, deadline: float, res: SweepResult
    ) -> bool:
        """Sweep partition ``p`` in chunks of :data:`SWEEP_CHUNK_KEYS` until its indexes have
        nothing idle; False if ``deadline`` came first."""
        cfg, clock = self.config, self.clock
        now = clock.now(p)
        if now is None:
            return True  # this partition's clock has not seen enough events yet
        ttl = cfg.user_ttl_seconds
        while True:
            if time.monotonic() >= deadline:
                return False
            keys, m1 = self.idle_sessions.idle(p, now - cfg.session_gap_seconds, SWEEP_CHUNK_KEYS)
            if keys:
                res.sessions_ended += end_idle_sessions(store, p, keys, model, cfg, clock.now)
            m2 = False
            if ttl is not None:
                ukeys, m2 = self.idle_users.idle(p, now - ttl, SWEEP_CHUNK_KEYS)
                res.users_expired += expire_idle_users(store, p, ukeys, cfg, clock.now)
            if not (m1 or m2):
                return True

    def _ready(self) -> tuple[bool, str]:
        """/readyz (read from the metrics thread): the tables recovered after the last
        rebalance, the model loaded (it is, before the app starts)."""
        app = self.app
        if app.rebalancing:
            return False, "rebalancing: recovering the tables"
        if not app.tables.actives_ready:  # False until the first assignment is recovered
            return False, "waiting for partitions and their tables"
        return True, "tables recovered"

    async def _observe(self) -> None:
        """Every second on the event loop: the liveness beat, the clicks partitions' lag,
        and the state counts (the last-activity indexes hold every state of the active
        partitions once seeded after a rebalance)."""
        self.metrics.health.beat()
        if self.app.rebalancing:
            return
        clicks = self.clicks.get_topic_name()
        consumer: Any = self.app.consumer
        committed: Mapping[Any, int | None] = consumer._committed_offset  # next offsets
        lag: dict[int, tuple[int, int]] = {}
        for tp in self.app.assignor.assigned_actives():
            if tp.topic != clicks:
                continue
            done = committed.get(tp)
            done = -1 if done is None else int(done)
            end = max(int(consumer.highwater(tp) or -1), done)
            if end >= 0:
                lag[tp.partition] = (end, max(0, end - max(done, 0)))
        self.metrics.observe_lag(self.settings.worker.app_id, clicks, lag)
        if self._idle_generation == self.app.consumer_generation_id and not (
            self.idle_sessions.seeding or self.idle_users.seeding
        ):
            self.metrics.set_states(len(self.idle_sessions), len(self.idle_users))

    async def _reload(self) -> None:
        loop = asyncio.get_running_loop()
        # loading and validating take seconds: in a thread of their own, without the lock (the
        # batches go on); only the swap itself waits for the batch in progress
        swap = await loop.run_in_executor(None, self.arms.prepare_reload)
        if not swap:
            return
        async with self.lock:  # swaps happen between batches
            self.install_swap(swap)

    def run(self, loglevel: str = "info") -> None:
        """Run until SIGINT/SIGTERM (Faust's worker handles the signals and shuts down)."""
        import gc

        from faust.worker import Worker as FaustWorker

        if self.live is not None:
            self.live.ensure_topic()
        self.metrics.serve(self.settings.worker.metrics_port, self.settings.worker.metrics_host)
        gc.collect()
        gc.freeze()  # model, item index and imports: keep them out of every GC pass
        try:
            FaustWorker(self.app, loglevel=loglevel.lower(), quiet=True).execute_from_commandline()
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.outputs.producer.flush(10)
            if self.live is not None:
                self.live.close()
