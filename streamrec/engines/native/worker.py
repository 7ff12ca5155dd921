"""The native worker: the core driven by confluent-kafka, with RocksDB state per partition.

The data path (librdkafka fetches, sends and heartbeats in its own C threads):

1. ``consumer.consume(max_events, max_wait)``: up to B clicks, or what came within T ms;
2. :func:`streamrec.serving.pipeline.process_batch` (without the scoring) over the partitions'
   states (:mod:`streamrec.engines.native.store`), in a state thread; its state writes go to
   the partitions' pending sets;
3. :func:`streamrec.serving.pipeline.score_batch` (one matmul + top-k for the batch) in a
   scoring thread;
4. recommendations and dead letters handed to the C producer (asynchronous).

The stages overlap across batches: torch releases the GIL, so batch N's scoring runs on one
core while batch N+1 is applied and batch N-1 published on the other.

Every ``worker.commit_interval_s`` (and before partitions are revoked, and at shutdown) a
checkpoint, in the order that makes a committed offset imply durable results:
state writes so far frozen and sent to the changelog -> everything produced until then
(outputs and changelog) acknowledged by the broker -> input offsets committed -> the frozen
state written to RocksDB with the changelog offset it reached. In the loop the middle step
does not block: processing goes on, and the checkpoint completes on the first loop turn that
finds the producer empty (or blocks after a whole interval without one). A crash anywhere
replays events from the last committed offset; the offsets kept in each state recognise the
ones already applied.

State follows partitions through the changelog topic ``{app_id}-state-changelog`` (one
partition per clicks partition, keys ``s/<key>`` and ``u/<key>``, deletes as tombstones):
a newly assigned partition replays the changelog from the offset its local database holds
(everything, after a lost disk).

Why not Faust here: the Faust agent path (aiokafka decoding, Faust events, acks, per-write
changelog sends) costs ~250 µs per event in Python on this machine's cores, three times the
whole model step; see bench/results/serving-cpu.md. ``worker.engine=faust`` keeps it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamrec.engines.common import DeliveryError, EngineBase, Outputs
from streamrec.engines.native.store import (
    INDEX_SESSIONS,
    INDEX_USERS,
    SESSIONS,
    USERS,
    PartitionState,
    TableView,
)
from streamrec.kafka import tansu
from streamrec.kafka.clients import TopicSpec, ensure_topics
from streamrec.processes import on_stop_signal
from streamrec.serving.pipeline import (
    BatchResult,
    Record,
    SweepResult,
    message_key_partitions,
    process_batch,
    score_batch,
    sweep_idle,
)
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state import StateStore
from streamrec.settings import Settings

log = logging.getLogger(__name__)

RECOVERY_MAX_S = 600.0
#: the idle sweep's work per loop turn: chunks of candidate keys until this many seconds have
#: passed (then the loop polls again). A chunk is sized to what is left of the budget at the
#: measured cost per key (an HRNN session end advances a user state: ~0.1-1 ms a key), between
#: SWEEP_MIN_KEYS (progress even with no budget left) and SWEEP_STEP_KEYS, so a step overruns
#: its budget by at most about SWEEP_MIN_KEYS keys' work.
SWEEP_STEP_KEYS = 128
SWEEP_MIN_KEYS = 4
SWEEP_STEP_S = 0.03
#: the cost per key assumed before any is measured (pessimistic: the first chunk is small)
SWEEP_KEY_COST_S = 0.002
SWITCH_INTERVAL_S = 0.0005


def changelog_topic(settings: Settings) -> str:
    return f"{settings.worker.app_id}-state-changelog"


@dataclass
class _InFlight:
    """A batch whose core runs in the step thread."""

    records: list[Record]
    sessions: TableView
    users: TableView
    model: ServingModel  # the weights that advanced the states score them too
    future: Future[BatchResult]


@dataclass
class _Checkpoint:
    """A checkpoint begun: the input offsets it covers, and when it began (monotonic)."""

    offsets: dict[int, int]
    started: float


class NativeWorker(EngineBase):
    """One worker process: consumer group member, partition states, model, producer."""

    def _build(self) -> None:
        settings = self.settings
        self.datadir = self.state_dir / settings.topics.clicks
        self.clicks = settings.topics.clicks
        self.changelog = changelog_topic(settings)
        kafka = settings.kafka.confluent_config()
        self.consumer = Consumer(
            {
                **kafka,
                "group.id": settings.worker.app_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": self.fetch_max_wait_ms,
                **tansu.GROUP_TIMEOUTS,
                "log_level": 3,
            }
        )
        self.outputs = Outputs(settings, on_delivered=self._on_delivered)
        self.producer = self.outputs.producer
        self._recovery_config = {
            **kafka,
            "group.id": f"{settings.worker.app_id}-recovery",  # never commits
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "log_level": 3,
        }
        self.partitions: dict[int, PartitionState] = {}
        self._next_offsets: dict[int, int] = {}  # input partition -> offset to commit
        self._changelog_end: dict[int, int] = {}  # changelog partition -> last offset delivered
        self._stopping = False
        self._failed = False
        self.apply_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-apply")
        self.score_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-score")
        self.loader_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-loader")
        self._loading: Future[ServingModel | None] | None = None
        self._applying: _InFlight | None = None
        self._checkpoint: _Checkpoint | None = None
        self._scoring: deque[tuple[int, Future[BatchResult]]] = deque()
        self._sweep_key_cost = SWEEP_KEY_COST_S  # seconds per swept key, a moving average
        self._sweep_first = 0  # the partition the next sweep step starts with (round robin)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Consume until SIGINT/SIGTERM, then checkpoint and leave the group."""
        import gc

        on_stop_signal(self._on_signal)
        t = self.settings.topics
        ensure_topics(
            self.settings.kafka.confluent_config(),
            [
                TopicSpec(
                    self.changelog,
                    t.partitions,
                    t.replication_factor,
                    config=(("cleanup.policy", "compact"),),
                )
            ],
        )
        self.metrics.serve(self.settings.worker.metrics_port, self.settings.worker.metrics_host)
        gc.collect()
        gc.freeze()  # model, item index and imports: keep them out of every GC pass
        # The scoring thread gets the GIL back after every torch op; with the default 5 ms
        # switch interval it could wait that long behind the state thread's Python each time.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        b = self.settings.batching
        commit_every = self.settings.worker.commit_interval_s
        sweep_every = self.settings.state.sweep_interval_seconds
        reload_every = self.settings.model.reload_interval_s
        now = time.monotonic()
        next_commit, next_sweep, next_reload = now + commit_every, now + sweep_every, now
        sweep_more = False
        self.consumer.subscribe(
            [self.clicks],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while not self._stopping:
                # Three stages, each batch in order through all of them (see _start):
                # apply (state thread) -> score (scoring thread) -> publish (this thread).
                # While batch N is scored, N+1 is applied and N-1 published; N+1 starts only
                # after N's state writes are routed, so a key's events still apply in order.
                busy = self._applying is not None or bool(self._scoring)
                wait = 0.0 if busy else b.max_wait_ms / 1000.0
                messages = self.consumer.consume(b.max_events, wait)
                records = self._records(messages) if messages else []
                if self._applying is not None:
                    self._finish_apply()
                if records:
                    self._start(records)
                self._publish_scored(block=not records)
                self.producer.poll(0)  # delivery callbacks
                now = time.monotonic()
                if self._checkpoint is not None:
                    # wait for the broker only if it has been slow for a whole interval
                    self.finish_checkpoint(block=now - self._checkpoint.started > commit_every)
                if self._checkpoint is None and now >= next_commit:
                    self.begin_checkpoint()
                    next_commit = now + commit_every
                if now >= next_sweep or sweep_more:
                    # bounded: ~50 ms of work per loop turn, the rest on the next turns
                    sweep_more = self.sweep()
                    if now >= next_sweep:
                        next_sweep = now + sweep_every
                loaded = self._loading is not None and self._loading.done()
                if reload_every > 0 and (now >= next_reload or loaded):
                    self.reload()  # a loaded model is swapped in at once, not a tick later
                    if now >= next_reload:
                        next_reload = now + reload_every
        except BaseException:
            self._failed = True  # nothing more may be committed: the events will be redone
            raise
        finally:
            self.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("signal %d: stopping after this batch", signum)
        self._stopping = True

    def _records(self, messages: list[Any]) -> list[Record]:
        received = time.time()
        records = []
        for m in messages:
            err = m.error()
            if err is not None:
                log.warning("consumer: %s", err)
                continue
            ts_type, ts_ms = m.timestamp()
            records.append(
                Record(
                    m.value(),
                    m.key(),
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    ts_ms / 1000.0 if ts_type else None,  # 0: TIMESTAMP_NOT_AVAILABLE
                    received,
                )
            )
        return records

    def handle(self, records: list[Record]) -> None:
        """One micro-batch through every stage (the loop overlaps the stages of batches)."""
        self._start(records)
        self._drain()

    def _start(self, records: list[Record]) -> None:
        """Stage 1 in the state thread: apply the batch to the states (the core without the
        scoring); its state writes stay buffered in the views."""
        assert self._applying is None
        where = message_key_partitions(records)
        sessions = TableView(self.partitions, SESSIONS, where)
        users = TableView(self.partitions, USERS, where)
        model = self.holder.current
        future = self.apply_thread.submit(
            process_batch,
            records,
            StateStore(sessions, users),
            model,
            self.config,
            clock=self.clock,
            score=False,
        )
        self._applying = _InFlight(records, sessions, users, model, future)

    def _finish_apply(self) -> None:
        """Route stage 1's state writes, note the offsets, and queue stage 2 (scoring)."""
        batch, self._applying = self._applying, None
        assert batch is not None
        res = batch.future.result()
        batch.sessions.route(res.key_partitions)
        batch.users.route(res.key_partitions)
        for r in batch.records:  # records are in offset order per partition
            self._next_offsets[r.partition] = r.offset + 1
        scored = self.score_thread.submit(score_batch, res, batch.model, self.config)
        self._scoring.append((len(batch.records), scored))

    def _publish_scored(self, block: bool) -> None:
        """Stage 3: hand scored batches to the producer, oldest first. Waits for the oldest
        if ``block`` or if two are queued (bounds the pipeline)."""
        while self._scoring and (block or len(self._scoring) > 1 or self._scoring[0][1].done()):
            n_records, future = self._scoring.popleft()
            res = future.result()
            self._publish(res)
            self.metrics.observe_batch(n_records, res.stats, res.latencies(), res.model_seconds)

    def _publish(self, res: BatchResult) -> None:
        """Outputs to the producer (asynchronous; delivered before the offsets are committed,
        at the checkpoint)."""
        self.outputs.publish(res)

    def _drain(self) -> None:
        """Take every batch in flight through all stages (before checkpoints, rebalances and
        timers: they need every state write routed and every output handed over)."""
        if self._applying is not None:
            self._finish_apply()
        self._publish_scored(block=True)

    # ---- output ------------------------------------------------------------------------------
    def _on_delivered(self, msg: Any) -> None:
        if msg.topic() == self.changelog:
            p = msg.partition()
            self._changelog_end[p] = max(self._changelog_end.get(p, -1), msg.offset())

    # ---- checkpoint ----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """A whole checkpoint, waiting for the broker (before a revoke, at shutdown)."""
        self.begin_checkpoint()
        self.finish_checkpoint(block=True)

    def begin_checkpoint(self) -> None:
        """Freeze the state writes so far, send them to the changelog, and note the input
        offsets they cover; :meth:`finish_checkpoint` completes it once the broker has
        acknowledged every record produced until now (outputs included)."""
        if self._checkpoint is not None:
            self.finish_checkpoint(block=True)
        started = time.monotonic()
        self._drain()  # every batch applied so far has its outputs handed to the producer
        for p, state in self.partitions.items():
            for key, value in state.begin_checkpoint().items():
                self.outputs.produce(self.changelog, value, key, p)
        self._checkpoint = _Checkpoint(dict(self._next_offsets), started)
        self._next_offsets.clear()

    def finish_checkpoint(self, block: bool) -> bool:
        """Commit the input offsets and write the frozen states to RocksDB, once nothing
        produced before the checkpoint began is still unacknowledged. Without ``block`` it
        returns False instead of waiting (so the loop never stalls on the broker)."""
        ck = self._checkpoint
        if ck is None:
            return True
        if block:
            self.outputs.wait()
        else:
            self.producer.poll(0)
            if len(self.producer) > 0:  # queued, in flight, or delivery reports not yet served
                return False
        try:
            self.outputs.raise_errors()
        except DeliveryError:
            self._failed = True  # commit nothing from now on
            raise
        if ck.offsets:
            offsets = [TopicPartition(self.clicks, p, o) for p, o in ck.offsets.items()]
            try:
                # Asynchronous in the loop: a commit that fails is harmless (below), and this
                # thread should not wait a broker round trip every second. (Two calls: the
                # stub types `commit` by the literal value of `asynchronous`.)
                if block:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
                else:
                    self.consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:
                # e.g. a rebalance under way. Outputs and states are on the broker already;
                # whoever owns the partition next redoes these events and the offsets stored
                # in the states mark them as applied.
                log.warning("offset commit failed (%s); events will be re-read", exc)
        for p, state in self.partitions.items():
            state.commit(self._changelog_end.pop(p, None))
        self._checkpoint = None
        self.metrics.checkpoint_seconds.observe(time.monotonic() - ck.started)
        return True

    # ---- partitions come and go ------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        wanted = {tp.partition for tp in assigned}
        for p in [p for p in self.partitions if p not in wanted]:
            self.partitions.pop(p).close()
        # Partitions kept across the rebalance were checkpointed at the revoke and nobody else
        # can have owned them in between (eager rebalancing): their local state is current.
        new = [PartitionState(self.datadir / str(p), p) for p in wanted - set(self.partitions)]
        if new:
            t0 = time.monotonic()
            n = self._recover(new)
            log.info(
                "recovered partitions %s: %d changelog records in %.2f s",
                sorted(s.partition for s in new),
                n,
                time.monotonic() - t0,
            )
        self.partitions.update({s.partition: s for s in new})
        log.info("ready: %s partitions %s", self.clicks, sorted(self.partitions))

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        if self._failed:
            return
        self.checkpoint()  # states stay open until the next assignment says whether they stay

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        # Someone else may own them now: forget what was not checkpointed and recover later.
        log.warning("partitions lost: %s", sorted(tp.partition for tp in lost))
        self._drain()
        for tp in lost:
            if self._checkpoint is not None:
                self._checkpoint.offsets.pop(tp.partition, None)
            self._changelog_end.pop(tp.partition, None)
            state = self.partitions.pop(tp.partition, None)
            if state is not None:
                state.discard_pending()
                state.close()
            self._next_offsets.pop(tp.partition, None)

    def _recover(self, states: Iterable[PartitionState]) -> int:
        """Replay each partition's changelog from the offset its database holds to the end."""
        by_partition = {s.partition: s for s in states}
        reader = Consumer(self._recovery_config)
        try:
            reader.list_topics(self.changelog, timeout=30)  # connect before timing anything
            assign, ends = [], {}
            for p, state in by_partition.items():
                low, high = reader.get_watermark_offsets(
                    TopicPartition(self.changelog, p), timeout=30
                )
                if high <= 0:
                    continue  # empty changelog partition
                start = max(state.changelog_offset + 1, low)
                assign.append(TopicPartition(self.changelog, p, start))
                ends[p] = high
            if not assign:
                return 0
            # the reported ends can be short of the log's end on the embedded broker
            true_ends = tansu.true_end_offsets(
                self._recovery_config, {(self.changelog, p): e for p, e in ends.items()}
            )
            ends = {p: true_ends[(self.changelog, p)] for p in ends}
            reader.assign(assign)
            reached = {tp.partition: tp.offset >= ends[tp.partition] for tp in assign}
            total = 0
            t0 = time.monotonic()
            while not all(reached.values()):
                if time.monotonic() - t0 > RECOVERY_MAX_S:
                    raise TimeoutError(f"changelog recovery took over {RECOVERY_MAX_S} s")
                batch: dict[int, list[tuple[bytes | None, bytes | None, int]]] = defaultdict(list)
                for m in reader.consume(10_000, 0.1):
                    if m.error() is not None:
                        continue
                    part, offset = m.partition(), m.offset()
                    assert part is not None and offset is not None  # set on consumed records
                    batch[part].append((m.key(), m.value(), offset))
                for p, records in batch.items():
                    total += by_partition[p].apply_changelog(records)
                    reached[p] = reached[p] or records[-1][2] + 1 >= ends[p]
            return total
        finally:
            reader.close()

    # ---- timers ------------------------------------------------------------------------------
    def sweep(self, budget_s: float = SWEEP_STEP_S) -> bool:
        """One bounded step of the idle sweep: close idle sessions (advancing HRNN user
        states) and expire idle users, found through each partition's last-activity index
        (oldest first, :meth:`PartitionState.idle_candidates`), so the work is what expires,
        not what is stored. Returns whether more may remain (the loop calls again).

        Each chunk is sized to the budget left (:data:`SWEEP_STEP_KEYS`); partitions take
        turns at being first, so one partition with much to expire does not starve the rest."""
        self._drain()
        t0 = time.monotonic()
        model, cfg = self.holder.current, self.config
        ended = expired = 0
        more = False
        order = sorted(self.partitions)
        first = self._sweep_first % len(order) if order else 0
        chunks = 0
        for i in range(len(order)):
            at = (first + i) % len(order)
            p = order[at]
            state = self.partitions[p]
            now = self.clock.now(p)
            if now is None:
                continue  # this partition's clock has not seen enough events yet
            one = {p: state}
            where: dict[str, int] = {}
            sessions, users = TableView(one, SESSIONS, where), TableView(one, USERS, where)
            store = StateStore(sessions, users)
            worked = done = False
            while True:
                left = budget_s - (time.monotonic() - t0)
                if left <= 0 and chunks:
                    break  # spent; every step gets through at least one chunk
                n = min(SWEEP_STEP_KEYS, max(SWEEP_MIN_KEYS, int(left / self._sweep_key_cost)))
                t_chunk = time.monotonic()
                keys, m1 = state.idle_candidates(INDEX_SESSIONS, now - cfg.session_gap_seconds, n)
                if keys:
                    res = sweep_idle(
                        store, model, cfg, clock=self.clock, keys=keys, sweep_users=False
                    )
                    ended += res.sessions_ended
                m2 = False
                ukeys: list[str] = []
                if cfg.user_ttl_seconds is not None:
                    ukeys, m2 = state.idle_candidates(INDEX_USERS, now - cfg.user_ttl_seconds, n)
                    for key in ukeys:
                        u = store.get_user(key)
                        if u is None or now - u.last_time <= cfg.user_ttl_seconds:
                            continue
                        if key in store.sessions:
                            continue  # its session's end rewrites (and re-indexes) it
                        store.delete_user(key)
                        expired += 1
                chunks += 1
                worked = True
                if keys or ukeys:
                    per_key = (time.monotonic() - t_chunk) / (len(keys) + len(ukeys))
                    self._sweep_key_cost = max(1e-6, 0.7 * self._sweep_key_cost + 0.3 * per_key)
                if not (m1 or m2):
                    done = True  # this partition is done
                    break
            routed = {k: p for k in (*sessions.writes, *users.writes)}
            sessions.route(routed)
            users.route(routed)
            if not done:
                more = True
                # round robin: the next step begins after a partition that got work done
                # (one with much to expire does not hold up the others), else with this one
                self._sweep_first = (at + 1) % len(order) if worked else at
                break
        self.metrics.observe_sweep(
            SweepResult(sessions_ended=ended, users_expired=expired, counted=False)
        )
        self.metrics.sweep_seconds.observe(time.monotonic() - t0)
        return more

    def reload(self) -> None:
        """Look for a newer checkpoint in the loader thread; swap it in, between batches, on a
        later call once it is loaded and validated. Loading and the held-out gate take seconds
        (a GRU4Rec of 17k items: ~3 s on the dev VM), which the poll loop used to wait for."""
        loading = self._loading
        if loading is None:
            self._loading = self.loader_thread.submit(self.holder.prepare_reload)
            return
        if not loading.done():
            return
        self._loading = None
        new = loading.result()
        if new is None:
            return
        self._drain()  # swaps happen between batches
        self.install_model(new)

    # ---- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        try:
            if not self._failed:
                self.checkpoint()
        finally:
            self.consumer.close()  # leaves the group (on_revoke checkpoints what is left)
            for state in self.partitions.values():
                state.close()
            self.partitions.clear()
            self.producer.flush(10)
            self.apply_thread.shutdown(wait=False, cancel_futures=True)
            self.score_thread.shutdown(wait=False, cancel_futures=True)
            self.loader_thread.shutdown(wait=False, cancel_futures=True)
