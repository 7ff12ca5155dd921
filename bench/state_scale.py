"""State at scale (issue 13): sessions and users in the native worker's RocksDB partitions.

Builds the state directly through the store layer (``RocksDBPartition``: the same encoding,
index and batch writes as the worker's checkpoints, no Kafka), then measures:

* bytes per state (encoded value; and the databases' size on disk per state);
* the idle sweep as the worker runs it (``NativeWorker.sweep``: bounded steps through the
  last-activity index): time per step (p50/p99/max) while about half of the sessions and a
  tenth of the users expire, and one step with nothing to expire;
* the process RSS after the build and after the sweep;
* optionally (``--recovery N``) the time to rebuild N states from a changelog topic after a
  wiped disk, on the embedded broker (``NativeWorker._recover``, the worker's own code).

    OMP_NUM_THREADS=1 .venv/bin/python bench/state_scale.py --sessions 1000000 \\
        --users 1000000 [--partitions 4] [--recovery 200000] [--out bench/results/state-scale.md]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from procstats import machine_line, rss_mb

from streamrec.engines.native.recovery import recover, recovery_group
from streamrec.engines.native.store import RocksDBPartition
from streamrec.engines.native.sweep import SWEEP_STEP_S
from streamrec.engines.native.worker import NativeWorker
from streamrec.serving.clock import StreamClock
from streamrec.serving.served_model import ModelHolder
from streamrec.serving.state import SessionState, UserState
from streamrec.serving.state_store import SESSIONS, USERS
from streamrec.settings import load_settings
from streamrec.testing import tiny_serving_model

DIM = 100  # GRU4Rec's 100 units (the serve bench's model)
CHUNK = 50_000


def build(
    root: Path, n_sessions: int, n_users: int, parts: int, wall: float, gap: float, ttl: float
) -> tuple[dict[int, RocksDBPartition], float, float]:
    """States as the worker writes them; returns (partitions, mean session bytes, mean user
    bytes). Session last times spread over the last 2 gaps (about half idle), user last
    times over 1/0.9 TTLs (about a tenth expired)."""
    rng = random.Random(0)
    states = {p: RocksDBPartition(root / str(p), p) for p in range(parts)}
    hidden = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
    s_bytes = u_bytes = 0
    for lo in range(0, max(n_sessions, n_users), CHUNK):
        for j in range(lo, min(lo + CHUNK, n_sessions)):
            p = j % parts
            items = [f"i{rng.randrange(17_319)}" for _ in range(10)]
            t = wall - rng.random() * 2 * gap
            user = f"user{j}" if j < n_users else None
            s = SessionState(f"sess{j}", hidden, "v1", user, items, p, j, t, t - 60, 10)
            s.event_ids = [f"ev-{j}-{k}" for k in range(10)]
            value = s.to_bytes()
            s_bytes += len(value)
            states[p].write(SESSIONS, f"u:user{j}" if user else f"a:sess{j}", value)
        for j in range(lo, min(lo + CHUNK, n_users)):
            p = j % parts
            sess = [[f"i{rng.randrange(17_319)}" for _ in range(10)] for _ in range(3)]
            t = wall - rng.random() * ttl / 0.9
            u = UserState(f"user{j}", hidden, "v1", sess, p, j, t)
            value = u.to_bytes()
            u_bytes += len(value)
            states[p].write(USERS, f"u:user{j}", value)
        for st in states.values():
            st.begin_checkpoint()
            st.commit(lo)
    return states, s_bytes / max(n_sessions, 1), u_bytes / max(n_users, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--recovery", type=int, default=0, help="states to recover (0: skip)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gap, ttl = 1800.0, 90 * 86400.0
    root = Path(tempfile.mkdtemp(prefix="state-scale-"))
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        wall = time.time()
        rss0 = rss_mb()
        t0 = time.perf_counter()
        states, sb, ub = build(root, args.sessions, args.users, args.partitions, wall, gap, ttl)
        build_s = time.perf_counter() - t0
        for st in states.values():
            st.db.flush()
        du = subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True, check=True)
        disk = int(du.stdout.split()[0])
        n = args.sessions + args.users
        say(
            f"states: {args.sessions:,} sessions + {args.users:,} users "
            f"in {args.partitions} partitions"
        )
        say(f"build through the store layer: {build_s:.1f} s ({n / build_s:,.0f} states/s)")
        say(
            f"bytes per state (encoded): session {sb:.0f}, user {ub:.0f} "
            f"(hidden/context: {DIM} float32)"
        )
        say(f"on disk (RocksDB, states + index): {disk / 1e6:,.0f} MB = {disk / n:.0f} B per state")
        say(f"RSS after build: {rss_mb():,.0f} MB (at start {rss0:,.0f} MB)")

        settings = load_settings(
            kafka={"bootstrap_servers": "127.0.0.1:9", "broker": "embedded"},
            state={
                "directory": str(root / "w"),
                "session_gap_seconds": gap,
                "user_ttl_seconds": ttl,
            },
        )
        model = tiny_serving_model(n_items=50, dim=DIM, user_dim=DIM)
        worker = NativeWorker(settings, ModelHolder(model))
        worker.partitions.update(states)
        worker.clock = StreamClock(min_keys=1)
        # nothing to expire: every partition's clock 11 days back (no session idle for a
        # gap, no user for the TTL yet)
        for p in states:
            worker.clock.observe(wall - 11 * 86400, p, time.time())
        quiet = []
        for _ in range(5):
            t = time.perf_counter()
            worker.sweep()
            quiet.append((time.perf_counter() - t) * 1e3)
        say(
            "sweep step with nothing to expire (5 steps, the first on a cold database): "
            + ", ".join(f"{x:.2f}" for x in quiet)
            + " ms"
        )
        worker.clock.partitions.clear()
        for p in states:
            worker.clock.observe(wall, p, time.time())
        steps: list[float] = []
        cpu: list[float] = []  # this thread's CPU time per step: the work, without descheduling
        keys: list[float] = []
        t_all = time.perf_counter()
        more = True
        ended0 = worker.metrics.sessions_ended._value.get()
        load0 = os.getloadavg()
        while more:
            e = worker.metrics.sessions_ended._value.get()
            t, c = time.perf_counter(), time.thread_time()
            more = worker.sweep()
            steps.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
            keys.append(worker.metrics.sessions_ended._value.get() - e)
            # the worker checkpoints every second; here every 20 steps
            if len(steps) % 20 == 0 or not more:
                for st in states.values():
                    st.begin_checkpoint()
                    st.commit(None)
        total = time.perf_counter() - t_all
        ended = worker.metrics.sessions_ended._value.get() - ended0
        a = np.array(steps) * 1e3
        b = np.array(cpu) * 1e3
        load1 = os.getloadavg()
        say(
            "sweep while ~half the sessions and ~1/10 of the users expire: "
            f"{ended:,.0f} sessions "
            f"ended in {len(steps)} steps, {total:.1f} s; "
            f"per step wall p50 {np.percentile(a, 50):.1f} ms, "
            f"p99 {np.percentile(a, 99):.1f} ms, max {a.max():.1f} ms; "
            f"thread CPU p50 {np.percentile(b, 50):.1f} ms, p99 {np.percentile(b, 99):.1f} ms, "
            f"max {b.max():.1f} ms; sessions ended per step p50 {np.percentile(keys, 50):.0f}, "
            f"max {max(keys):.0f} (budget {SWEEP_STEP_S * 1e3:.0f} ms, chunks sized to it); "
            f"load average {load0[0]:.1f} -> {load1[0]:.1f}"
        )
        say(
            f"RSS after sweep: {rss_mb():,.0f} MB; "
            f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB"
        )
        for st in states.values():
            st.close()
        worker.partitions.clear()
        if args.recovery:
            say(recovery(args.recovery, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        header = [
            "# State at scale (issue 13)",
            "",
            f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/state_scale.py --sessions "
            f"{args.sessions} --users {args.users} --partitions {args.partitions}"
            f"{f' --recovery {args.recovery}' if args.recovery else ''}`",
            machine_line(),
            "",
            "```",
        ]
        args.out.write_text("\n".join([*header, *lines, "```", ""]))


def recovery(n: int, root: Path) -> str:
    """Produce n state records to a changelog topic on the embedded broker, then time the
    worker's recovery of a wiped partition from it."""
    from confluent_kafka import Producer

    from streamrec.kafka.clients import TopicSpec, ensure_topics
    from streamrec.testing import test_broker

    hidden = np.zeros(DIM, np.float32)
    with test_broker() as bootstrap:
        settings = load_settings(
            kafka={"bootstrap_servers": bootstrap},
            topics={"partitions": 1},
            worker={"app_id": "scale"},
            state={"directory": str(root / "rec")},
        )
        model = tiny_serving_model(n_items=50, dim=DIM)
        worker = NativeWorker(settings, ModelHolder(model))
        conf = {"bootstrap.servers": bootstrap}
        ensure_topics(conf, [TopicSpec(worker.changelog, 1)])
        prod = Producer({**conf, "linger.ms": 20, "batch.num.messages": 10_000})
        for j in range(n):
            s = SessionState(
                f"sess{j}", hidden, "v1", None, [f"i{j % 999}"] * 10, 0, j, 1.7e9, 1.7e9, 10
            )
            while True:
                try:
                    prod.produce(worker.changelog, s.to_bytes(), f"s/a:sess{j}".encode(), 0)
                    break
                except BufferError:
                    prod.poll(0.05)
        assert prod.flush(120) == 0
        st = RocksDBPartition(root / "rec" / "0", 0)  # a wiped disk: empty database
        t = time.perf_counter()
        got = recover(worker.conf, recovery_group(settings), worker.changelog, [st])
        secs = time.perf_counter() - t
        ok = st.get(SESSIONS, f"a:sess{n - 1}") is not None
        st.close()
        worker.producer.flush(1)
    return (
        f"recovery from the changelog after a wiped disk: {got:,} records in {secs:.1f} s "
        f"({got / secs:,.0f} records/s; last state present: {ok}); at that rate 2M states "
        f"take {2e6 / (got / secs):.0f} s"
    )


if __name__ == "__main__":
    main()
