"""An approximate maximum-inner-product index over a model's item vectors (usearch HNSW).

Why usearch, and the settings, are in ``bench/results/ann-libraries.md``. Two graphs answer
maximum inner product: one built and searched with the inner product itself (usearch ``ip``),
and one over the usual reduction to L2 nearest neighbour (``[v, sqrt(M^2 - |v|^2)]`` against
``[q, 0]``, Bachrach et al. 2014). Which one finds the exact answers depends on the model: on a
GRU4Rec trained on a 1M-item log the reduction proposed 20-35 % of the exact top-20 and the
inner-product graph 86-97 %; on random weights with a bias as large as the products the
inner-product graph missed half of the clear winners and the reduction 2 %
(``bench/results/catalogue-scale.md``). ``metric="auto"`` (the default) tries both on a sample
of the items (:func:`choose_metric`) and builds the better one. The index only proposes
candidates: the model scores them exactly (``streamrec.model.retrieval``), so vectors are
stored in bfloat16 (half the memory, the same candidates in practice).

On disk, beside a checkpoint's weights: ``retrieval.usearch`` (the library's file) and
``retrieval.json`` (library and version, metric, parameters, item count, the SHA-256 of the
vectors it was built from, build seconds). :func:`load_index` refuses an index whose hash is
not the hash of the vectors it is asked to serve: a stale index is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from streamrec.errors import StreamrecError
from streamrec.model.topk import TiledTopK

log = logging.getLogger(__name__)

INDEX_FILE = "retrieval.usearch"
META_FILE = "retrieval.json"
METRICS = ("auto", "ip", "l2-augmented")
INDEX_KINDS = ("hnsw", "head", "head+hnsw", "head+successors")
LIBRARY = "usearch"


@dataclass(frozen=True)
class AnnParams:
    """Index construction and search settings (``model.ann_*`` in the settings)."""

    #: graph degree (HNSW ``M``): more links, better recall, more memory and build time
    connectivity: int = 16
    #: search breadth while inserting (HNSW ``efConstruction``)
    expansion_add: int = 128
    #: search breadth per query (HNSW ``ef``): the main speed/recall knob
    expansion_search: int = 256
    #: candidates per query handed to the exact re-rank
    candidates: int = 100
    #: how the vectors are stored in the index (candidates are re-ranked in float32)
    dtype: str = "bf16"
    #: the graph's similarity: ``ip`` (inner product), ``l2-augmented`` (the L2 reduction), or
    #: ``auto``: whichever finds more of the exact top-10 of probe queries on a sample of the
    #: items (:func:`choose_metric`); which one wins depends on the model
    metric: str = "auto"
    #: ``hnsw``: the usearch graph above; ``head``: no graph, the exact scores of the
    #: ``head_items`` items with the largest vectors (:class:`HeadIndex`); ``head+hnsw``: the
    #: candidates of both (:class:`HybridIndex`); ``head+successors``: the head, and the
    #: retriever adds the clicked item's successors (:mod:`streamrec.model.successors`)
    kind: str = "hnsw"
    #: ``head``: how many items (by vector norm) are scored exactly
    head_items: int = 130_000
    #: ``head``: ``f32`` (the exact order within the head) or ``bf16`` (a shortlist of
    #: ``candidates`` re-ranked in float32; no faster at 1M items on this machine)
    head_dtype: str = "f32"
    #: ``head+successors``: successors of the clicked item scored with the head's answer
    successors: int = 20

    def build_key(self) -> dict[str, Any]:
        """What an index file must have been built with to be reused (search-time settings
        can change without a rebuild)."""
        return {
            "connectivity": self.connectivity,
            "expansion_add": self.expansion_add,
            "dtype": self.dtype,
            "metric": self.metric,
        }


class AnnIndexError(StreamrecError, RuntimeError):
    """An index file is missing, unreadable, or does not belong to these weights."""


def vectors_hash(vectors: Tensor) -> str:
    """SHA-256 of the float32 item vectors an index is built from (row-major bytes)."""
    arr = np.ascontiguousarray(vectors.detach().to("cpu", torch.float32).numpy())
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _augment(vectors: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", vectors, vectors)
    extra = np.sqrt(np.maximum(float(sq.max(initial=0.0)) - sq, 0.0)).astype(np.float32)
    return np.hstack([vectors, extra[:, None]])


class AnnIndex:
    """The index of one set of item vectors: candidates for queries, saved beside weights."""

    #: the candidates' order is the exact order (a re-rank needs only the k best)
    exact_order = False

    def __init__(self, index: Any, params: AnnParams, meta: dict[str, Any]) -> None:
        self._index = index
        self.params = params
        self.meta = meta
        self._index.expansion_search = params.expansion_search

    def set_expansion_search(self, ef: int) -> None:
        """Change the search breadth (no rebuild): more is slower and closer to exact."""
        self.params = replace(self.params, expansion_search=int(ef))
        self._index.expansion_search = int(ef)

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def nbytes(self) -> int:
        """Bytes of the index in memory (graph + stored vectors)."""
        return int(self._index.memory_usage)

    @classmethod
    def build(cls, vectors: Tensor, params: AnnParams, *, threads: int = 1) -> AnnIndex:
        """Build over ``vectors`` ``[n_items, D]`` (row i = item row i)."""
        if params.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {params.metric!r}")
        if params.kind in ("head", "head+successors"):
            return HeadIndex.build_head(vectors, params)
        if params.kind == "head+hnsw":
            graph = AnnIndex.build(vectors, replace(params, kind="hnsw"), threads=threads)
            return HybridIndex(HeadIndex.build_head(vectors, params), graph)
        if params.kind != "hnsw":
            raise ValueError(f"kind must be one of {INDEX_KINDS}, not {params.kind!r}")
        t0 = time.perf_counter()
        v = np.ascontiguousarray(vectors.detach().to("cpu", torch.float32).numpy())
        metric, probe = params.metric, None
        if metric == "auto":
            metric, probe = choose_metric(v, params, threads=threads)
        index = _graph(v, metric, params, threads)
        meta = {
            "library": LIBRARY,
            "library_version": _library_version(),
            "params": asdict(params),
            "n_items": len(v),
            "dim": v.shape[1],
            "vectors_sha256": vectors_hash(vectors),
            "build_seconds": round(time.perf_counter() - t0, 3),
            "build_threads": threads,
            "metric_used": metric,
            "metric_probe_recall": probe,
        }
        return cls(index, params, meta)

    def search(self, queries: Tensor, count: int) -> Tensor:
        """``[B, count]`` item rows (int64, -1 where the index has fewer), best first."""
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(_search(self._index, self.metric, q, count, self.n_items))

    @property
    def metric(self) -> str:
        """The graph's similarity (``ip`` or ``l2-augmented``; ``auto`` chose one at build)."""
        return str(self.meta.get("metric_used") or self.params.metric)

    # ---- persistence ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index and its metadata into ``directory`` (each file atomically: a
        reader sees the old file or the new one; the metadata is written last)."""
        d = Path(directory)
        _atomic_write(d / INDEX_FILE, lambda path: self._index.save(str(path)))
        _atomic_write(d / META_FILE, lambda path: path.write_text(json.dumps(self.meta, indent=1)))


class HeadIndex(AnnIndex):
    """Exact scores over the catalogue's head: the ``head_items`` items whose vectors
    ``[w, b]`` have the largest norm, scored with one tiled matrix product per batch.

    ``head_dtype`` ``f32`` (the default): float32 scores, the exact order within the head;
    ``bf16``: the head scored in bfloat16 and the best ``candidates`` re-ranked in float32 by
    the caller (on this machine no faster at 1M items: catalogue-scale.md).

    On the GRU4Rec trained on the 1M-item log the exact top-20 of real sessions' states lie
    among these items: 97.6 % of them within the 100,000 largest, 99.5 % within 200,000
    (``bench/results/catalogue-scale.md``), while a graph search misses the high-norm shell
    the answers sit on. Items outside the head are never proposed (the caller's extra rows
    and the model's offset rows still are). Building is a sort of the norms: nothing is
    saved, and a hot swap never waits for it.
    """

    def __init__(self, rows: Tensor, tiled: TiledTopK, params: AnnParams, meta: dict[str, Any]):
        self._rows = rows
        self._tiled = tiled
        self.params = params
        self.meta = meta
        # float32: the exact order; bf16 (``dtype``): a shortlist the caller re-ranks in float32
        self.exact_order = tiled.weight_t.dtype == torch.float32

    @classmethod
    def build_head(cls, vectors: Tensor, params: AnnParams) -> HeadIndex:
        t0 = time.perf_counter()
        v = vectors.detach().to("cpu", torch.float32)
        n = min(int(params.head_items), len(v))
        rows = torch.topk(v.norm(dim=1), n).indices.sort().values
        if params.head_dtype not in ("f32", "bf16"):
            raise ValueError(f"head_dtype must be f32 or bf16, not {params.head_dtype!r}")
        dtype = torch.bfloat16 if params.head_dtype == "bf16" else torch.float32
        head_t = v[rows].t().contiguous().to(dtype)
        tiled = TiledTopK(head_t, torch.zeros(1, n, dtype=dtype))
        meta = {
            "library": "torch",
            "params": asdict(params),
            "n_items": len(v),
            "dim": v.shape[1],
            "head_items": n,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "build_threads": 1,
        }
        return cls(rows, tiled, params, meta)

    def set_expansion_search(self, ef: int) -> None:
        """No search breadth: the head is scored exactly."""

    @property
    def nbytes(self) -> int:
        return int(self._tiled.weight_t.nbytes + self._rows.nbytes)

    def search(self, queries: Tensor, count: int) -> Tensor:
        """The ``count`` best head items of each query (exact scores), best first."""
        q = queries.detach().to("cpu", torch.float32)
        count = min(count, len(self._rows))
        if count == 0:
            return torch.full((len(q), 0), -1, dtype=torch.int64)
        _, pos = self._tiled.topk(q, count)
        return self._rows[pos]

    @property
    def metric(self) -> str:
        return "ip"

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Nothing to save: the head is rebuilt from the weights in a fraction of a second."""


class HybridIndex(AnnIndex):
    """The head's exact candidates and the graph's, each once: the head holds the high-norm
    items most answers sit on, which the graph reaches badly; the graph finds a state's own
    neighbours in the tail, which the head leaves out. The graph is saved and loaded as a
    ``hnsw`` index (the head is rebuilt)."""

    def __init__(self, head: HeadIndex, graph: AnnIndex) -> None:
        self.head = head
        self.graph = graph
        self.params = replace(graph.params, kind="head+hnsw")
        self.meta = {**graph.meta, "head": head.meta}

    def set_expansion_search(self, ef: int) -> None:
        self.graph.set_expansion_search(ef)
        self.params = replace(self.params, expansion_search=int(ef))

    @property
    def nbytes(self) -> int:
        return self.head.nbytes + self.graph.nbytes

    @property
    def metric(self) -> str:
        return self.graph.metric

    def search(self, queries: Tensor, count: int) -> Tensor:
        """``[B, 2 * count]``: the head's and the graph's ``count`` best, repeats as -1."""
        both = torch.cat([self.head.search(queries, count), self.graph.search(queries, count)], 1)
        srt = both.sort(dim=1).values
        repeat = torch.zeros_like(srt, dtype=torch.bool)
        repeat[:, 1:] = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        return srt.masked_fill(repeat, -1)

    def save(self, directory: str | os.PathLike[str]) -> None:
        self.graph.save(directory)


def _graph(v: np.ndarray, metric: str, params: AnnParams, threads: int) -> Any:
    from usearch.index import Index

    data = _augment(v) if metric == "l2-augmented" else v
    index: Any = Index(
        ndim=data.shape[1],
        metric="ip" if metric == "ip" else "l2sq",
        dtype=params.dtype,
        connectivity=params.connectivity,
        expansion_add=params.expansion_add,
    )
    if len(data):
        index.add(np.arange(len(data), dtype=np.uint64), data, threads=threads)
    index.expansion_search = params.expansion_search
    return index


def _search(index: Any, metric: str, q: np.ndarray, count: int, n_items: int) -> np.ndarray:
    """``[B, count]`` keys (-1 where fewer were found) of queries ``q`` ``[B, D]``."""
    if metric == "l2-augmented":
        q = np.hstack([q, np.zeros((len(q), 1), np.float32)])
    count = min(count, n_items)
    keys = np.full((len(q), count), -1, dtype=np.int64)
    if len(q) == 0 or count == 0:
        return keys
    res = index.search(q, count, threads=1)
    got = np.asarray(res.keys, dtype=np.int64).reshape(len(q), -1)[:, :count]
    keys[:, : got.shape[1]] = got
    # a batch answer says how many it found per query; a single query's keys are those
    found = np.asarray(getattr(res, "counts", [got.shape[1]])).reshape(-1, 1)
    keys[np.arange(count)[None, :] >= found] = -1
    return keys


#: items and probe queries of :func:`choose_metric`
PROBE_ITEMS = 20_000
PROBE_QUERIES = 200


def choose_metric(
    v: np.ndarray, params: AnnParams, *, threads: int = 1, seed: int = 0
) -> tuple[str, dict[str, float]]:
    """The graph (``ip`` or ``l2-augmented``) that finds more of the exact top-10 of probe
    queries, both built over a sample of :data:`PROBE_ITEMS` items.

    A probe is an item's output row (not its bias), scaled to the norm of a GRU output of that
    width (``0.5 sqrt(width)``), with the bias column 1: a state pointing at that item, as
    sessions do. The inner-product graph won on a trained 1M-item GRU4Rec, the L2 reduction on
    random weights with a large bias (``bench/results/catalogue-scale.md``).
    """
    rng = np.random.default_rng(seed)
    n, d = v.shape
    sample = v[np.sort(rng.choice(n, min(n, PROBE_ITEMS), replace=False))]
    rows = sample[rng.choice(len(sample), min(len(sample), PROBE_QUERIES), replace=False), :-1]
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    q = np.hstack([0.5 * np.sqrt(d - 1) * rows / np.maximum(norm, 1e-12), np.ones((len(rows), 1))])
    q = q.astype(np.float32)
    k = min(10, len(sample))
    exact = np.argpartition(-(q @ sample.T), k - 1, axis=1)[:, :k]
    recall = {}
    for metric in ("ip", "l2-augmented"):
        graph = _graph(sample, metric, params, threads)
        found = _search(graph, metric, q, params.candidates, len(sample))
        recall[metric] = float(
            np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact, strict=True)])
        )
    return max(recall, key=lambda m: recall[m]), recall


