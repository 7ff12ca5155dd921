"""The native worker: the core driven by confluent-kafka, with RocksDB state per partition.

The data path (librdkafka fetches, sends and heartbeats in its own C threads):
``consumer.consume(max_events, max_wait)`` (up to B clicks, or what came within T ms) ->
the three-stage pipeline (:mod:`streamrec.engines.native.stages`: apply in a state thread,
score in a scoring thread, publish to the C producer here) over the partitions' states
(:mod:`streamrec.engines.native.store`).

This module is the poll loop and what happens around it; each part has a module of its own:

* the checkpoint (every ``worker.commit_interval_s``, before partitions are revoked, and at
  shutdown; :mod:`streamrec.engines.native.checkpoint`): state writes to the changelog ->
  outputs and changelog acknowledged -> input offsets committed -> state to RocksDB;
* changelog recovery of newly assigned partitions (:mod:`streamrec.engines.native.recovery`);
* the idle sweep in bounded steps (:mod:`streamrec.engines.native.sweep`);
* model reloads, loaded and validated in a loader thread, swapped in between batches.

Why not Faust here: the Faust agent path (aiokafka decoding, Faust events, acks, per-write
changelog sends) costs ~250 µs per event in Python on this machine's cores, three times the
whole model step; see bench/results/serving-cpu.md. ``worker.engine=faust`` keeps it.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from streamrec.engines.common import DeliveryError, EngineBase, Outputs
from streamrec.engines.native.checkpoint import Checkpoints
from streamrec.engines.native.recovery import changelog_topic, recover, recovery_group
from streamrec.engines.native.stages import Stages, to_records
from streamrec.engines.native.store import RocksDBPartition
from streamrec.engines.native.sweep import SWEEP_STEP_S, Sweeper
from streamrec.kafka import clients, tansu
from streamrec.kafka.clients import TopicSpec, ensure_topics
from streamrec.processes import on_stop_signal
from streamrec.serving.arms import Swap
from streamrec.serving.events import make_dead_letter
from streamrec.serving.state_store import StateStore

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005


class NativeWorker(EngineBase):
    """One worker process: consumer group member, partition states, model, producer."""

    def _build(self) -> None:
        settings = self.settings
        self.datadir = self.state_dir / settings.topics.clicks
        self.clicks = settings.topics.clicks
        self.changelog = changelog_topic(settings)
        fixed: dict[str, Any] = {"enable.auto.commit": False, "auto.offset.reset": "earliest"}
        if self.fetch_max_wait_ms is not None:
            fixed["fetch.wait.max.ms"] = self.fetch_max_wait_ms
        self.consumer = clients.consumer(
            self.conf, settings.worker.app_id, joins_group=True, fixed=fixed, site={"log_level": 3}
        )
        #: frees the group when a departed leader holds it (an embedded-broker bug)
        self.join_watch = tansu.JoinWatch(
            self.conf,
            settings.worker.app_id,
            [self.clicks],
            tansu.GROUP_TIMEOUTS["session.timeout.ms"],
            enabled=clients.is_embedded(self.conf),
        )
        self.partitions: dict[int, RocksDBPartition] = {}
        self.store = StateStore(self.partitions)  # live: sees partitions as they come and go
        self.outputs = Outputs(settings, conf=self.conf)
        self.outputs.heartbeat = self.metrics.health.beat
        self.producer = self.outputs.producer
        self.metrics.health.set_ready(False, "waiting for partitions")
        self.checkpoints = Checkpoints(
            self.consumer, self.outputs, self.partitions, self.clicks, self.changelog, self.metrics
        )
        self.stages = Stages(
            self.store,
            self.arms,
            self.config,
            self.clock,
            self.outputs,
            self.metrics,
            self.checkpoints.send_changelog,
            self.input_topic,
            self.live,
        )
        self.sweeper = Sweeper()
        self._stopping = False
        self._failed = False
        self.loader_thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-loader")
        self._loading: Future[Swap] | None = None

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Consume until SIGINT/SIGTERM, then checkpoint and leave the group."""
        on_stop_signal(self._on_signal)
        t = self.settings.topics
        ensure_topics(
            self.conf,
            [
                TopicSpec(
                    self.changelog,
                    t.partitions,
                    t.replication_factor,
                    config=(("cleanup.policy", "compact"),),
                )
            ],
        )
        if self.live is not None:
            self.live.ensure_topic()
        self.metrics.serve(self.settings.worker.metrics_port, self.settings.worker.metrics_host)
        gc.collect()
        gc.freeze()  # model, item index and imports: keep them out of every GC pass
        # The scoring thread gets the GIL back after every torch op; with the default 5 ms
        # switch interval it could wait that long behind the state thread's Python each time.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.consumer.subscribe(
            [self.clicks],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.join_watch.waiting()
        try:
            self._loop()
        except BaseException:
            self._failed = True  # nothing more may be committed: the events will be redone
            raise
        finally:
            self.close()

    def _loop(self) -> None:
        b = self.settings.batching
        commit_every = self.settings.worker.commit_interval_s
        sweep_every = self.settings.state.sweep_interval_seconds
        reload_every = self.settings.model.reload_interval_s
        now = time.monotonic()
        next_commit, next_sweep, next_reload = now + commit_every, now + sweep_every, now
        sweep_more = False
        stages = self.stages
        while not self._stopping:
            self.metrics.health.beat()
            # Three stages, each batch in order through all of them (stages.py): apply
            # (state thread) -> score (scoring thread) -> publish (this thread). While batch N
            # is scored, N+1 is applied and N-1 published; N+1 starts only after N's apply
            # has finished, so a key's events still apply in order.
            wait = 0.0 if stages.busy else b.max_wait_ms / 1000.0
            messages = self.consumer.consume(b.max_events, wait)
            records = to_records(messages) if messages else []
            stages.finish_apply()
            if records:
                stages.start(records)
            stages.publish_scored(block=not records)
            self.producer.poll(0)  # delivery callbacks
            self.join_watch.check()
            now = time.monotonic()
            in_flight = self.checkpoints.in_flight
            if in_flight is not None:
                # wait for the broker only if it has been slow for a whole interval
                self.finish_checkpoint(block=now - in_flight.started > commit_every)
            if self.checkpoints.in_flight is None and now >= next_commit:
                self.begin_checkpoint()
                next_commit = now + commit_every
            if now >= next_sweep or sweep_more:
                # bounded: SWEEP_STEP_S (~30 ms) of work per loop turn, the rest on the next
                sweep_more = self.sweep()
                if now >= next_sweep:
                    next_sweep = now + sweep_every
                    self.observe_partitions()
            loaded = self._loading is not None and self._loading.done()
            if reload_every > 0 and (now >= next_reload or loaded):
                self.reload()  # a loaded model is swapped in at once, not a tick later
                if now >= next_reload:
                    next_reload = now + reload_every

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("signal %d: stopping after this batch", signum)
        self._stopping = True

    # ---- checkpoint (checkpoint.py) -----------------------------------------------------------
    def checkpoint(self) -> None:
        """A whole checkpoint, waiting for the broker (before a revoke, at shutdown)."""
        self.begin_checkpoint()
        self.finish_checkpoint(block=True)

    def begin_checkpoint(self) -> None:
        """Freeze the state writes so far, send them to the changelog, and note the input
        offsets they cover; :meth:`finish_checkpoint` completes it once the broker has
        acknowledged every record produced until now (outputs included)."""
        if self.checkpoints.in_flight is not None:
            self.finish_checkpoint(block=True)
        started = time.monotonic()
        self.stages.drain()  # every batch applied so far has its outputs handed to the producer
        if self.live is not None:
            # the counts of the clicks these states have applied are durable first
            # (streamrec.engines.live: each click counted once)
            self.live.publish(flush=True)
        self.checkpoints.begin(self.stages.take_offsets(), started)

    def finish_checkpoint(self, block: bool) -> bool:
        """:meth:`Checkpoints.finish`; a delivery error stops every later commit."""
        try:
            done = self.checkpoints.finish(block)
        except DeliveryError:
            self._failed = True  # commit nothing from now on
            raise
        if done:
            self.observe_partitions()
        return done

    def observe_partitions(self) -> None:
        """Lag and state counts of the assigned partitions, into the metrics (after every
        checkpoint and rebalance: both change what they measure)."""
        committed = {p: self.checkpoints.committed.get(p, -1) for p in self.partitions}
        lag = clients.lag_by_partition(self.consumer, self.clicks, committed)
        self.metrics.observe_lag(self.settings.worker.app_id, self.clicks, lag)
        counts = [s.state_counts() for s in self.partitions.values()]
        self.metrics.set_states(sum(c[0] for c in counts), sum(c[1] for c in counts))

    # ---- partitions come and go ------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        self.join_watch.assigned()
        wanted = {tp.partition for tp in assigned}
        health = self.metrics.health
        health.busy(f"recovering the state of partitions {sorted(wanted)}")
        for p in [p for p in self.partitions if p not in wanted]:
            self.partitions.pop(p).close()
            if self.live is not None:
                self.live.forget(p)
        # Partitions kept across the rebalance were checkpointed at the revoke and nobody else
        # can have owned them in between (eager rebalancing): their local state is current.
        new = [RocksDBPartition(self.datadir / str(p), p) for p in wanted - set(self.partitions)]
        self.learn_input_topic(sorted(wanted))
        if new:
            t0 = time.monotonic()
            n = recover(self.conf, recovery_group(self.settings), self.changelog, new)
            self._report_recovery(new, n, time.monotonic() - t0)
        self.partitions.update({s.partition: s for s in new})
        if self.live is not None:  # where the newly assigned partitions are counted up to
            self.live.load_watermarks(s.partition for s in new)
        if assigned:  # where the group stands (one round trip per rebalance)
            for tp in consumer.committed(assigned, timeout=10):
                self.checkpoints.committed[tp.partition] = tp.offset
        self.observe_partitions()
        log.info("ready: %s partitions %s", self.clicks, sorted(self.partitions))
        health.done(True, f"{self.clicks} partitions {sorted(self.partitions)} recovered")

    def _report_recovery(self, new: list[RocksDBPartition], n: int, seconds: float) -> None:
        skipped = sum(s.tally.skipped for s in new)
        log.info(
            "recovered partitions %s: %d changelog records in %.2f s (%d skipped)",
            sorted(s.partition for s in new),
            n,
            seconds,
            skipped,
        )
        for s in new:
            if s.tally.skipped:
                log.warning(
                    "changelog partition %d: skipped %d records that hold no state of this "
                    "layout (%d of the old layout, %d without a state key; the first: %r)",
                    s.partition,
                    s.tally.skipped,
                    s.tally.old_layout,
                    s.tally.foreign,
                    s.tally.first_skipped,
                )
                self.metrics.changelog_skipped.labels("old_layout").inc(s.tally.old_layout)
                self.metrics.changelog_skipped.labels("foreign").inc(s.tally.foreign)
                self._dead_letter_skipped(s)

    def _dead_letter_skipped(self, state: RocksDBPartition) -> None:
        """The skipped changelog records (the first of them) to the dead-letter topic, with
        the changelog's partition and offset: once per recovery that reads them (a later
        recovery from an empty disk meets them again)."""
        dead = [
            make_dead_letter(
                value,
                "changelog_record",
                "no state key of this layout: skipped at recovery",
                topic=self.changelog,
                partition=state.partition,
                offset=offset,
                key=key,
            )
            for key, value, offset in state.tally.to_dead_letter
        ]
        for d in dead:
            self.outputs.produce(self.settings.topics.dead_letter, d.to_bytes())
        self.metrics.dead_letters.labels("changelog_record").inc(len(dead))

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        self.metrics.health.set_ready(False, "rebalancing")
        self.join_watch.waiting()
        if self._failed:
            return
        self.checkpoint()  # states stay open until the next assignment says whether they stay

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        # Someone else may own them now: forget what was not checkpointed and recover later.
        log.warning("partitions lost: %s", sorted(tp.partition for tp in lost))
        self.metrics.health.set_ready(False, "partitions lost; waiting for the next assignment")
        self.join_watch.waiting()
        self.stages.drain()
        for tp in lost:
            self.checkpoints.forget(tp.partition)
            state = self.partitions.pop(tp.partition, None)
            if state is not None:
                state.discard_pending()
                state.close()
            self.stages.forget(tp.partition)
            if self.live is not None:
                self.live.forget(tp.partition)

    # ---- timers ------------------------------------------------------------------------------
    def sweep(self, budget_s: float = SWEEP_STEP_S) -> bool:
        """One bounded step of the idle sweep (:meth:`Sweeper.step`) between batches; returns
        whether more may remain (the loop calls again)."""
        self.stages.drain()
        t0 = time.monotonic()
        res, more = self.sweeper.step(
            self.store, self.partitions, self.arms.models(), self.config, self.clock, budget_s
        )
        self.metrics.observe_sweep(res)
        self.metrics.sweep_seconds.observe(time.monotonic() - t0)
        return more

    def reload(self) -> None:
        """Look for a newer checkpoint in the loader thread; swap it in, between batches, on a
        later call once it is loaded and validated. Loading and the held-out gate take seconds
        (a GRU4Rec of 17k items: ~3 s on the dev VM), which the poll loop used to wait for."""
        loading = self._loading
        if loading is None:
            self._loading = self.loader_thread.submit(self.arms.prepare_reload)
            return
        if not loading.done():
            return
        self._loading = None
        swap = loading.result()
        if not swap:
            return
        self.stages.drain()  # swaps happen between batches
        self.install_swap(swap)

    # ---- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        self.metrics.health.set_ready(False, "stopping")
        try:
            if not self._failed:
                self.checkpoint()
        finally:
            self.consumer.close()  # leaves the group (on_revoke checkpoints what is left)
            for state in self.partitions.values():
                state.close()
            self.partitions.clear()
            self.producer.flush(10)
            if self.live is not None:
                self.live.close()
            self.stages.close()
            self.loader_thread.shutdown(wait=False, cancel_futures=True)
