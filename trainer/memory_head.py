"""Fitting a session-memory head on sessions the network has not trained on.

The head (``streamrec.model.session_memory``: GRU4Rec's ``session_memory``, HRNN's and p-RNN's
too) adds a learnt offset to the score of
each of the session's last K distinct items, by recency group and, with ``memory_gate``, as a
linear function of the hidden state. Two findings decide how it is fitted (measured in
``bench/results/accuracy-beyond-gru4rec.md``):

* **Held out, not in sample.** Trained jointly with the network, or fitted on sessions it was
  trained on, the offsets come out near zero: GRU4Rec memorises the training sessions' item
  transitions (Recall@20 0.84 on its own training sessions against 0.66 on the next ones), so
  there the session's own items add nothing. On new sessions the transitions are weaker and
  the session's items are the best evidence there is. The head is therefore fitted on a
  random share of the training sessions held out of the first ``n_epochs - 1`` epochs; the last
  epoch trains on every session, in the usual order.
* **For the ranking, not the likelihood.** Fitted by full-softmax likelihood on held-out
  sessions, the offsets come out negative and lower MRR; the metric asks for the order of the
  top of the list. The head is fitted for a smooth reciprocal rank: the target's rank is
  ``1 + sum_j sigmoid((s_j - s_target) / tau)`` over the session's memory items and the
  ``top`` best other items, and the mean of its inverse is maximised (Adam, a few hundred
  full-batch steps over the held-out predictions; L2 on the gate weights).

Any model with a session memory can be fitted: :class:`MemoryHeadModel` is what the fit needs.
:func:`collect` runs session-only models (GRU4Rec: ``advance``) over held-out sessions; models
whose sessions start from a user state collect their predictions themselves
(``trainer.hier.memory``) and hand them to :class:`HeadCollector`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from streamrec.model.session_memory import SessionMemory
from trainer.batching import SessionArrays

#: defaults of the fit (the same for every data set; chosen on validation splits, see the module
#: docstring's results file)
HOLDOUT = 0.1
TAU = 0.25
STEPS = 300
LEARNING_RATE = 0.05
L2 = 1e-3
TOP = 100
MAX_EVENTS = 100_000
CHUNK = 512


def split_holdout(
    sessions: SessionArrays, fraction: float, seed: int
) -> tuple[SessionArrays, SessionArrays]:
    """``(kept, held_out)``: each session is held out with probability ``fraction`` (seeded);
    both keep the training order."""
    n = len(sessions.offsets) - 1
    held = np.random.default_rng(seed).random(n) < fraction
    return _subset(sessions, np.flatnonzero(~held)), _subset(sessions, np.flatnonzero(held))


def _subset(s: SessionArrays, idx: np.ndarray) -> SessionArrays:
    lengths = np.diff(s.offsets)[idx]
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    # positions of the kept events, session by session
    starts = np.repeat(s.offsets[idx], lengths)
    within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], lengths)
    return SessionArrays(s.items[starts + within], offsets, s.session_ids[idx])


class MemoryHeadModel(Protocol):
    """What the fit needs of a model (GRU4Rec, HRNN, p-RNN with a session memory)."""

    def session_memory(self) -> SessionMemory | None:
        """The rule over the model's offsets (None: no session memory)."""
        ...

    def memory_head_inputs(
        self, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """For states after a step: the gate's input ``[B, H]``, the memory's item rows
        ``[B, K]`` (-1 empty) and the scores of every item ``[B, n]`` before the memory's
        offsets and the final activation (everything else the model adds included)."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class SessionModel(MemoryHeadModel, Protocol):
    """A session-only model :func:`collect` can run (GRU4Rec)."""

    def initial_state(self, user_state: Tensor | None, batch_size: int) -> Tensor: ...
    def advance(self, item_rows: Tensor, state: Tensor) -> Tensor: ...


def memory_rule(model: MemoryHeadModel) -> SessionMemory:
    """The model's session memory; ``ValueError`` when it has none."""
    memory = model.session_memory()
    if memory is None:
        raise ValueError("the model has no session memory (session_memory=0)")
    return memory


@dataclass
class HeadData:
    """One row per held-out prediction (everything the offsets act on)."""

    output: Tensor  # [N, H] the last layer's output
    memory_scores: Tensor  # [N, K] raw scores of the memory items (0 in empty slots)
    filled: Tensor  # [N, K] bool: the slot holds an item
    target_slot: Tensor  # [N] the memory slot of the target, -1 if it is not remembered
    target_score: Tensor  # [N] the target's raw score
    top_other: Tensor  # [N, top] the best raw scores of the items outside the memory

    def __len__(self) -> int:
        return int(self.output.shape[0])


@dataclass
class HeadCollector:
    """Accumulates held-out predictions into :class:`HeadData`, step by step."""

    top: int = TOP
    n: int = 0
    parts: list[list[Tensor]] = field(default_factory=lambda: [[] for _ in range(6)])

    @torch.no_grad()
    def add(self, output: Tensor, rows: Tensor, raw: Tensor, targets: Tensor) -> None:
        """One step's predictions: ``memory_head_inputs``' three parts and the next items
        ``[B]`` (every row a prediction)."""
        filled = rows >= 0
        mem_scores = raw.gather(1, rows.clamp(min=0)) * filled
        hit = (rows == targets.unsqueeze(1)) & filled
        minus_one = torch.full_like(targets, -1)
        slot = torch.where(hit.any(1), hit.to(torch.uint8).argmax(1), minus_one)
        others = raw.scatter(1, rows.clamp(min=0), torch.where(filled, -torch.inf, mem_scores))
        k = min(self.top, others.shape[1])
        target_score = raw.gather(1, targets.unsqueeze(1)).squeeze(1)
        top_other = torch.topk(others, k, dim=1).values
        values = (output, mem_scores, filled, slot, target_score, top_other)
        for part, v in zip(self.parts, values, strict=True):
            part.append(v)
        self.n += int(targets.shape[0])

    def data(self) -> HeadData:
        if self.n == 0:
            raise ValueError("no held-out session with 2 or more events to fit the memory head on")
        return HeadData(*(torch.cat(p) for p in self.parts))


@torch.no_grad()
def collect(
    model: SessionModel, sessions: SessionArrays, top: int = TOP, max_events: int = MAX_EVENTS
) -> HeadData:
    """Run ``model`` over ``sessions`` (each from its initial state) and keep, for every next
    item to predict, what :func:`fit_head` needs. Raw scores: the offsets act before the final
    activation. At most about ``max_events`` predictions (whole chunks of sessions)."""
    dev = memory_rule(model).bias.device
    lengths = np.diff(sessions.offsets)
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] >= 2]
    acc = HeadCollector(top)
    for c0 in range(0, len(order), CHUNK):
        if acc.n >= max_events:
            break
        chunk = order[c0 : c0 + CHUNK]
        lens = lengths[chunk]
        starts = sessions.offsets[chunk]
        state = model.initial_state(None, len(chunk))
        for t in range(int(lens.max()) - 1):
            live = int((lens > t + 1).sum())  # longest first: the live sessions are a prefix
            state = state[:live]
            x = torch.from_numpy(sessions.items[starts[:live] + t]).to(dev)
            y = torch.from_numpy(sessions.items[starts[:live] + t + 1]).to(dev)
            state = model.advance(x, state)
            acc.add(*model.memory_head_inputs(state), y)
    return acc.data()


