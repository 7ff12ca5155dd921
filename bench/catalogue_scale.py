"""What a click costs as the catalogue grows: exact scoring (fp32, bf16) against ANN retrieval.

For each catalogue size (``--items``, default 17,319, 100,000 and 1,000,000) and a GRU4Rec of
100 units, the model step at batch 256 on one thread (GRU step + top-20, as the worker runs
it: ``ServingModel.advance`` + ``score``):

* ``exact-fp32``: every item scored in float32, the blocked top-k;
* ``exact-bf16``: every item scored in bfloat16, a shortlist re-scored in float32 and kept
  where the rounding bound proves it (else float32): the float32 answer, faster;
* ``ann``: the HNSW index's candidates re-ranked exactly (index build seconds and bytes);
  ``--head-items``, ``--hybrid-head-items``: the head and head+hnsw indexes;
  ``--successor-heads`` (with ``--successors-from`` the model's training log): the head and
  each clicked item's training-log successors (``model.ann_index=head+successors``);

and the mean top-20 overlap of each with ``exact-fp32``; beside them, the matrix product alone
and ``torch.topk`` over all scores (the issue's reference). ``--e2e`` adds the end-to-end
worker events/s through the embedded broker at the largest size.

Models: ``--model N=CKPT`` serves a checkpoint for size N (a trained model: the figures that
count for quality); otherwise a GRU4Rec with random GRU weights and an output layer shaped
like a trained one (``ann_libraries.topic_vectors``: items in topics, bias by popularity).
Clicks: Zipf-popular items, sessions of 5 clicks, 256 sessions stepped together.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/catalogue_scale.py \
        [--items 17319 100000 1000000] [--model 1000000=runs/m1m] [--e2e] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ann_libraries import topic_vectors
from procstats import machine_line, rss_mb

from streamrec.model.ann import AnnIndex, AnnParams, HeadIndex, HybridIndex, load_or_build
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.model.retrieval import Retriever

K = 20
UNITS = 100
#: what a rate is per: CPU seconds of this process (default; one thread, so per core, and
#: other processes on a shared machine do not count) or wall seconds (``--clock wall``, GPU)
clock = time.process_time


def synthetic_model(n_items: int, seed: int = 0) -> GRU4Rec:
    """GRU4Rec with random GRU weights and a topic-structured output layer."""
    model = GRU4Rec(GRU4RecConfig(n_items=n_items, layers=[UNITS]), seed=seed)
    items, bias, _ = topic_vectors(n_items, UNITS, 1, seed)
    with torch.no_grad():
        model.Wy.copy_(torch.from_numpy(items) * 4.0)
        model.By.copy_(torch.from_numpy(bias).view(-1, 1))
    return model.eval()


def load_model(path: str) -> GRU4Rec:
    from streamrec.model.checkpoint import load_checkpoint

    model = load_checkpoint(path).model
    if not isinstance(model, GRU4Rec):
        raise SystemExit(f"{path}: this benchmark serves GRU4Rec checkpoints")
    return model


def click_batches(n_items: int, batch: int, n_batches: int, seed: int = 1) -> list[np.ndarray]:
    """Item rows of ``n_batches`` consecutive clicks of ``batch`` sessions (Zipf popularity)."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1)
    perm = rng.permutation(n_items)
    draws = rng.choice(n_items, (n_batches, batch), p=pop / pop.sum())
    return [perm[d] for d in draws]


