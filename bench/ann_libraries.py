"""Approximate maximum-inner-product search: faiss-cpu, hnswlib and usearch side by side.

The serving question: given a GRU state ``h`` [B, 100] and an output layer ``Wy`` [N, 100],
``By`` [N], find the top-20 of ``h @ Wy.T + By`` without scoring all N items. The bias is
folded into the vectors (item ``[Wy_i, By_i]``, query ``[h, 1]``), the index returns a
candidate set, and the candidates are re-ranked exactly (the retrieval the model serves).
For each library and setting this prints the build seconds, the index bytes, query events/s
at batch 256 on one thread (ANN search + exact re-rank + top-20), and the mean top-20 overlap
with exact scoring.

Vectors (``--vectors``): ``topics`` (default) has the shape of a trained GRU4Rec output layer
on a click log: items of a topic near the topic's centre, a bias that grows with popularity
(Zipf), states near one topic's centre; ``gaussian`` has no structure at all (every item
vector and state i.i.d. normal: the hardest case for any index); ``--model CKPT`` reads a
checkpoint's output layer and takes states from its own sessions.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/ann_libraries.py --items 100000 \
        [--libs faiss-ivf,faiss-hnsw,hnswlib,usearch] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from procstats import machine_line

K = 20
BATCH = 256


def topic_vectors(
    n_items: int, dim: int, n_queries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item vectors [N, dim], biases [N], states [Q, dim]) shaped like a trained model's.

    Topics of ~50 items (the synthetic click generator's structure); an item is its topic's
    centre plus noise; the bias is a scaled log popularity (Zipf 1.0 over a random order);
    a state is one topic's centre plus noise, topics drawn by popularity.
    """
    rng = np.random.default_rng(seed)
    n_topics = max(n_items // 50, 1)
    centres = rng.standard_normal((n_topics, dim)).astype(np.float32)
    topic = rng.integers(0, n_topics, n_items)
    items = centres[topic] + 0.8 * rng.standard_normal((n_items, dim)).astype(np.float32)
    items /= np.sqrt(dim)
    rank = rng.permutation(n_items) + 1
    bias = (-0.5 * np.log(rank)).astype(np.float32)
    bias -= bias.mean()
    pop = 1.0 / rank
    q_items = rng.choice(n_items, n_queries, p=pop / pop.sum())
    states = centres[topic[q_items]] + 0.8 * rng.standard_normal((n_queries, dim))
    states = (2.0 * states / np.sqrt(dim)).astype(np.float32)
    return items, bias, states


def gaussian_vectors(
    n_items: int, dim: int, n_queries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items, dim)).astype(np.float32) / np.sqrt(dim)
    bias = (0.1 * rng.standard_normal(n_items)).astype(np.float32)
    states = rng.standard_normal((n_queries, dim)).astype(np.float32)
    return items, bias, states


