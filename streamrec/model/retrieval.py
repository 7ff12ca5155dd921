"""Top-k items of a batch of states: exact over the catalogue, or ANN candidates re-ranked.

``model.retrieval`` (see docs/architecture.md, "Retrieval"):

* ``exact``: every item is scored (``full_scores``, the model's own float32 scorer), the
  top-k taken by :func:`streamrec.model.topk.blocked_topk`; with ``bf16_shortlist`` the scores
  are first computed in bfloat16, a shortlist of each row is re-scored in float32 and kept
  where a rounding bound proves it holds the float32 top-k (other rows are scored in float32):
  the answer is the float32 answer either way.
* ``ann``: an approximate maximum-inner-product index (:mod:`streamrec.model.ann`) proposes
  candidates for each state; the items a retrieval must never miss are added to them (the
  model's offset rows, e.g. HRNN's memory of the user's items, and the caller's
  ``extra_rows``: a filter or boost list; with a successor table, the clicked item and its most
  frequent successors in the training log, :mod:`streamrec.model.successors`); the model
  scores the candidates exactly (``score_rows``) and the best k are the answer.
* ``auto``: :func:`choose_retrieval`: ``ann`` on a CPU from :data:`AUTO_ANN_MIN_ITEMS` items
  for a model with an inner-product split, ``exact`` otherwise (a GPU scores a million items
  faster than an index answers).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from streamrec.model.ann import AnnIndex, AnnParams, load_or_build
from streamrec.model.api import InnerProductScores
from streamrec.model.successors import SuccessorTable
from streamrec.model.topk import ROWS_PER_PASS, TiledTopK, bf16_left_out_bound, blocked_topk

RETRIEVAL_MODES = ("exact", "ann", "auto")
#: ``auto`` uses the index on CPU from this many items: at 100,000 it was no faster than exact
#: scoring, at 1,000,000 4x faster (at 0.87 top-20 overlap); bench/results/catalogue-scale.md
AUTO_ANN_MIN_ITEMS = 500_000
#: states scored at a time on CPU (their scores stay in cache for the top-k)
CPU_CHUNK = ROWS_PER_PASS

FullScores = Callable[[Tensor, Tensor | None], Tensor]
ExactTopK = Callable[[Tensor, int], tuple[Tensor, Tensor]]


def choose_retrieval(mode: str, n_items: int, device: torch.device | str, model: object) -> str:
    """``exact`` or ``ann`` for the setting ``mode`` (``exact``, ``ann`` or ``auto``).

    ``auto``: ``ann`` on CPU for a model with an inner-product split and at least
    :data:`AUTO_ANN_MIN_ITEMS` items, else ``exact`` (always on a GPU). ``ann`` for a model
    without the split raises ``ValueError``.
    """
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, not {mode!r}")
    split = isinstance(model, InnerProductScores)
    if mode == "ann" and not split:
        raise ValueError(f"{type(model).__name__} has no inner-product split: no ANN retrieval")
    if mode != "auto":
        return mode
    cpu = torch.device(device).type == "cpu"
    return "ann" if cpu and split and n_items >= AUTO_ANN_MIN_ITEMS else "exact"


def publish_index(
    directory: str | os.PathLike[str],
    model: object,
    *,
    when: str = "auto",
    params: AnnParams | None = None,
    threads: int = 1,
) -> AnnIndex | None:
    """Build the ANN index of a checkpoint being published and save it beside its weights
    (``trainer train``, ``trainer retrain``), so that workers load it instead of building it.

    ``when``: ``auto`` (a catalogue ``auto`` retrieval would serve through an index, at least
    :data:`AUTO_ANN_MIN_ITEMS` items), ``always``, ``never``. Models without an inner-product
    split have no index. An index already there for these weights is kept.
    """
    if when not in ("auto", "always", "never"):
        raise ValueError(f"when must be auto, always or never, not {when!r}")
    if when == "never" or not isinstance(model, InnerProductScores):
        return None
    if when == "auto" and int(getattr(model, "n_items", 0)) < AUTO_ANN_MIN_ITEMS:
        return None
    with torch.inference_mode():
        return load_or_build(
            directory, model.item_vectors(), params or AnnParams(), threads=threads
        )


def unique_rows(rows: Tensor) -> Tensor:
    """Each row of ``rows`` ``[B, C]`` with repeats replaced by -1 (order not kept)."""
    srt = rows.sort(dim=1).values
    repeat = torch.zeros_like(srt, dtype=torch.bool)
    repeat[:, 1:] = srt[:, 1:] == srt[:, :-1]
    return srt.masked_fill(repeat, -1)


class Retriever:
    """The top-k of a model's scores for batches of states (see the module docstring).

    ``full_scores(state, user)``: every item's scores, float32 (default: the model's
    ``score_all``; the worker passes its faster frozen-weight scorer). ``successors`` (ann
    mode): the clicked items' successors are scored with the index's candidates.
    """

    def __init__(
        self,
        model: object,
        full_scores: FullScores | None = None,
        *,
        mode: str = "exact",
        index: AnnIndex | None = None,
        candidates: int = 100,
        bf16_shortlist: bool = False,
        shortlist: int = 32,
        chunk: int | None = None,
        exact_topk: ExactTopK | None = None,
        successors: SuccessorTable | None = None,
    ) -> None:
        if mode not in ("exact", "ann"):
            raise ValueError(f"mode must be exact or ann (choose_retrieval), not {mode!r}")
        if mode == "ann" and index is None:
            raise ValueError("ann retrieval needs an index")
        self.model = model
        if full_scores is None:
            if not isinstance(model, InnerProductScores):
                raise ValueError("a model without an inner-product split needs full_scores")
            full_scores = model.score_all
        self.full_scores: FullScores = full_scores
        #: the exact top-k of states without user states, where the model has a faster one
        #: than ``full_scores`` + blocked_topk (GRU4Rec's ``state_topk``); given whole
        #: batches (it scores CPU_CHUNK rows at a time itself)
        self.exact_topk = exact_topk
        self.mode = mode
        self.index = index
        self.successors = successors
        self.n_candidates = int(candidates)
        self.shortlist = int(shortlist)
        self.chunk = chunk
        #: rows whose bf16 shortlist could not be proven and were scored in float32
        self.shortlist_fallbacks = 0
        self._bf16: tuple[TiledTopK, float] | None = None
        if bf16_shortlist:
            if not isinstance(model, InnerProductScores):
                raise ValueError("a bf16 shortlist needs a model with an inner-product split")
            v = model.item_vectors()
            vt16 = v.t().contiguous().to(torch.bfloat16)
            zero = torch.zeros(1, v.shape[0], dtype=torch.bfloat16, device=v.device)
            self._bf16 = (TiledTopK(vt16, zero), float(v.norm(dim=1).max()))

    @property
    def split(self) -> InnerProductScores:
        return cast(InnerProductScores, self.model)

    def topk(
        self,
        state: Tensor,
        user_state: Tensor | None,
        k: int,
        extra_rows: Tensor | None = None,
        clicked: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(scores, item rows) ``[B, k]``, best first, of the states after a step.

        ``extra_rows`` (``[E]`` or ``[B, E]``, -1 ignored): items that must be scored exactly
        whatever the index says (every item is, in exact mode). ``clicked`` (``[B]``, -1: an
        unknown item): the row each state last stepped on; with a successor table, that item
        and its successors are scored too (ann mode).
        """
        b = state.shape[0]
        if self._whole_batch_topk(user_state):
            assert self.exact_topk is not None
            return self.exact_topk(state, k)
        if self.mode == "ann" and self.successors is not None and clicked is not None:
            follow = self.successors.candidates(clicked.to(state.device))
            if extra_rows is not None:
                given = extra_rows.to(follow.dtype)
                given = given.expand(b, -1) if given.dim() == 1 else given
                follow = torch.cat([given, follow], dim=1)
            extra_rows = follow
        chunk = self.chunk or (CPU_CHUNK if state.device.type == "cpu" else max(b, 1))
        parts = []
        for lo in range(0, max(b, 1), chunk):  # one (empty) part for no rows
            st = state[lo : lo + chunk]
            us = None if user_state is None else user_state[lo : lo + chunk]
            ex = extra_rows if extra_rows is None or extra_rows.dim() == 1 else extra_rows[lo:]
            ex = None if ex is None else ex[: len(st)] if ex.dim() == 2 else ex
            parts.append(self._topk_chunk(st, us, k, ex))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _whole_batch_topk(self, user_state: Tensor | None) -> bool:
        """Whether ``exact_topk`` takes the whole batch: it takes the rows in passes of
        CPU_CHUNK itself (``TiledTopK``), and what it needs of every row (a session memory's
        offsets) in one go."""
        exact = self.mode == "exact" and self._bf16 is None and self.exact_topk is not None
        return exact and user_state is None and self.chunk is None

    def _topk_chunk(
        self, state: Tensor, user: Tensor | None, k: int, extra: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        if self.mode == "ann":
            return self._rerank(state, user, k, self.ann_candidates(state, user, k, extra))
        if self._bf16 is not None and len(state):
            return self._bf16_topk(state, user, k)
        if self.exact_topk is not None and user is None:
            return self.exact_topk(state, k)
        return blocked_topk(self.full_scores(state, user), k)

    def candidates(
        self, state: Tensor, user: Tensor | None, found: Tensor, extra: Tensor | None = None
    ) -> Tensor:
        """``[B, C]`` rows to score exactly: ``found`` (the index's answer, or a shortlist),
        the model's offset rows (HRNN's memory) and ``extra``, each once (-1: none)."""
        parts = [found]
        offsets = self.split.offset_rows(user, state)
        if offsets is not None:
            parts.append(offsets.to(found.dtype))
        if extra is not None:
            parts.append(extra.to(found.dtype).expand(state.shape[0], -1))
        return unique_rows(torch.cat(parts, dim=1)) if len(parts) > 1 else found

    def ann_candidates(
        self, state: Tensor, user: Tensor | None, k: int, extra: Tensor | None = None
    ) -> Tensor:
        """What :meth:`topk` scores exactly in ``ann`` mode."""
        assert self.index is not None, "ann_candidates needs an index"
        q = self.split.query_vectors(state, user)
        # an index in exact order (the head's exact scores) needs only the k best, and one
        # more for each offset row (an offset may push a row found among them down)
        offsets = self.split.offset_rows(user, state)
        n_offsets = 0 if offsets is None else offsets.shape[1]
        count = k + n_offsets if self.index.exact_order else max(self.n_candidates, k)
        found = self.index.search(q, count).to(state.device)
        return self.candidates(state, user, found, extra)

    def _rerank(
        self, state: Tensor, user: Tensor | None, k: int, rows: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Exact top-k among ``rows``; states with fewer than k valid rows are scored over
        every item."""
        valid = rows >= 0
        scores = self.split.score_rows(state, user, rows.clamp(min=0))
        scores = scores.masked_fill(~valid, -math.inf)
        values, pos = torch.topk(scores, min(k, rows.shape[1]), dim=1)
        top = rows.gather(1, pos)
        short = valid.sum(dim=1) < k
        if bool(short.any()):  # a tiny catalogue, or an index missing items: score them all
            idx = short.nonzero().squeeze(1)
            us = None if user is None else user[idx]
            v2, r2 = torch.topk(self.full_scores(state[idx], us), k, dim=1)
            values = _widen(values, k)
            top = _widen(top, k, fill=-1)
            values[idx], top[idx] = v2.to(values.dtype), r2
        return values, top

    def _bf16_topk(self, state: Tensor, user: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        """float32 top-k through a bf16 shortlist (see the module docstring)."""
        assert self._bf16 is not None
        tiled16, max_norm = self._bf16
        q = self.split.query_vectors(state, user)
        low, short = tiled16.topk(q, max(self.shortlist, k))
        values, top = self._rerank(state, user, k, self.candidates(state, user, short))
        # every item left out scores at most this (linear), so at most its activation
        bound = bf16_left_out_bound(low[:, -1], q.float().norm(dim=1), max_norm)
        ok = values[:, -1] >= self.split.final_activation(bound.unsqueeze(1)).squeeze(1)
        if not bool(ok.all()):
            idx = (~ok).nonzero().squeeze(1)
            self.shortlist_fallbacks += len(idx)
            us = None if user is None else user[idx]
            v2, r2 = blocked_topk(self.full_scores(state[idx], us), k)
            values[idx], top[idx] = v2.to(values.dtype), r2
        return values, top


def _widen(t: Tensor, k: int, fill: float = -math.inf) -> Tensor:
    if t.shape[1] >= k:
        return t
    pad = torch.full((t.shape[0], k - t.shape[1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)