def load_index(directory: str | os.PathLike[str], vectors: Tensor, params: AnnParams) -> AnnIndex:
    """The index saved in ``directory`` if it was built from exactly these vectors with these
    construction settings; :class:`AnnIndexError` otherwise (the caller rebuilds)."""
    from usearch.index import Index

    d = Path(directory)
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AnnIndexError(f"no readable {META_FILE} in {d}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("library") != LIBRARY:
        raise AnnIndexError(f"{d / META_FILE}: not a {LIBRARY} index")
    saved = {"metric": "l2-augmented", **dict(meta.get("params") or {})}  # before metric was kept
    built = AnnParams(**{**asdict(params), **saved})
    wanted = params
    if params.metric == "auto":  # auto takes the graph it would have chosen, whichever was built
        wanted = replace(params, metric=built.metric)
    if built.build_key() != wanted.build_key():
        raise AnnIndexError(f"{d}: built with {built.build_key()}, wanted {params.build_key()}")
    if meta.get("n_items") != vectors.shape[0] or meta.get("dim") != vectors.shape[1]:
        raise AnnIndexError(f"{d}: built for {meta.get('n_items')} x {meta.get('dim')} vectors")
    if meta.get("vectors_sha256") != vectors_hash(vectors):
        raise AnnIndexError(f"{d}: built from other weights (vector hash differs)")
    try:
        index = Index.restore(str(d / INDEX_FILE), view=False)
    except Exception as exc:  # the library raises plain RuntimeError/ValueError
        raise AnnIndexError(f"{d / INDEX_FILE}: unreadable: {exc}") from exc
    if index is None or len(index) != meta["n_items"]:
        raise AnnIndexError(f"{d / INDEX_FILE}: holds a different number of items")
    return AnnIndex(index, params, meta)


def load_or_build(
    directory: str | os.PathLike[str] | None,
    vectors: Tensor,
    params: AnnParams,
    *,
    save: bool = True,
    threads: int = 1,
) -> AnnIndex:
    """The saved index of these vectors, else a new one (saved into ``directory`` when it is
    writable and ``save``; a read-only checkpoint directory only costs the rebuild). A
    ``head`` index is always built (it is a sort of the norms)."""
    if params.kind in ("head", "head+successors"):
        return AnnIndex.build(vectors, params, threads=threads)
    if params.kind == "head+hnsw":
        graph = load_or_build(
            directory, vectors, replace(params, kind="hnsw"), save=save, threads=threads
        )
        return HybridIndex(HeadIndex.build_head(vectors, params), graph)
    if directory is not None:
        try:
            return load_index(directory, vectors, params)
        except AnnIndexError as exc:
            log.info("building the retrieval index: %s", exc)
    index = AnnIndex.build(vectors, params, threads=threads)
    if directory is not None and save:
        try:
            index.save(directory)
        except OSError as exc:
            log.warning("retrieval index not saved in %s: %s", directory, exc)
    return index


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(LIBRARY)
    except PackageNotFoundError:
        return "unknown"
