"""The Faust worker: topics, tables, one thin agent and two timers around ``core``.

* The agent takes micro-batches (``stream.take_events(max_events, within=max_wait)``) and runs
  :func:`streamrec.serving.pipeline.process_batch` in a one-thread executor, so neither the
  model step nor the decoding blocks the event loop (heartbeats keep flowing). Reads of the
  RocksDB tables happen in that thread; writes are buffered (:class:`_Overlay`) and applied on
  the event loop afterwards, because Faust's changelog producer is not thread-safe.
* Faust tables take the changelog partition from "the current event". A batch mixes
  partitions, so each write is done under a stand-in event of the key's own partition.
* Recommendations and dead letters go out through a confluent-kafka producer from the
  executor thread and are flushed before the batch returns, i.e. before its events are acked;
  state writes go through the Faust tables (RocksDB + changelog), which Faust flushes before
  it commits offsets. So a committed offset always has its outputs and changelog on the broker.
* :class:`StreamrecApp` uses the transport of
  :func:`streamrec.kafka.tansu.faust_fast_fetch_transport`, whose consumer waits
  ``StreamrecApp.fetch_max_wait_ms`` (10 ms by default) on an empty fetch instead of Faust's
  hard-coded 1500 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.streams import _current_event

from streamrec.engines.common import EngineBase, Outputs
from streamrec.engines.faust import compat
from streamrec.engines.faust.idle import IdleIndex, encoded_last_time
from streamrec.kafka import tansu
from streamrec.serving.pipeline import (
    BatchResult,
    Record,
    SweepResult,
    message_key_partitions,
    process_batch,
    sweep_idle,
)
from streamrec.serving.state import STATE_LAYOUT, BufferedTable, StateStore

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 10
#: the idle sweep's work per step, while it holds the lock that batches wait for: chunks of
#: SWEEP_CHUNK_KEYS keys (index seeding: SWEEP_SEED_RECORDS records) until SWEEP_STEP_S is spent
SWEEP_STEP_S = 0.03
SWEEP_CHUNK_KEYS = 16
SWEEP_SEED_RECORDS = 2000


class StreamrecApp(faust.App):
    """faust.App whose Kafka consumer waits at most ``fetch_max_wait_ms`` on an empty fetch."""

    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS

    def _new_transport(self) -> Any:
        url = self.conf.broker_consumer[0]
        if url.scheme not in ("kafka", "aiokafka"):
            return super()._new_transport()
        return tansu.faust_fast_fetch_transport()(self.conf.broker_consumer, self)


# ---- table access from the batch ----------------------------------------------------------
class _PartitionEvent:
    """The minimum of an event that Faust tables read: ``message.topic``/``message.partition``."""

    class _Msg:
        __slots__ = ("partition", "topic")

        def __init__(self, topic: str, partition: int) -> None:
            self.topic, self.partition = topic, partition

    __slots__ = ("__weakref__", "message")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = self._Msg(topic, partition)


@contextlib.contextmanager
def _in_partition(event: _PartitionEvent) -> Iterator[None]:
    token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]  # tables read only .message
    try:
        yield
    finally:
        _current_event.reset(token)


class _Overlay(BufferedTable):
    """Reads through to a Faust table's store; writes are buffered for the event loop.

    ``partitions`` (key -> partition, from the Kafka message keys of the batch) lets a read
    go to that partition's RocksDB only; without it Faust probes every partition's DB.
    """

    def __init__(
        self, base: Mapping[str, bytes], partitions: Mapping[str, int] | None = None, topic=""
    ) -> None:
        super().__init__()
        self.base = base
        # the caller's mapping itself (the sweep fills it as it goes), not a copy
        self.partitions = partitions if partitions is not None else {}
        self.topic = topic

    def _read_base(self, key: str) -> bytes | None:
        part = self.partitions.get(key)
        if part is None:
            return self.base.get(key)
        with _in_partition(_PartitionEvent(self.topic, part)):
            return self.base.get(key)

    def _base_keys(self) -> Iterable[str]:
        return list(self.base.keys())


class Worker(EngineBase):
    """Everything one worker process holds: app, topics, tables, model, metrics."""

    def _build(self) -> None:
        settings, holder = self.settings, self.holder
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="streamrec-step")
        self.outputs = Outputs(settings)
        self.lock = asyncio.Lock()
        t = settings.topics
        w = settings.worker
        # Faust 0.15.3 loses inputs in two ways after a table recovery, and the embedded broker
        # under-reports end offsets: each loses data without its patch (compat's docstring).
        compat.install(settings.kafka.confluent_config())
        app = StreamrecApp(
            w.app_id,
            **settings.kafka.faust_broker_kwargs(),
            store="rocksdb://",
            datadir=str(self.state_dir),
            processing_guarantee="at_least_once",
            **tansu.FAUST_APP_SETTINGS,
            broker_commit_interval=1.0,
            consumer_auto_offset_reset="earliest",
            topic_partitions=t.partitions,
            topic_replication_factor=t.replication_factor,
            topic_allow_declare=True,
            web_enabled=False,
            stream_buffer_maxsize=max(4096, 4 * settings.batching.max_events),
            broker_max_poll_records=max(500, settings.batching.max_events),
        )
        app.fetch_max_wait_ms = self.fetch_max_wait_ms
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
        # last-activity indexes for the sweep (idle.py), rebuilt after every rebalance
        self.idle_sessions = IdleIndex()
        self.idle_users = IdleIndex()
        self._idle_generation: int | None = None
        app.agent(self.clicks, name="streamrec.clicks")(self._agent)
        app.timer(settings.state.sweep_interval_seconds)(self._sweep)
        if settings.model.reload_interval_s > 0 and holder.watch_dir is not None:
            app.timer(settings.model.reload_interval_s)(self._reload)

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
        hint = message_key_partitions(records)
        topic = self.clicks.get_topic_name()
        async with self.lock:
            store = StateStore(
                _Overlay(self.sessions.data, hint, topic), _Overlay(self.users.data, hint, topic)
            )
            model = self.holder.current
            loop = asyncio.get_running_loop()
            res = await loop.run_in_executor(self.executor, self._step, records, store, model)
            self._apply(store, res.key_partitions)
        self.metrics.observe_batch(len(records), res.stats, res.latencies(), res.model_seconds)
        return res

    def _step(self, records: list[Record], store: StateStore, model: Any) -> BatchResult:
        """Executor thread: the core, then the outputs, delivered before the batch is acked.

        Outputs go through a confluent-kafka producer (C; ~100x cheaper per message than
        Faust's ``topic.send``) and are flushed here, so a batch's events are acked (and
        their offsets later committed) only after its recommendations are on the broker.
        """
        res = process_batch(records, store, model, self.config, clock=self.clock)
        self.outputs.publish(res)
        self.outputs.flush()
        return res

    def _apply(self, store: StateStore, partitions: Mapping[str, int]) -> None:
        """Write buffered state changes, each under its key's partition (event loop only)."""
        topic = self.clicks.get_topic_name()
        for table, overlay, index in (
            (self.sessions, store.sessions, self.idle_sessions),
            (self.users, store.users, self.idle_users),
        ):
            assert isinstance(overlay, _Overlay)
            for key, value in overlay.writes.items():
                part = partitions.get(key)
                if part is None:
                    log.warning("no partition known for state key %r; write skipped", key)
                    continue
                with _in_partition(_PartitionEvent(topic, part)):
                    if value is None:
                        if key in table:
                            del table[key]
                        index.forget(key, part)
                    else:
                        table[key] = value
                        t = encoded_last_time(value)
                        if t is not None:
                            index.note(part, key, t)

    # ---- timers ------------------------------------------------------------------------
    async def _sweep(self) -> None:
        """The idle sweep in bounded steps (:meth:`_sweep_step`), through the last-activity
        indexes: the lock is released between steps, so a batch waits at most one step."""
        loop = asyncio.get_running_loop()
        while True:
            async with self.lock:
                if self.app.rebalancing or not self.app.tables.actives_ready:
                    return  # the tables are being restored: the next tick goes on
                clicks = self.clicks.get_topic_name()
                actives = {
                    tp.partition
                    for tp in self.app.assignor.assigned_actives()
                    if tp.topic == clicks
                }
                generation = self.app.consumer_generation_id
                if generation != self._idle_generation:
                    # new assignment: what the local databases hold is read into the indexes
                    self.idle_sessions.reset(actives)
                    self.idle_users.reset(actives)
                    self._idle_generation = generation
                # faust.stores.rocksdb.Store: one rocksdict per partition in ``_dbs``
                rocks: tuple[Any, Any] = (self.sessions.data, self.users.data)
                dbs = tuple({p: db for p, db in r._dbs.items() if p in actives} for r in rocks)
                where: dict[str, int] = {}
                store = StateStore(
                    _Overlay(self.sessions.data, where, clicks),
                    _Overlay(self.users.data, where, clicks),
                )
                model = self.holder.current
                t0 = time.monotonic()
                res, more = await loop.run_in_executor(
                    self.executor, self._sweep_step, store, model, sorted(actives), dbs, where
                )
                self._apply(store, res.key_partitions)
                self.metrics.sweep_seconds.observe(time.monotonic() - t0)
            self.metrics.observe_sweep(res)
            if not more:
                return
            await asyncio.sleep(0)

    def _sweep_step(
        self,
        store: StateStore,
        model: Any,
        partitions: list[int],
        dbs: tuple[Mapping[int, Any], ...],
        where: dict[str, int],
    ) -> tuple[SweepResult, bool]:
        """Executor thread, under the lock: one step of seeding and sweeping, chunk by chunk
        until :data:`SWEEP_STEP_S` is spent. Returns (result, whether more is due)."""
        t0 = time.monotonic()
        cfg = self.config
        res = SweepResult(counted=False)

        def spent() -> bool:
            return time.monotonic() - t0 >= SWEEP_STEP_S

        for index, table_dbs, table in (
            (self.idle_sessions, dbs[0], self.sessions),
            (self.idle_users, dbs[1], self.users),
        ):
            rocks: Any = table.data  # faust.stores.rocksdb.Store
            decode, skip = rocks._decode_key, (rocks.offset_key,)
            while index.seeding:
                if not index.seed(table_dbs, decode, SWEEP_SEED_RECORDS, skip) or spent():
                    break
        more = self.idle_sessions.seeding or self.idle_users.seeding
        for p in partitions:
            now = self.clock.now(p)
            if now is None:
                continue  # this partition's clock has not seen enough events yet
            while True:
                if spent():
                    return res, True
                keys, m1 = self.idle_sessions.idle(
                    p, now - cfg.session_gap_seconds, SWEEP_CHUNK_KEYS
                )
                for key in keys:
                    where[key] = p
                if keys:
                    r = sweep_idle(
                        store, model, cfg, clock=self.clock, keys=keys, sweep_users=False
                    )
                    res.sessions_ended += r.sessions_ended
                    res.key_partitions.update(r.key_partitions)
                m2 = False
                if cfg.user_ttl_seconds is not None:
                    ukeys, m2 = self.idle_users.idle(
                        p, now - cfg.user_ttl_seconds, SWEEP_CHUNK_KEYS
                    )
                    for key in ukeys:
                        where[key] = p
                        u = store.get_user(key)
                        if u is None or now - u.last_time <= cfg.user_ttl_seconds:
                            continue
                        if key in store.sessions:
                            continue  # its session's end rewrites (and re-notes) it
                        store.delete_user(key)
                        res.key_partitions[key] = p
                        res.users_expired += 1
                if not (m1 or m2):
                    break
        return res, more

    async def _reload(self) -> None:
        loop = asyncio.get_running_loop()
        # loading and validating take seconds: in a thread of their own, without the lock (the
        # batches go on); only the swap itself waits for the batch in progress
        new = await loop.run_in_executor(None, self.holder.prepare_reload)
        if new is None:
            return
        async with self.lock:  # swaps happen between batches
            self.install_model(new)

    def run(self, loglevel: str = "info") -> None:
        """Run until SIGINT/SIGTERM (Faust's worker handles the signals and shuts down)."""
        import gc

        from faust.worker import Worker as FaustWorker

        self.metrics.serve(self.settings.worker.metrics_port, self.settings.worker.metrics_host)
        gc.collect()
        gc.freeze()  # model, item index and imports: keep them out of every GC pass
        try:
            FaustWorker(self.app, loglevel=loglevel.lower(), quiet=True).execute_from_commandline()
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.outputs.producer.flush(10)