def smooth_reciprocal_rank(model: MemoryHeadModel, data: HeadData, tau: float) -> Tensor:
    """Mean of ``1 / (1 + sum_j sigmoid((s_j - s_target) / tau))`` under the current offsets."""
    offsets = memory_rule(model).slot_offsets(data.output, data.filled)
    remembered = data.target_slot >= 0
    own = offsets.gather(1, data.target_slot.clamp(min=0).unsqueeze(1)).squeeze(1)
    target = data.target_score + torch.where(remembered, own, torch.zeros_like(own))
    memory = torch.where(data.filled, data.memory_scores + offsets, torch.full_like(offsets, -1e4))
    diff = torch.cat([data.top_other, memory], dim=1) - target.unsqueeze(1)
    # the target is among the columns once (sigmoid(0) = 0.5): a best possible rank of 1
    rank = 0.5 + torch.sigmoid(diff / tau).sum(dim=1)
    return (1.0 / rank).mean()


@dataclass
class HeadFit:
    events: int
    seconds: float
    reciprocal_rank_before: float  # smooth, on the held-out predictions
    reciprocal_rank_after: float


def fit_head(
    model: MemoryHeadModel,
    data: HeadData,
    *,
    tau: float = TAU,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
    l2: float = L2,
) -> HeadFit:
    """Set the model's memory offsets to maximise the smooth reciprocal rank on ``data``
    (full batch, Adam, from zero); the rest of the model is not changed."""
    t0 = time.perf_counter()
    memory = memory_rule(model)
    params = memory.parameters()
    fitted = {id(p) for p in params}
    others = [p for p in model.parameters() if id(p) not in fitted]
    frozen = [p.requires_grad for p in others]
    for p in others:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            for q in params:
                q.zero_()
            before = float(smooth_reciprocal_rank(model, data, tau))
        opt = torch.optim.Adam(params, lr=learning_rate)
        for _ in range(steps):
            loss = -smooth_reciprocal_rank(model, data, tau)
            penalty = memory.penalty()
            if penalty is not None:
                loss = loss + l2 * penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = float(smooth_reciprocal_rank(model, data, tau))
    finally:
        for p, was in zip(others, frozen, strict=True):
            p.requires_grad_(was)
        for q in params:
            q.grad = None
    return HeadFit(len(data), time.perf_counter() - t0, before, after)
