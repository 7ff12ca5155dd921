"""The served model: a loaded checkpoint on its device, the batched step, hot swap.

Arrays cross this boundary as numpy float32 (states live as bytes in tables); tensors stay
inside. Every call runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrec.errors import StreamrecError
from streamrec.loop import registry
from streamrec.model.ann import AnnParams, load_or_build
from streamrec.model.api import InnerProductScores, SplitStepModel, StepModule
from streamrec.model.checkpoint import (
    CheckpointError,
    CheckpointRecord,
    load_checkpoint,
    read_checkpoint_record,
)
from streamrec.model.device import resolve_device
from streamrec.model.gate import GATE_RATIO, HOLDOUT_KEY, HOLDOUT_METRIC, gate, holdout_recall
from streamrec.model.retrieval import Retriever, choose_retrieval
from streamrec.model.successors import SuccessorTable, SuccessorTableError, load_table
from streamrec.model.topk import BLOCK_TOPK_MIN_ITEMS

log = logging.getLogger(__name__)


class ModelLoadError(StreamrecError, RuntimeError):
    """A checkpoint could not be loaded or did not pass validation."""


#: item rows stepped at a time when validating a model
VALIDATE_CHUNK = 1024


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 dot products (x86 AVX512_BF16/AMX-BF16, Arm BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _successor_table(
    index_dir: str | os.PathLike[str] | None, model: InnerProductScores, width: int
) -> SuccessorTable | None:
    """The successor table published beside the weights; None (with a warning: the head
    alone answers, with less recall) when it is missing or does not match them. A worker
    cannot rebuild it: that needs the training log."""
    if index_dir is None:
        log.warning("ann_index=head+successors: no checkpoint directory, no successor table")
        return None
    try:
        with torch.inference_mode():
            return load_table(index_dir, model.item_vectors(), width)
    except SuccessorTableError as exc:
        log.warning("successor table not used (the head alone answers): %s", exc)
        return None


def _fingerprint(path: Path) -> str:
    """What changes when a checkpoint directory is (re)written: so a checkpoint rejected
    while half-written is tried again once its files change."""
    parts = []
    for name in ("checkpoint.json", "model.safetensors"):
        try:
            st = (path / name).stat()
            parts.append(f"{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append("-")
    return "|".join(parts)


#: the most score bytes a validation step holds at once (rows x items x 4)
VALIDATE_SCORE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RetrievalOptions:
    """How a served model finds its top-k (``model.retrieval`` and ``model.ann_*``)."""

    #: exact | ann | auto (:func:`streamrec.model.retrieval.choose_retrieval`)
    mode: str = "exact"
    ann: AnnParams = field(default_factory=AnnParams)
    #: exact retrieval through a bf16 shortlist proven against float32 (CPUs with bf16)
    bf16_shortlist: bool = False
    #: write an index built at load beside the checkpoint (when the directory is writable)
    save_index: bool = True

    @classmethod
    def from_settings(cls, m: Any) -> RetrievalOptions:
        """From ``Settings.model`` (``retrieval``, ``ann_*``, ``bf16_shortlist``)."""
        ann = AnnParams(
            connectivity=m.ann_connectivity,
            expansion_add=m.ann_expansion_add,
            expansion_search=m.ann_expansion_search,
            candidates=m.ann_candidates,
            kind=m.ann_index,
            head_items=m.ann_head_items,
            successors=m.ann_successors,
        )
        return cls(m.retrieval, ann, m.bf16_shortlist)


@dataclass
class StepOutput:
    states: np.ndarray  # [B, S] float32
    top_rows: np.ndarray  # [B, k] int64
    top_scores: np.ndarray  # [B, k] float32


class ServingModel:
    """A step-API model with its item index and version, ready for batched serving."""

    #: the checkpoint's record, when loaded from one (:meth:`from_checkpoint`)
    record: CheckpointRecord | None = None

    def __init__(
        self,
        model: StepModule,
        item_ids: Sequence[str],
        version: str,
        *,
        device: torch.device | str | None = None,
        top_k: int = 20,
        name: str = "model",
        metadata: dict[str, Any] | None = None,
        score_dtype: str = "float32",
        retrieval: RetrievalOptions | None = None,
        index_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.model.eval()
        self.item_ids = [str(i) for i in item_ids]
        self.item_index = {s: i for i, s in enumerate(self.item_ids)}
        self._item_ids_arr = np.array(self.item_ids, dtype=object)
        self.version = str(version)
        self.top_k = min(int(top_k), len(self.item_ids))
        self.name = name
        self.metadata = metadata or {}
        self.n_items = int(model.n_items)
        self.state_dim = int(model.state_dim)
        self.user_state_dim = int(model.user_state_dim)
        if self.n_items != len(self.item_ids):
            raise ModelLoadError(f"model has {self.n_items} items, index has {len(self.item_ids)}")
        #: The model splits its step (advance / score), so the core can advance states
        #: event by event and score a whole batch in one matmul + top-k.
        self.split = isinstance(model, SplitStepModel)
        if score_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"score_dtype must be float32 or bfloat16, not {score_dtype!r}")
        if score_dtype == "bfloat16" and not self.split:
            log.warning("bfloat16 scoring needs a split-step model (GRU4Rec); scoring in float32")
            score_dtype = "float32"
        if score_dtype == "bfloat16" and self.device.type == "cpu" and not cpu_has_bf16():
            log.warning(
                "model.score_dtype=bfloat16, but this CPU has no bfloat16 instructions "
                "(bf16 there is emulated, about 10x slower than float32); scoring in float32"
            )
            score_dtype = "float32"
        self.score_dtype = score_dtype
        #: a large catalogue on CPU: scored in row chunks (see :meth:`score`)
        self._big_cpu = self.device.type == "cpu" and self.n_items >= BLOCK_TOPK_MIN_ITEMS
        self._score_states: Callable[[torch.Tensor], torch.Tensor] | None = None
        if isinstance(model, SplitStepModel):
            # a frozen copy of the output weights where it pays (see state_scorer)
            self._score_states = model.state_scorer(getattr(torch, score_dtype), copy=self._big_cpu)
        self.retriever = self._make_retriever(model, retrieval or RetrievalOptions(), index_dir)
        #: exact | ann: how the top-k is found (see streamrec.model.retrieval)
        self.retrieval = self.retriever.mode if self.retriever is not None else "exact"

    def _make_retriever(
        self, model: StepModule, opts: RetrievalOptions, index_dir: str | os.PathLike[str] | None
    ) -> Retriever | None:
        """The retrieval of a model with an inner-product split (None for others: they are
        scored through ``step`` and ``torch.topk``). An ``ann`` index is loaded from
        ``index_dir`` (beside the weights) or built, and saved there, here: at load, which a
        hot swap runs off the serving path."""
        if not isinstance(model, InnerProductScores):
            if opts.mode == "ann":
                raise ModelLoadError(f"{type(model).__name__} cannot be served with retrieval=ann")
            return None
        try:
            mode = choose_retrieval(opts.mode, self.n_items, self.device, model)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        score_states = self._score_states
        exact_topk = None
        if score_states is not None:
            full = lambda state, user: score_states(state)  # noqa: E731
            if self._big_cpu and isinstance(model, SplitStepModel):
                # tile by tile into a kept buffer: no full score matrix per chunk
                exact_topk = model.state_topk(getattr(torch, self.score_dtype))
        else:
            full = model.score_all
        index = None
        ann = opts.ann
        head16 = ann.kind == "head" and ann.head_dtype == "bf16" and self.device.type == "cpu"
        if head16 and not cpu_has_bf16():  # emulated bf16 is slower than float32
            ann = replace(ann, head_dtype="f32")
        if mode == "ann":
            with torch.inference_mode():
                index = load_or_build(index_dir, model.item_vectors(), ann, save=opts.save_index)
        shortlist = opts.bf16_shortlist and mode == "exact"
        if shortlist and self.device.type == "cpu" and not cpu_has_bf16():
            log.warning("model.bf16_shortlist: this CPU has no bfloat16 instructions; not used")
            shortlist = False
        successors = None
        if mode == "ann" and ann.kind == "head+successors":
            successors = _successor_table(index_dir, model, ann.successors)
        return Retriever(
            model, full, mode=mode, index=index, candidates=opts.ann.candidates,
            bf16_shortlist=shortlist, exact_topk=exact_topk, successors=successors,
        )  # fmt: skip

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str = "auto",
        top_k: int = 20,
        score_dtype: str = "float32",
        record: CheckpointRecord | None = None,
        retrieval: RetrievalOptions | None = None,
    ) -> ServingModel:
        """Load a checkpoint directory (``record``: its record, when read already;
        ``retrieval``: how its top-k is found, an ANN index loaded from beside the weights or
        built there)."""
        try:
            dev = resolve_device(device)
            ckpt = load_checkpoint(Path(path), dev, record)
        except Exception as exc:
            raise ModelLoadError(f"cannot load checkpoint {path}: {exc}") from exc
        rec = ckpt.record
        meta = {
            "metrics": rec.metrics,
            "data_stats": rec.data_stats,
            "created_at": rec.created_at,
            "train_params": rec.train_params,
            "model_config": rec.model_config,
            "path": str(path),
        }
        served = cls(
            ckpt.model,
            ckpt.item_ids,
            rec.version,
            device=dev,
            top_k=top_k,
            name=rec.model_name,
            metadata=meta,
            score_dtype=score_dtype,
            retrieval=retrieval,
            index_dir=path,
        )
        served.record = rec
        return served

    # ---- helpers -------------------------------------------------------------------------
    def rows(self, item_ids: Sequence[str | None]) -> np.ndarray:
        get = self.item_index.get
        return np.fromiter(
            (-1 if i is None else get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids)
        )

    def ids(self, rows: np.ndarray) -> np.ndarray:
        return self._item_ids_arr[rows]

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

    def _t(self, a: np.ndarray | None) -> torch.Tensor | None:
        """User states: None where the model has none (or none were given)."""
        if a is None or (self.user_state_dim == 0 and a.ndim == 2 and a.shape[1] == 0):
            return None
        return self._tensor(a)

    @staticmethod
    def _np(t: torch.Tensor | None, batch: int) -> np.ndarray:
        if t is None:
            return np.zeros((batch, 0), dtype=np.float32)
        return t.detach().to("cpu", torch.float32).numpy()

    # ---- batched step API (numpy in, numpy out) ------------------------------------------
    def initial_user_states(self, batch: int) -> np.ndarray:
        if self.user_state_dim == 0:
            return np.zeros((batch, 0), dtype=np.float32)
        with torch.inference_mode():
            return self._np(self.model.initial_user_state(batch), batch)

    def initial_states(self, users: np.ndarray | None, batch: int) -> np.ndarray:
        with torch.inference_mode():
            return self._np(self.model.initial_state(self._t(users), batch), batch)

    def end_session(self, users: np.ndarray, finals: np.ndarray) -> np.ndarray:
        if self.user_state_dim == 0:
            return np.zeros((len(finals), 0), dtype=np.float32)
        with torch.inference_mode():
            out = self.model.end_session(self._t(users), self._tensor(finals))
            return self._np(out, len(finals))

    def step(
        self, rows: np.ndarray, states: np.ndarray, users: np.ndarray | None, k: int | None = None
    ) -> StepOutput:
        """One model step for a batch; ``rows[i] < 0`` leaves state i unchanged."""
        k = self.top_k if k is None else min(k, self.n_items)
        b = len(rows)
        with torch.inference_mode():
            r = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
            st, us = self._tensor(states), self._t(users)
            if self.retriever is not None:  # advance, then the retrieval's top-k
                new = self._advance_t(r, st, us)
                top_s, top_i = self.retriever.topk(new, us, k, clicked=r)
            else:
                new, scores = self.model.step(r, st, us)
                top_s, top_i = torch.topk(scores, k, dim=1)
            new_np = self._np(new, b)
            return StepOutput(new_np, top_i.cpu().numpy(), top_s.float().cpu().numpy())

    def _advance_t(
        self, r: torch.Tensor, st: torch.Tensor, us: torch.Tensor | None
    ) -> torch.Tensor:
        if isinstance(self.model, SplitStepModel):
            return self.model.advance(r, st)
        forward = getattr(self.model, "forward_step", None)
        if forward is not None:
            return forward(r, st, us)[0]
        return self.model.step(r, st, us)[0]

    def advance(self, rows: np.ndarray, states: np.ndarray) -> np.ndarray:
        """New states only (no scores); ``rows[i] < 0`` keeps state i. Needs ``split``."""
        assert isinstance(self.model, SplitStepModel)
        with torch.inference_mode():
            r = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
            return self._np(self.model.advance(r, self._tensor(states)), len(rows))

    def advance_only(
        self, rows: np.ndarray, states: np.ndarray, users: np.ndarray | None
    ) -> np.ndarray:
        """New states without scores, whatever the model: ``advance`` (split step), else
        ``forward_step`` (HRNN, p-RNN), else ``step`` with its scores dropped."""
        if self.split:
            return self.advance(rows, states)
        forward = getattr(self.model, "forward_step", None)
        if forward is None:
            return self.step(rows, states, users, k=1).states
        with torch.inference_mode():
            r = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
            new = self._advance_t(r, self._tensor(states), self._t(users))
            return self._np(new, len(rows))

    def score(
        self, states: np.ndarray, k: int | None = None, clicked: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows, scores) of states made by :meth:`advance`, as ``step`` would give
        (``clicked``: the rows they stepped on, -1 for none, for the successor table)."""
        k = self.top_k if k is None else min(k, self.n_items)
        assert self.split and self.retriever is not None, "score() needs a split-step model"
        with torch.inference_mode():
            # on CPU the retrieval scores rows in chunks: each chunk's scores stay in cache
            c = None if clicked is None else torch.from_numpy(np.asarray(clicked, np.int64))
            top_s, top_i = self.retriever.topk(self._tensor(states), None, k, clicked=c)
            return top_i.cpu().numpy(), top_s.float().cpu().numpy()

    def encode_user(self, sessions: Sequence[Sequence[str]]) -> np.ndarray:
        """Re-encode a user context from its recent session summaries."""
        return self.encode_users([sessions])[0]

    #: sessions advanced together when re-encoding
    ENCODE_BATCH = 512

    def encode_sessions(
        self, sessions: Sequence[Sequence[str]], users: np.ndarray | None
    ) -> np.ndarray:
        """Re-encode many sessions from their item ids, position by position in batches of
        :attr:`ENCODE_BATCH`. States are advanced only: a split-step model never scores; a
        model without a split step scores only the top-1 (its step computes the scores).
        Unknown items (and positions past a session's end) leave that state unchanged.
        Models with a ``forward_step`` (HRNN, p-RNN: the training step without scoring) are
        advanced through it, so they never score either; only a model with neither (the
        tests' tiny model) goes through ``step``."""
        n = len(sessions)
        out = np.empty((n, self.state_dim), dtype=np.float32)
        for lo in range(0, n, self.ENCODE_BATCH):
            chunk = sessions[lo : lo + self.ENCODE_BATCH]
            u = None if users is None or self.user_state_dim == 0 else users[lo : lo + len(chunk)]
            states = self.initial_states(u, len(chunk))
            longest = max((len(s) for s in chunk), default=0)
            rows = np.full((len(chunk), longest), -1, dtype=np.int64)
            for i, items in enumerate(chunk):
                rows[i, : len(items)] = self.rows(items)
            for j in range(longest):
                col = rows[:, j]
                live = np.flatnonzero(col >= 0)
                if live.size == 0:
                    continue
                uu = None if u is None else u[live]
                states[live] = self.advance_only(col[live], states[live], uu)
            out[lo : lo + len(chunk)] = states
        return out

    def encode_users(self, users: Sequence[Sequence[Sequence[str]]]) -> np.ndarray:
        """Re-encode many user contexts from their recent session summaries, batched: the
        j-th session of every user that has one at a time."""
        ctx = self.initial_user_states(len(users))
        if self.user_state_dim == 0:
            return ctx
        longest = max((len(s) for s in users), default=0)
        for j in range(longest):
            idx = [i for i, s in enumerate(users) if len(s) > j]
            finals = self.encode_sessions([users[i][j] for i in idx], ctx[idx])
            ctx[idx] = self.end_session(ctx[idx], finals)
        return ctx

    # ---- validation ----------------------------------------------------------------------
    def validate(
        self,
        holdout: Sequence[Sequence[str]] | None = None,
        min_recall: float = 0.0,
        *,
        reference_recall: float | None = None,
        gate_ratio: float = GATE_RATIO,
    ) -> float | None:
        """Check the model before it serves; returns the holdout Recall@20 (or None).

        * every weight and buffer is finite;
        * every item row, stepped from the initial state, gives a finite state; rows spread
          over the catalogue give finite scores for every item, not all equal (an all-zero
          model);
        * with a holdout slice, Recall@20 on it is at least ``min_recall`` and at least
          ``gate_ratio`` times ``reference_recall`` (the checkpoint's own offline figure).

        Raises ModelLoadError on failure.
        """
        for name, t in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ModelLoadError(f"weights {name!r} hold NaN or infinite values")
        # Every item row is stepped (advanced, not scored: a NaN or overflow in any input row
        # shows in its state); scores for every item come from one chunk of rows spread over
        # the catalogue (each score vector covers every item's output row). Scoring all rows
        # cost seconds at 17k items and delayed every swap by as much.
        with torch.inference_mode():
            for lo in range(0, self.n_items, VALIDATE_CHUNK):
                rows = np.arange(lo, min(lo + VALIDATE_CHUNK, self.n_items), dtype=np.int64)
                b = len(rows)
                users = self.initial_user_states(b)
                states = self.initial_states(users, b)
                if states.shape != (b, self.state_dim):
                    raise ModelLoadError(
                        f"initial state shape {states.shape} != ({b}, {self.state_dim})"
                    )
                new_np = self.advance_only(rows, states, users)
                if new_np.shape != (b, self.state_dim) or not np.isfinite(new_np).all():
                    raise ModelLoadError(f"step of item rows {lo}..{lo + b - 1} gave a bad state")
            sample = np.unique(
                np.linspace(0, self.n_items - 1, min(VALIDATE_CHUNK, self.n_items)).astype(np.int64)
            )
            b = len(sample)
            users = self.initial_user_states(b)
            states = self.initial_states(users, b)
            r = torch.from_numpy(sample).to(self.device)
            st, us = self._tensor(states), self._t(users)
            varied = False
            # rows in blocks: 1,024 score rows of a million items would be 4 GB at once
            chunk = max(1, VALIDATE_SCORE_BYTES // (4 * self.n_items))
            for lo in range(0, b, chunk):
                u = None if us is None else us[lo : lo + chunk]
                _, scores = self.model.step(r[lo : lo + chunk], st[lo : lo + chunk], u)
                if not bool(torch.isfinite(scores).all()):
                    raise ModelLoadError("the step gave non-finite scores")
                varied = varied or bool((scores.amax(dim=1) > scores.amin(dim=1)).any())
        if not varied and self.n_items > 1:
            raise ModelLoadError("the model scores every item the same (all-zero weights?)")
        if not holdout:
            return None
        recall = self.holdout_recall(holdout)
        if recall != recall:  # no session of two events: nothing to judge
            return recall
        if recall < min_recall:
            raise ModelLoadError(f"quality gate: holdout Recall@20 {recall:.4f} < {min_recall}")
        if reference_recall is not None and reference_recall == reference_recall:
            decision = gate(
                recall,
                float(reference_recall),
                tolerance=1 - gate_ratio,
                name="holdout Recall@20",
                against="the checkpoint's own",
            )
            if not decision.passed:
                raise ModelLoadError(f"quality gate: {decision.reason}")
        return recall

    def holdout_recall(self, holdout: Sequence[Sequence[str]], k: int = 20) -> float:
        """Recall@k of next-item prediction on a holdout slice (lists of item ids), each
        session stepped from the initial state: the figure the gate compares
        (``streamrec.model.gate.holdout_recall``, which gives the trainer its
        ``metrics["holdout_recall@20"]`` too). NaN when no session has two events."""
        return holdout_recall(self.model, self.item_index, holdout, self.device, k)


#: why :class:`ModelHolder` did not load a published checkpoint (its ``refusals``' keys)
REFUSED_POINTER = "bad_pointer"
REFUSED_VERSION_REUSED = "version_reused"
REFUSED_INVALID = "invalid"


def find_checkpoint(
    watch_dir: str | os.PathLike[str] | None, alias: str = registry.CHAMPION
) -> Path | None:
    """The checkpoint to serve from ``watch_dir``: in a model registry, the version ``alias``
    names (:class:`streamrec.loop.registry.RegistryError` when its pointer cannot be
    followed); else (the champion only) the newest checkpoint directory in it, or itself; None
    when there is none yet."""
    if watch_dir is None or not Path(watch_dir).is_dir():
        return None
    watch_dir = Path(watch_dir)
    if registry.is_registry(watch_dir):
        # a model registry: follow its pointer (a rollback is followed too)
        return registry.resolve(watch_dir, alias)
    if alias != registry.CHAMPION:
        return None  # a challenger comes from a registry only
    cands = [p.parent for p in watch_dir.glob("*/checkpoint.json")]
    if (watch_dir / "checkpoint.json").exists():
        cands.append(watch_dir)
    if not cands:
        return None
    return max(cands, key=lambda p: (p / "checkpoint.json").stat().st_mtime)


class ModelHolder:
    """Holds the current ServingModel; swaps happen between batches under a lock.

    ``current`` is read once per batch by the core, so a batch never mixes two versions.
    With ``watch_dir`` set, :meth:`maybe_reload` loads the newest checkpoint directory in it
    (``checkpoint.json`` present) whose version differs from the served one; when
    ``watch_dir`` is a model registry (:mod:`streamrec.loop.registry`), the version its
    ``alias`` names (the champion: the published one; or the challenger).

    What is not loaded is counted by reason in :attr:`refusals` (and handed to
    ``on_refusal``, the worker's metric) and logged once per distinct problem: a registry
    pointer that cannot be followed (:data:`REFUSED_POINTER`), a different model under the
    served version's name (:data:`REFUSED_VERSION_REUSED`), a checkpoint that does not load or
    fails validation (:data:`REFUSED_INVALID`). The served model stays meanwhile.
    Only a challenger's holder may hold no model (none is named yet, or it was promoted or
    cleared: :meth:`gone`, :meth:`clear`).
    """

    def __init__(
        self,
        model: ServingModel | None,
        *,
        watch_dir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        top_k: int = 20,
        holdout_key: str = HOLDOUT_KEY,
        score_dtype: str = "float32",
        gate_ratio: float = GATE_RATIO,
        retrieval: RetrievalOptions | None = None,
        alias: str = registry.CHAMPION,
    ) -> None:
        if model is None and alias == registry.CHAMPION:
            raise ValueError("the champion's holder needs a model")
        self._model = model
        self.alias = alias
        self.gate_ratio = gate_ratio
        self.score_dtype = score_dtype
        self.retrieval = retrieval
        self._lock = threading.Lock()
        self.watch_dir = Path(watch_dir) if watch_dir else None
        self.device = device
        self.top_k = top_k
        self.holdout_key = holdout_key
        self.rejected: dict[str, str] = {}
        self.swaps = 0
        self.refusals: collections.Counter[str] = collections.Counter()
        self.on_refusal: Callable[[str], None] | None = None
        self._seen_refusal: str | None = None  # logged and counted, seen on the last poll
        self._refused_now = False

    @property
    def current(self) -> ServingModel:
        if self._model is None:
            raise ModelLoadError(f"no {self.alias} model is loaded")
        return self._model

    @property
    def served(self) -> ServingModel | None:
        """The model, or None (a challenger's holder with none)."""
        return self._model

    def gone(self) -> bool:
        """A model is held but the watched registry's alias names none any more (the
        challenger was promoted or cleared). A pointer that cannot be read is not "none": the
        model stays (the reload counted the refusal)."""
        if (
            self._model is None
            or self.alias == registry.CHAMPION
            or self.watch_dir is None
            or not registry.is_registry(self.watch_dir)
        ):
            return False
        try:
            return registry.alias_version(self.watch_dir, self.alias) is None
        except registry.RegistryError:
            return False

    def clear(self) -> None:
        """Hold no model (a challenger's holder only)."""
        if self.alias == registry.CHAMPION:
            raise ValueError("the champion's holder always holds a model")
        with self._lock:
            old, self._model = self._model, None
        log.info("%s %s no longer served", self.alias, old.version if old else None)

    def check(
        self,
        new: ServingModel,
        holdout: Sequence[Sequence[str]] | None = None,
        reference_recall: float | None = None,
    ) -> bool:
        """Validate a new model (weights, held-out gate) without swapping it in."""
        try:
            new.validate(holdout, reference_recall=reference_recall, gate_ratio=self.gate_ratio)
        except ModelLoadError as exc:
            log.warning("model %s rejected: %s", new.version, exc)
            self.rejected[new.version] = str(exc)
            return False
        return True

    def install(self, new: ServingModel) -> None:
        """Swap in a model already validated (:meth:`check`, :meth:`prepare_reload`)."""
        with self._lock:
            old = self._model
            self._model = new
            self.swaps += 1
        log.info("%s swapped: %s -> %s", self.alias, old.version if old else None, new.version)

    def load_and_swap(self, path: str | os.PathLike[str]) -> bool:
        new = self.load_checked(path)
        if new is None:
            return False
        self.install(new)
        return True

    def load_checked(
        self, path: str | os.PathLike[str], record: CheckpointRecord | None = None
    ) -> ServingModel | None:
        """Load and validate a checkpoint (None if it is rejected); nothing is swapped.
        ``record``: the checkpoint's record, when read already."""
        try:
            # an ann index absent beside the checkpoint is built here: in the loader thread,
            # while the old model serves
            new = ServingModel.from_checkpoint(
                path, self.device, self.top_k, self.score_dtype, record=record,
                retrieval=self.retrieval,
            )  # fmt: skip
        except ModelLoadError as exc:
            log.warning("checkpoint %s rejected: %s", path, exc)
            self.rejected[str(path)] = str(exc)
            return None
        rec = new.record
        assert rec is not None  # from_checkpoint sets it
        holdout = rec.data_stats.get(self.holdout_key) or None
        reference = rec.holdout_recall
        if holdout and reference is None:
            log.warning(
                "checkpoint %s has a holdout slice but no %s metric: no relative gate",
                path,
                HOLDOUT_METRIC,
            )
        return new if self.check(new, holdout, reference) else None

    def newest_checkpoint(self) -> Path | None:
        """:func:`find_checkpoint` of the watched directory; a registry pointer that cannot
        be followed is a refusal (None: the served model stays)."""
        try:
            return find_checkpoint(self.watch_dir, self.alias)
        except registry.RegistryError as exc:
            self._refuse(REFUSED_POINTER, str(exc))
            return None

    def _count(self, reason: str) -> None:
        self.refusals[reason] += 1
        if self.on_refusal is not None:
            self.on_refusal(reason)

    def _refuse(self, reason: str, message: str) -> None:
        """Count and log a refusal, once per distinct problem (polls repeat it every few
        seconds until someone fixes the registry)."""
        self._refused_now = True
        if message == self._seen_refusal:
            return
        self._seen_refusal = message
        self._count(reason)
        log.error(
            "%s model not reloaded (%s): %s; still serving %s",
            self.alias,
            reason,
            message,
            self._model.version if self._model is not None else "nothing",
        )

    def maybe_reload(self) -> bool:
        """Swap in the newest checkpoint of the watched directory if its version is new."""
        new = self.prepare_reload()
        if new is None:
            return False
        self.install(new)
        return True

    def prepare_reload(self) -> ServingModel | None:
        """The newest checkpoint of the watched directory, loaded and validated, if its
        version is new (else None); not swapped in: :meth:`install` does that. Safe to run in
        a thread of its own while batches are served (it only reads ``current``)."""
        self._refused_now = False
        new = self._prepare_reload()
        if not self._refused_now and self._seen_refusal is not None:
            # the problem is gone: the next one is logged and counted, even if the same
            log.info("model reload: %s is no longer the case", self._seen_refusal)
            self._seen_refusal = None
        return new

    def _prepare_reload(self) -> ServingModel | None:
        path = self.newest_checkpoint()
        if path is None:
            return None
        try:  # the one read of checkpoint.json per reload: the load below takes the record
            record = read_checkpoint_record(path)
        except CheckpointError:
            return None  # being written, or broken: try again next time
        ident = f"{path}@{record.version}@{_fingerprint(path)}"
        if self._model is not None and record.version == self._model.version:
            self._check_same_model(record)
            return None
        if ident in self.rejected:
            return None
        new = self.load_checked(path, record)
        if new is None:
            self.rejected[ident] = "rejected"
            self._count(REFUSED_INVALID)
        return new

    def _check_same_model(self, record: CheckpointRecord) -> None:
        """A checkpoint named like the served version must be the served model. Another
        model under that name is a publishing error, never loaded: every answer names its
        model by version, and a swap re-encodes only the states of other versions, so the
        stored states would be read by weights that did not make them."""
        served = self._model.record if self._model is not None else None
        if served is None or served.same_model(record):
            return
        self._refuse(
            REFUSED_VERSION_REUSED,
            f"{record.path} is version {record.version}, the served version's name, but "
            f"holds another model (tensors {record.tensor_sha256[:12]}…, {record.n_items} "
            f"items; served: {served.tensor_sha256[:12]}…, {served.n_items} items from "
            f"{served.path}); a new model needs a new version name",
        )
