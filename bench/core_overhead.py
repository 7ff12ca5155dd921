"""Python overhead of the serving core, outside the model step.

Times ``process_batch(...).recommendation_values()`` over an in-memory StateStore with the
serve bench's GRU4Rec (17,319 items x 100 units, see serve_bench.make_checkpoint) on its
synthetic click stream (10,000 clicks, 2,000 sessions), at batch 256, twice:

  with_step     the real ServingModel (split GRU4Rec: advance + one batched score);
  without_step  NoStepServingModel.wrap(model): the step removed, so its time is all overhead.

Prints events/s for both and the per-event overhead in µs: the whole per-event time of the
no-step run, and for the real model the time outside ``BatchResult.model_seconds``.
Each figure is the best of ``--repeat`` passes (the machine is shared).

    OMP_NUM_THREADS=1 .venv/bin/python bench/core_overhead.py [--events 10000] [--repeat 3]
        [--profile FILE]   # cProfile of one no-step pass (read with pstats)
        [--digest]         # sha256 of the outputs and states of a mixed stream (users,
                           # session ends, bad messages, redeliveries): equal before/after
                           # a change means the same behaviour on it

Recorded 2026-11-23 on a shared 2-core AMD EPYC (load ~1), CPU torch, best of 5, three
alternating runs each (median; range):

                     before (b5a8dac)                   after
  with_step          8,872/s (8,844-8,963)              9,268/s (9,036-9,900)
    outside model    36.6 µs/event (35.6-36.6)          32.1 µs/event (29.3-34.2)
  without_step       45,812/s = 21.8 µs/event           60,067/s = 16.6 µs/event
                     (42,730-48,251)                    (54,632-62,429)

What is left with the step is mostly the 20 scores' float reprs in the JSON (about 7 µs per
recommendation: float32 values printed as the shortest *double* repr, 17 digits) and cache
misses after the 17,319 x 100 score matmul (state writes, item-id lookups).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nostep import NoStepServingModel
from serve_bench import load_values, make_checkpoint

from streamrec.serving.config import CoreConfig
from streamrec.serving.pipeline import process_batch
from streamrec.serving.records import Record
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state_store import StateStore

T0 = 1_700_000_000.0  # fixed Kafka record times, so outputs are reproducible


def records(n: int) -> list[Record]:
    values = load_values(None, n)
    return [Record(v, k, "c", 0, i, T0 + i, T0 + i) for i, (k, v, _) in enumerate(values)]


def one_pass(recs: list[Record], model: ServingModel, batch: int) -> tuple[float, float]:
    """(total seconds, model seconds) of one pass over a fresh store."""
    store = StateStore()
    config = CoreConfig()
    model_s = 0.0
    t0 = time.perf_counter()
    for i in range(0, len(recs), batch):
        res = process_batch(recs[i : i + batch], store, model, config, now=T0)
        res.recommendation_values()
        model_s += res.model_seconds
    return time.perf_counter() - t0, model_s


def mixed_records(n: int) -> list[Record]:
    """Clicks with and without users, session ends, bad messages and a redelivered chunk."""
    base = load_values(None, n)
    out: list[Record] = []
    for i, (k, v, _) in enumerate(base):
        d = json.loads(v)
        if i % 3 == 0:
            d["user_id"] = f"u{int(d['session_id']) % 97}"
            d["timestamp"] = T0 - 10_000 + i * 7.5  # gaps end sessions now and then
            k = d["user_id"].encode()
        if i % 11 == 0:
            d["item_id"] = f"unknown-{i}"
        if i % 13 == 0:
            d["event_id"] = f"e{i}"
        if i % 17 == 0:
            d = {"session_id": d["session_id"], "type": "session_end", "user_id": d.get("user_id")}
        raw = json.dumps(d).encode()
        if i % 29 == 0:
            raw = [b"", b"{bad", b"[1]", b'{"session_id": ""}', b'{"session_id": 5}'][i % 5]
        out.append(Record(raw, k, "c", i % 2, i, T0 + i, T0 + i))
    return out + out[n // 2 : n // 2 + 300]  # a redelivery: duplicates


def digest(recs: list[Record], model: ServingModel, batch: int) -> str:
    store = StateStore()
    sha = hashlib.sha256()
    version = model.version.encode()  # made from the checkpoint's save time: not hashed

    def put(b: bytes) -> None:
        sha.update(b.replace(version, b"V"))

    for i in range(0, len(recs), batch):
        res = process_batch(recs[i : i + batch], store, model, CoreConfig(), now=T0)
        for key, value in res.recommendation_values():
            rec = json.loads(value)
            # the one field that is wall time; the rest must be byte for byte the same
            value = value.replace(b'"emitted_at": %r' % rec["emitted_at"], b"")
            put(key + value)
        for d in res.dead_letters:
            put(d.model_dump_json(exclude={"received_at"}).encode())
        put(repr((res.unknown_items, sorted(res.stats.items()), res.key_partitions)).encode())
    for table in (store.sessions, store.users):
        for state_key in sorted(table):
            put(state_key.encode() + table[state_key])
    return sha.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--digest", action="store_true")
    a = ap.parse_args()

    torch.set_num_threads(1)
    ckpt = make_checkpoint(Path(tempfile.mkdtemp(prefix="core-overhead-")) / "model")
    model = ServingModel.from_checkpoint(ckpt, "cpu", top_k=20)
    nostep = NoStepServingModel.wrap(model)
    if a.digest:
        mixed = mixed_records(a.events)
        for name, m in (("with_step", model), ("without_step", nostep)):
            print(f"digest {name}: {digest(mixed, m, a.batch)}")
        return
    recs = records(a.events)
    one_pass(recs[: 4 * a.batch], model, a.batch)  # warm up
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(one_pass, recs, nostep, a.batch)
        prof.dump_stats(a.profile)
        print(f"profile of one no-step pass written to {a.profile}")
    n = len(recs)
    for name, m in (("with_step", model), ("without_step", nostep)):
        total, model_s = min(one_pass(recs, m, a.batch) for _ in range(a.repeat))
        print(
            f"{name:13s} {n / total:8.0f} events/s  {total / n * 1e6:6.1f} µs/event  "
            f"outside the model {(total - model_s) / n * 1e6:5.1f} µs/event"
        )


if __name__ == "__main__":
    main()