def exact_topk(items: np.ndarray, bias: np.ndarray, states: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows of ``states @ items.T + bias`` (fp32), blocked over the states."""
    w = torch.from_numpy(items)
    b = torch.from_numpy(bias).view(1, -1)
    out = []
    for lo in range(0, len(states), 64):
        s = torch.addmm(b, torch.from_numpy(states[lo : lo + 64]), w.t())
        out.append(torch.topk(s, k, dim=1).indices)
    return torch.cat(out).numpy()


def overlap(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True)]))


def rerank(
    items: torch.Tensor, bias: torch.Tensor, states: torch.Tensor, cand: torch.Tensor, k: int
) -> torch.Tensor:
    """Exact top-k among each state's candidates (-1 = no candidate)."""
    valid = cand >= 0
    c = cand.clamp(min=0)
    s = torch.bmm(items[c], states.unsqueeze(2)).squeeze(2) + bias[c]
    s = s.masked_fill(~valid, -torch.inf)
    return c.gather(1, torch.topk(s, k, dim=1).indices)


@dataclass
class Setting:
    lib: str
    build: str  # construction parameters, for the table
    search: list[tuple[str, Any]]  # (label, query-time parameter) pairs


Searcher = Callable[[np.ndarray, int, Any], np.ndarray]


def mips_to_l2(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Items ``[x, sqrt(M^2 - |x|^2)]`` (M = max norm): the nearest neighbour in L2 of
    ``[q, 0]`` is then the maximum inner product (Bachrach et al. 2014)."""
    sq = (x * x).sum(1)
    m2 = float(sq.max())
    return np.hstack([x, np.sqrt(np.maximum(m2 - sq, 0))[:, None]]).astype(np.float32), m2


def _pad(x: np.ndarray, d: int) -> np.ndarray:
    return np.hstack([x, np.zeros((len(x), d - x.shape[1]), np.float32)])


def build_faiss_ivf(x: np.ndarray, nlist: int, kind: str) -> tuple[Any, Searcher, int]:
    import faiss

    d = x.shape[1]
    index: Any = faiss.index_factory(d, f"IVF{nlist},{kind}", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(1)
    train = x[rng.choice(len(x), min(len(x), 64 * nlist), replace=False)]
    index.train(train)
    index.add(x)

    def search(q: np.ndarray, k: int, nprobe: Any) -> np.ndarray:
        index.nprobe = int(nprobe)
        return index.search(_pad(q, d), k)[1]

    return index, search, _faiss_bytes(index)


def _faiss_bytes(index: Any) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def build_faiss_hnsw(x: np.ndarray, m: int, efc: int) -> tuple[Any, Searcher, int]:
    import faiss

    xa, _ = mips_to_l2(x)
    index = faiss.IndexHNSWFlat(xa.shape[1], m)
    index.hnsw.efConstruction = efc
    index.add(xa)

    def search(q: np.ndarray, k: int, ef: Any) -> np.ndarray:
        index.hnsw.efSearch = int(ef)
        qa = np.hstack([q, np.zeros((len(q), 1), np.float32)])
        return index.search(qa, k)[1]

    return index, search, _faiss_bytes(index)


def build_hnswlib(x: np.ndarray, m: int, efc: int, space: str) -> tuple[Any, Searcher, int]:
    import hnswlib

    xa = mips_to_l2(x)[0] if space == "l2" else x
    index = hnswlib.Index(space=space, dim=xa.shape[1])
    index.init_index(max_elements=len(xa), ef_construction=efc, M=m)
    index.add_items(xa, np.arange(len(xa)), num_threads=1)

    def search(q: np.ndarray, k: int, ef: Any) -> np.ndarray:
        index.set_ef(max(int(ef), k))
        qa = np.hstack([q, np.zeros((len(q), 1), np.float32)]) if space == "l2" else q
        return index.knn_query(qa, k=k, num_threads=1)[0].astype(np.int64)

    # hnswlib's own estimate: links of level 0 + vector + label per element
    per = index.element_count and (m * 2 * 4 + 4 + xa.shape[1] * 4 + 8)
    return index, search, int(per * len(xa))


def build_usearch(x: np.ndarray, m: int, efc: int, dtype: str) -> tuple[Any, Searcher, int]:
    from usearch.index import Index

    xa, _ = mips_to_l2(x)
    index: Any = Index(
        ndim=xa.shape[1], metric="l2sq", dtype=dtype, connectivity=m, expansion_add=efc
    )
    index.add(np.arange(len(xa)), xa, threads=1)

    def search(q: np.ndarray, k: int, ef: Any) -> np.ndarray:
        index.expansion_search = int(ef)
        qa = np.hstack([q, np.zeros((len(q), 1), np.float32)])
        res = index.search(qa, k, threads=1)
        return np.asarray(res.keys, dtype=np.int64)

    return index, search, int(index.memory_usage)


def settings(
    args: argparse.Namespace,
) -> Iterator[tuple[str, str, Callable[[np.ndarray], tuple[Any, Searcher, int]], list[Any]]]:
    """(library, build parameters, build function, query-time parameters) per library."""
    libs = set(args.libs.split(","))
    n, m, efc = args.items, args.m, args.ef_construction
    nlist = max(int(4 * np.sqrt(n)) // 64 * 64, 64)
    efs, probes = args.ef, args.nprobe
    graph = f"M={m} efC={efc}"
    if "faiss-ivf" in libs:
        yield (
            "faiss IVF,Flat",
            f"nlist={nlist}",
            lambda x: build_faiss_ivf(x, nlist, "Flat"),
            probes,
        )
    if "faiss-ivfpq" in libs:  # 4-bit PQ scanned with SIMD; 101 dims padded to 104 = 26 x 4
        yield (
            "faiss IVF,PQ26x4fs",
            f"nlist={nlist}",
            lambda x: build_faiss_ivf(_pad(x, 104), nlist, "PQ26x4fs"),
            probes,
        )
    if "faiss-hnsw" in libs:
        yield "faiss HNSWFlat (L2, augmented)", graph, lambda x: build_faiss_hnsw(x, m, efc), efs
    if "hnswlib" in libs:
        yield "hnswlib (ip)", graph, lambda x: build_hnswlib(x, m, efc, "ip"), efs
    if "hnswlib-l2" in libs:
        yield "hnswlib (L2, augmented)", graph, lambda x: build_hnswlib(x, m, efc, "l2"), efs
    if "usearch" in libs:
        yield "usearch f32 (L2, augmented)", graph, lambda x: build_usearch(x, m, efc, "f32"), efs
    if "usearch-bf16" in libs:
        yield "usearch bf16 (L2, augmented)", graph, lambda x: build_usearch(x, m, efc, "bf16"), efs


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    dim = args.dim
    make = topic_vectors if args.vectors == "topics" else gaussian_vectors
    items, bias, states = make(args.items, dim, args.queries)
    folded = np.hstack([items, bias[:, None]]).astype(np.float32)
    queries = np.hstack([states, np.ones((len(states), 1), np.float32)]).astype(np.float32)
    t0 = time.perf_counter()
    truth = exact_topk(items, bias, states, K)
    exact_s = time.perf_counter() - t0
    print(
        f"exact fp32 top-20 of {len(states)} states: {len(states) / exact_s:,.0f} ev/s",
        file=sys.stderr,
    )
    ti, tb, ts = torch.from_numpy(items), torch.from_numpy(bias), torch.from_numpy(states)
    rows: list[dict[str, Any]] = []
    for lib, build_desc, build, params in settings(args):
        t0 = time.perf_counter()
        _index, search, nbytes = build(folded)
        build_s = time.perf_counter() - t0
        for p in params:
            for n_cand in args.candidates:
                got, secs = [], 0.0
                for lo in range(0, len(queries), BATCH):
                    t1 = time.perf_counter()
                    cand = torch.from_numpy(search(queries[lo : lo + BATCH], n_cand, p))
                    top = rerank(ti, tb, ts[lo : lo + BATCH], cand, K)
                    secs += time.perf_counter() - t1
                    got.append(top.numpy())
                row = {
                    "lib": lib,
                    "build": build_desc,
                    "search": p,
                    "candidates": n_cand,
                    "items": args.items,
                    "vectors": args.vectors,
                    "build_seconds": round(build_s, 2),
                    "index_bytes": nbytes,
                    "events_per_s": round(len(queries) / secs),
                    "top20_overlap": round(overlap(np.concatenate(got), truth), 4),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        del _index
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--candidates", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--vectors", choices=["topics", "gaussian"], default="topics")
    ap.add_argument("--libs", default="faiss-ivf,faiss-hnsw,hnswlib,usearch")
    ap.add_argument("--m", type=int, default=16, help="graph degree (HNSW M)")
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()
    rows = run(args)
    if args.json:
        print(json.dumps({"machine": machine_line(load), "rows": rows}))
        return
    print(machine_line(load))
    print("| library | build | search | cand | build s | bytes | ev/s | top-20 overlap |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['lib']} | {r['build']} | {r['search']} | {r['candidates']} | "
            f"{r['build_seconds']} | {r['index_bytes']:,} | {r['events_per_s']:,} | "
            f"{r['top20_overlap']} |"
        )


if __name__ == "__main__":
    main()
