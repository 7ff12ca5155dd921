"""Each item's most frequent next items in the training log: retrieval candidates that come
from the session itself.

An index over the largest item vectors (the ``head``) keeps most of the exact top-k, but the
items it leaves out are the less popular ones a session's own clicks lead to, and those are
often the next click. The successor table adds them back: for the clicked item, its ``width``
most frequent successors in the training sessions (and the item itself) are scored exactly
together with the index's candidates (``model.ann_index=head+successors``;
:class:`streamrec.model.retrieval.Retriever`). The same table serves the worker and
``trainer evaluate``, so the offline figures are those of the live answers.

The table is built when a checkpoint is published (``trainer train``), saved beside its
weights and keyed like the ANN index: to the hash of the item vectors it was built for, and
to the hash of its own contents. A table that does not match is not used (the worker warns
and serves the head alone; ``trainer evaluate --train`` rebuilds it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from streamrec.errors import StreamrecError
from streamrec.model.ann import AnnParams, _atomic_write, vectors_hash

log = logging.getLogger(__name__)

TABLE_FILE = "successors.npy"
TABLE_META = "successors.json"
#: successors kept per item (``model.ann_successors``)
DEFAULT_WIDTH = AnnParams.successors


class SuccessorTableError(StreamrecError, RuntimeError):
    """A successor table file is missing, unreadable, or does not belong to these weights."""


def table_hash(table: np.ndarray) -> str:
    """SHA-256 of a table's int64 row-major bytes."""
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.int64).tobytes()).hexdigest()


@dataclass(frozen=True)
class SuccessorTable:
    """``table[i]``: the rows that followed item ``i`` in the training sessions, most frequent
    first (ties: lower row first), ``-1`` past the last; ``vectors_sha256``: the item vectors
    (checkpoint) it belongs to."""

    table: Tensor  # [n_items, width] int64
    vectors_sha256: str

    @property
    def n_items(self) -> int:
        return int(self.table.shape[0])

    @property
    def width(self) -> int:
        return int(self.table.shape[1])

    @classmethod
    def build(
        cls,
        item_rows: np.ndarray,
        offsets: np.ndarray,
        n_items: int,
        width: int,
        vectors_sha256: str,
    ) -> SuccessorTable:
        """From encoded sessions (``item_rows[offsets[j]:offsets[j + 1]]`` is session ``j``):
        each item's ``width`` most frequent next items (an item followed by itself is not
        counted: the clicked item is a candidate anyway)."""
        if width < 1:
            raise ValueError(f"width must be at least 1, not {width}")
        rows = np.asarray(item_rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n_items):
            raise ValueError(f"item rows must be in [0, {n_items})")
        same = np.ones(max(len(rows) - 1, 0), dtype=bool)
        ends = np.asarray(offsets, dtype=np.int64)[1:-1] - 1  # last event of each session
        same[ends[(ends >= 0) & (ends < len(same))]] = False
        src, dst = rows[:-1][same], rows[1:][same]
        keep = src != dst
        src, dst = src[keep], dst[keep]
        table = np.full((n_items, width), -1, dtype=np.int64)
        if len(src):
            pair, count = np.unique(src * n_items + dst, return_counts=True)
            s, d = pair // n_items, pair % n_items
            order = np.lexsort((d, -count, s))  # by source, most frequent first, then row
            s, d = s[order], d[order]
            first = np.searchsorted(s, s, side="left")
            rank = np.arange(len(s)) - first
            kept = rank < width
            table[s[kept], rank[kept]] = d[kept]
        return cls(torch.from_numpy(table), vectors_sha256)

    def candidates(self, clicked: Tensor) -> Tensor:
        """``[B, 1 + width]``: each clicked row and its successors (``-1`` for none, and for
        a click the model does not know, ``clicked < 0``)."""
        clicked = clicked.to(torch.int64).reshape(-1)
        known = clicked >= 0
        succ = self.table.to(clicked.device)[clicked.clamp(min=0)]
        succ = succ.masked_fill(~known.unsqueeze(1), -1)
        return torch.cat([clicked.masked_fill(~known, -1).unsqueeze(1), succ], dim=1)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the table and its record (hashes) into a checkpoint directory, atomically."""
        d = Path(directory)
        arr = self.table.numpy()
        meta = {
            "n_items": self.n_items,
            "width": self.width,
            "table_sha256": table_hash(arr),
            "vectors_sha256": self.vectors_sha256,
        }

        def write_table(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, arr, allow_pickle=False)

        _atomic_write(d / TABLE_FILE, write_table)
        _atomic_write(d / TABLE_META, lambda p: p.write_text(json.dumps(meta, indent=1)))


def load_table(directory: str | os.PathLike[str], vectors: Tensor, width: int) -> SuccessorTable:
    """The table saved in ``directory`` if it belongs to these item vectors, has at least
    ``width`` columns (the first ``width`` are used) and its contents match their recorded
    hash; :class:`SuccessorTableError` otherwise."""
    d = Path(directory)
    try:
        meta: Any = json.loads((d / TABLE_META).read_text())
        arr = np.load(d / TABLE_FILE, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SuccessorTableError(f"no readable successor table in {d}: {exc}") from exc
    if not isinstance(meta, dict):
        raise SuccessorTableError(f"{d / TABLE_META}: not a successor table record")
    n_items, dim = int(vectors.shape[0]), int(meta.get("width", 0))
    if arr.dtype != np.int64 or arr.ndim != 2 or arr.shape != (n_items, dim):
        raise SuccessorTableError(f"{d / TABLE_FILE}: {arr.shape} {arr.dtype}, not {n_items} rows")
    if dim < width:
        raise SuccessorTableError(f"{d / TABLE_FILE}: {dim} successors per item, wanted {width}")
    if meta.get("table_sha256") != table_hash(arr):
        raise SuccessorTableError(f"{d / TABLE_FILE}: contents do not match their hash")
    if arr.size and (arr.min() < -1 or arr.max() >= n_items):
        raise SuccessorTableError(f"{d / TABLE_FILE}: rows outside [0, {n_items})")
    digest = vectors_hash(vectors)
    if meta.get("vectors_sha256") != digest:
        raise SuccessorTableError(f"{d}: built for other weights (vector hash differs)")
    return SuccessorTable(torch.from_numpy(np.ascontiguousarray(arr[:, :width])), digest)


def publish_table(
    directory: str | os.PathLike[str],
    vectors: Tensor,
    item_rows: np.ndarray,
    offsets: np.ndarray,
    width: int = DEFAULT_WIDTH,
) -> SuccessorTable:
    """The table of these weights saved in ``directory``, else one built from the encoded
    training sessions and saved there (a stale or damaged one is replaced, never used)."""
    try:
        return load_table(directory, vectors, width)
    except SuccessorTableError as exc:
        log.info("building the successor table: %s", exc)
    table = SuccessorTable.build(
        item_rows, offsets, int(vectors.shape[0]), width, vectors_hash(vectors)
    )
    try:
        table.save(directory)
    except OSError as exc:
        log.warning("successor table not saved in %s: %s", directory, exc)
    return table