def log_click_batches(
    path: str, item_ids: list[str], batch: int, n_batches: int
) -> list[np.ndarray]:
    """Like :func:`click_batches`, from a click log's sessions: batch ``i`` holds click
    ``i % 5`` of ``batch`` sessions (sessions of at least 5 clicks of the model's items)."""
    from streamrec.data.clicklog import load_clicks

    rows = {s: i for i, s in enumerate(item_ids)}
    df = load_clicks(path).sort_values(["SessionId", "Time"], kind="stable")
    df = df[df.ItemId.astype(str).isin(rows)]
    sessions = [
        [rows[str(x)] for x in g.ItemId[:5]] for _, g in df.groupby("SessionId") if len(g) >= 5
    ]
    need = batch * -(-n_batches // 5)
    if len(sessions) < need:
        raise SystemExit(f"{path}: {len(sessions)} sessions of 5 clicks, {need} needed")
    out = []
    for i in range(n_batches):
        group = sessions[(i // 5) * batch : (i // 5 + 1) * batch]
        out.append(np.array([s[i % 5] for s in group], dtype=np.int64))
    return out


def _states(model: GRU4Rec, clicks: list[np.ndarray]) -> list[torch.Tensor]:
    """The state after each batch of clicks (sessions restart every 5 clicks)."""
    out = []
    state = model.initial_state(None, len(clicks[0]))
    with torch.inference_mode():
        for i, rows in enumerate(clicks):
            if i % 5 == 0:
                state = model.initial_state(None, len(rows))
            state = model.advance(torch.from_numpy(rows).to(state.device), state)
            out.append(state)
    return out


def time_step(
    model: GRU4Rec, topk: Any, clicks: list[np.ndarray], seconds: float
) -> tuple[float, list[torch.Tensor]]:
    """Events/s of advance + top-k over the clicks (repeated until ``seconds`` passed), and
    the answers of the first pass."""
    answers: list[torch.Tensor] = []
    n = 0
    with torch.inference_mode():
        state = model.initial_state(None, len(clicks[0]))
        t0 = clock()
        while True:
            for i, rows in enumerate(clicks):
                if i % 5 == 0:
                    state = model.initial_state(None, len(rows))
                clicked = torch.from_numpy(rows).to(state.device)
                state = model.advance(clicked, state)
                top = topk(state, clicked)
                if state.device.type == "cuda":
                    torch.cuda.synchronize()
                if len(answers) < len(clicks):
                    answers.append(top)
                n += len(rows)
            if clock() - t0 >= seconds:
                break
        dt = clock() - t0
    return n / dt, answers


def overlap(got: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    hits = total = 0
    for g, t in zip(got, truth, strict=True):
        for a, b in zip(g.cpu().tolist(), t.cpu().tolist(), strict=True):
            hits += len(set(a) & set(b))
            total += len(b)
    return hits / total


def reference_rates(model: GRU4Rec, states: list[torch.Tensor], seconds: float) -> dict[str, float]:
    """The issue's reference: ``addmm`` alone and ``addmm`` + ``torch.topk(21)``, fp32 and
    bf16, rows in chunks of 64 (as the worker scores)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        score = model.state_scorer(dtype, copy=True)
        name = "fp32" if dtype == torch.float32 else "bf16"
        for label, with_topk in ((f"addmm {name}", False), (f"addmm {name} + torch.topk", True)):
            n = 0
            with torch.inference_mode():
                t0 = clock()
                while clock() - t0 < seconds:
                    for st in states:
                        for lo in range(0, len(st), 64):
                            s = score(st[lo : lo + 64])
                            if with_topk:
                                torch.topk(s, K + 1, dim=1)
                        n += len(st)
                    if st.device.type == "cuda":
                        torch.cuda.synchronize()
                dt = clock() - t0
            out[label] = n / dt
    return out


def measure_size(
    n_items: int, ckpt: str | None, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model = load_model(ckpt) if ckpt else synthetic_model(n_items)
    model = model.to(args.device)
    if ckpt and args.clicks:  # the sessions of a log, for a model trained on its items
        from streamrec.model.checkpoint import read_checkpoint_record

        ids = [str(i) for i in read_checkpoint_record(ckpt).item_ids]
        clicks = log_click_batches(args.clicks, ids, args.batch, args.batches)
    else:
        clicks = click_batches(n_items, args.batch, args.batches)
    full = model.state_scorer(torch.float32, copy=True)
    rows: list[dict[str, Any]] = []

    def row(retrieval: str, rate: float, ov: float, **extra: Any) -> None:
        r = {
            "items": n_items,
            "retrieval": retrieval,
            "events_per_s": round(rate, 1),
            "top20_overlap": round(ov, 4),
            "build_seconds": None,
            "index_bytes": None,
        }
        r.update(extra)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)

    exact = Retriever(model, lambda s, u: full(s), exact_topk=model.state_topk())
    rate, truth = time_step(model, lambda s, c: exact.topk(s, None, K)[1], clicks, args.seconds)
    row("exact-fp32", rate, 1.0)
    # bf16 scores (model.score_dtype=bfloat16): faster, near-ties may swap
    full16 = model.state_scorer(torch.bfloat16, copy=True)
    bf16 = Retriever(model, lambda s, u: full16(s), exact_topk=model.state_topk(torch.bfloat16))
    rate, got = time_step(model, lambda s, c: bf16.topk(s, None, K)[1], clicks, args.seconds)
    row("exact-bf16", rate, overlap(got, truth))
    # bf16 scores, a float32 re-scored shortlist kept where proven (model.bf16_shortlist)
    proven = Retriever(model, lambda s, u: full(s), bf16_shortlist=True,
                       exact_topk=model.state_topk())  # fmt: skip
    rate, got = time_step(model, lambda s, c: proven.topk(s, None, K)[1], clicks, args.seconds)
    shortlist = {"events_per_s": round(rate, 1), "top20_overlap": round(overlap(got, truth), 4),
                 "fallback_rows": proven.shortlist_fallbacks}  # fmt: skip
    params = AnnParams(
        connectivity=args.connectivity,
        expansion_add=args.expansion_add,
        expansion_search=(args.expansion_search or [AnnParams.expansion_search])[0],
        candidates=args.candidates,
    )
    for head in args.head_items:  # exact over the largest item vectors, no graph
        for dtype in args.head_dtypes:
            hp = replace(params, kind="head", head_items=head, head_dtype=dtype)
            with torch.inference_mode():
                hidx = AnnIndex.build(model.item_vectors(), hp)
            heads = Retriever(model, lambda s, u: full(s), mode="ann", index=hidx,
                              candidates=params.candidates)  # fmt: skip
            rate, got = time_step(model, lambda s, c, r=heads: r.topk(s, None, K)[1], clicks,
                                  args.seconds)  # fmt: skip
            row("ann", rate, overlap(got, truth), build_seconds=hidx.meta["build_seconds"],
                index_bytes=hidx.nbytes, index="head", head_items=head, dtype=dtype)  # fmt: skip
    if args.successor_heads:
        _successor_rows(model, ckpt, clicks, truth, full, params, args, row)
    if not args.expansion_search:
        return rows, {}
    rss0 = rss_mb()
    with torch.inference_mode():
        if ckpt:  # the index beside the checkpoint (its build recorded there), else built now
            index = load_or_build(ckpt, model.item_vectors(), params, threads=args.build_threads)
        else:
            index = AnnIndex.build(model.item_vectors(), params, threads=args.build_threads)
    build_rss = rss_mb() - rss0
    for ef in args.expansion_search:
        index.set_expansion_search(ef)
        ann = Retriever(
            model, lambda s, u: full(s), mode="ann", index=index, candidates=params.candidates
        )
        rate, got = time_step(
            model, lambda s, c, r=ann: r.topk(s, None, K)[1], clicks, args.seconds
        )
        row(
            "ann",
            rate,
            overlap(got, truth),
            build_seconds=index.meta["build_seconds"],
            index_bytes=index.nbytes,
            build_threads=index.meta["build_threads"],
            rss_growth_mb=round(build_rss),
            params=dict(vars(index.params)),
            index="hnsw",
        )
    for head in args.hybrid_head_items:  # the head's candidates and the graph's
        with torch.inference_mode():
            hybrid = HybridIndex(HeadIndex.build_head(model.item_vectors(),
                                 replace(params, head_items=head)), index)  # fmt: skip
        for ef in args.expansion_search:
            hybrid.set_expansion_search(ef)
            hr = Retriever(model, lambda s, u: full(s), mode="ann", index=hybrid,
                           candidates=params.candidates)  # fmt: skip
            rate, got = time_step(model, lambda s, c, r=hr: r.topk(s, None, K)[1], clicks,
                                  args.seconds)  # fmt: skip
            row("ann", rate, overlap(got, truth), build_seconds=index.meta["build_seconds"],
                index_bytes=hybrid.nbytes, index="head+hnsw", head_items=head,
                expansion_search=ef)  # fmt: skip
    if args.skip_reference:
        return rows, {}
    ref = reference_rates(model, _states(model, clicks), args.seconds)
    reference = {"items": n_items, **{k: round(v, 1) for k, v in ref.items()},
                 "exact bf16 shortlist, fp32 answer": shortlist}  # fmt: skip
    print(json.dumps(reference), file=sys.stderr, flush=True)
    if args.save_index:
        index.save(args.save_index)
    return rows, reference


def _successor_rows(
    model: GRU4Rec,
    ckpt: str | None,
    clicks: list[np.ndarray],
    truth: list[torch.Tensor],
    full: Any,
    params: AnnParams,
    args: argparse.Namespace,
    row: Any,
) -> None:
    """``head+successors`` rows: the head and each clicked item's successors in the
    ``--successors-from`` log (the table published beside ``ckpt``, built there if missing)."""
    from streamrec.data.clicklog import load_clicks
    from streamrec.model.checkpoint import read_checkpoint_record
    from streamrec.model.successors import publish_table
    from trainer.batching import session_arrays

    if not (ckpt and args.successors_from):
        raise SystemExit("--successor-heads needs --model N=CKPT and --successors-from LOG")
    ids = {str(i): r for r, i in enumerate(read_checkpoint_record(ckpt).item_ids)}
    df = load_clicks(args.successors_from)
    df = df[df.ItemId.astype(str).isin(ids)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        item_rows, offsets, _ = session_arrays(df, ids)
        vectors = model.item_vectors()
        table = publish_table(ckpt, vectors, item_rows, offsets, args.successors)
    table_s = time.perf_counter() - t0
    for head in args.successor_heads:
        hp = replace(params, kind="head+successors", head_items=head, successors=args.successors)
        with torch.inference_mode():
            hidx = AnnIndex.build(vectors, hp)
        ret = Retriever(model, lambda s, u: full(s), mode="ann", index=hidx, successors=table)
        rate, got = time_step(model, lambda s, c, r=ret: r.topk(s, None, K, clicked=c)[1],
                              clicks, args.seconds)  # fmt: skip
        row("ann", rate, overlap(got, truth), build_seconds=round(table_s, 1),
            index_bytes=hidx.nbytes + table.table.numel() * 8, index="head+successors",
            head_items=head, successors=args.successors)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[17_319, 100_000, 1_000_000])
    ap.add_argument("--model", action="append", default=[], metavar="N=CKPT")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the index stays on the CPU)")
    ap.add_argument("--batches", type=int, default=20, help="click batches per pass")
    ap.add_argument("--seconds", type=float, default=5.0, help="per mode and size")
    ap.add_argument("--connectivity", type=int, default=AnnParams.connectivity)
    ap.add_argument("--expansion-add", type=int, default=AnnParams.expansion_add)
    ap.add_argument(
        "--expansion-search",
        type=int,
        nargs="*",
        default=[AnnParams.expansion_search],
        help="search breadths to measure (one ann row each; none: no HNSW rows)",
    )
    ap.add_argument(
        "--head-items", type=int, nargs="*", default=[], help="head sizes (index=head rows)"
    )
    ap.add_argument("--hybrid-head-items", type=int, nargs="*", default=[],
                    help="head sizes of head+hnsw rows (with each --expansion-search)")  # fmt: skip
    ap.add_argument(
        "--successor-heads",
        type=int,
        nargs="*",
        default=[],
        help="head sizes of head+successors rows (with --successors-from)",
    )
    ap.add_argument("--successors", type=int, default=AnnParams.successors)
    ap.add_argument("--successors-from", default=None, help="the training log of --model")
    ap.add_argument("--skip-reference", action="store_true", help="no addmm/torch.topk rates")
    ap.add_argument("--clicks", default=None, help="a log whose sessions drive a --model")
    ap.add_argument(
        "--e2e-settings",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="worker settings of the ann end-to-end run (model.ann_index=head)",
    )
    ap.add_argument("--candidates", type=int, default=AnnParams.candidates)
    ap.add_argument("--build-threads", type=int, default=1)
    ap.add_argument("--save-index", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--e2e", action="store_true", help="worker through the broker, largest size")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end runs")
    ap.add_argument("--e2e-events", type=int, default=20_000, help="ann (exact: a tenth)")
    ap.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="per CPU second or wall (GPU)"
    )
    ap.add_argument("--head-dtypes", nargs="+", default=["f32"], choices=["f32", "bf16"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(1)
    models = dict(m.split("=", 1) for m in args.model)
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    for n in [] if args.e2e_only else args.items:
        size_rows, ref = measure_size(n, models.get(str(n)), args)
        rows += size_rows
        refs.append(ref)
    e2e: list[dict[str, Any]] = []
    if args.e2e or args.e2e_only:
        n = max(args.items)
        e2e = end_to_end(n, models.get(str(n)), args)
    result = {"rows": rows, "e2e": e2e, "reference": refs, "machine": machine_line(load),
              "clock": args.clock}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(result["machine"])
    print("| items | retrieval | events/s | top-20 overlap | build s | index bytes |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['items']:,} | {r['retrieval']} | {r['events_per_s']:,.0f} | "
            f"{r['top20_overlap']} | {r['build_seconds'] or ''} | {r['index_bytes'] or ''} |"
        )
    for line in [*refs, *e2e]:
        print(json.dumps(line))


def end_to_end(n_items: int, ckpt: str | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Events/s of one worker through the embedded broker serving ``n_items`` items, exact
    and ann (see serve_bench.py for how it is timed)."""
    from serve_bench import run_worker_phase

    from streamrec.kafka.embedded import EmbeddedBroker
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.tools.replay import click_values

    out = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if ckpt is None:
            model = synthetic_model(n_items)
            ckpt = str(
                save_checkpoint(
                    tmp / "ckpt", model, "gru4rec", [str(i) for i in range(n_items)]
                ).path
            )
        clicks = click_batches(n_items, 1, args.e2e_events, seed=3)  # rows of Zipf items
        import pandas as pd

        from streamrec.model.checkpoint import read_checkpoint_record

        ids = read_checkpoint_record(ckpt).item_ids
        items = np.array(ids, dtype=object)[np.concatenate(clicks)]
        sess = np.arange(len(items)) // 5
        rng = np.random.default_rng(0)
        order = np.argsort(rng.permutation(len(items)) // 50 * 10**9 + np.arange(len(items)))
        df = pd.DataFrame(
            {
                "SessionId": sess[order].astype(str),
                "ItemId": items[order],
                "Time": np.arange(len(items), dtype=float),
            }
        )
        values = click_values(df)
        ann_settings = dict(kv.split("=", 1) for kv in args.e2e_settings)
        with EmbeddedBroker() as broker:
            for retrieval in ("ann", "exact"):
                res = run_worker_phase(
                    broker.bootstrap,
                    Path(ckpt),
                    values,
                    tag=f"scale-{retrieval}",
                    max_events=args.batch,
                    tmp=tmp,
                    extra_settings={"model.retrieval": retrieval, **ann_settings}
                    if retrieval == "ann"
                    else {"model.retrieval": retrieval},
                )
                row = {
                    "items": n_items,
                    "retrieval": retrieval,
                    **({"settings": ann_settings} if retrieval == "ann" and ann_settings else {}),
                    "events_per_s": round(res["events_per_s"], 1),
                    "answered": res["answered"],
                    "events": res["events"],
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                out.append(row)
    return out


if __name__ == "__main__":
    main()
