"""The quality gate: may a candidate model replace a reference? One rule, two gates.

- ``trainer retrain``: the candidate's figure (Recall@20 by default) against the published
  model's on the same holdout predictions, at the tolerance and confidence of the cycle
  (``--tolerance``, ``--gate-z``), never at or below chance, and not deciding on fewer than
  ``--min-holdout-events`` predictions.
- A worker, before it swaps a checkpoint in (``ServingModel.validate``): the checkpoint's
  Recall@20 on its own held-out slice (``data_stats[HOLDOUT_KEY]``) against the figure the
  trainer recorded for it (``metrics[HOLDOUT_METRIC]``), at the tolerance ``1 - model.gate_ratio``.
  Both figures come from :func:`holdout_recall`, so they differ only by the device.

The candidate passes when the one-sided lower confidence bound of ``candidate - reference`` (at
``z`` standard errors) is at least ``-tolerance * reference``: the data must show it is not
worse beyond the tolerance. ``z = 0`` compares the point estimates (``candidate >= (1 -
tolerance) * reference``). The standard error is that of two independent proportions,
``sqrt((c(1-c) + r(1-r)) / n)``: two models scored on the same events have positively
correlated hits, so the paired error is smaller and this one errs toward keeping the reference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from streamrec.model.api import StepModel

#: the checkpoint metric a worker's gate compares against: the trainer's Recall@20 on the
#: checkpoint's own held-out slice
HOLDOUT_METRIC = "holdout_recall@20"
#: where a checkpoint keeps that slice: ``data_stats[HOLDOUT_KEY]`` (lists of item ids)
HOLDOUT_KEY = "holdout_sessions"
#: default share of that metric a new model must reach on the slice to be swapped in
GATE_RATIO = 0.8

#: figures equal up to float rounding are equal: ``(c - r) >= -t * r`` and ``c >= (1 - t) * r``
#: round differently, and either misjudged candidates exactly at the boundary (e.g. 4 hits
#: against 5 at a ratio of 0.8). Far below the difference of two figures measured on fewer
#: than 10^12 predictions, far above the rounding of numbers of size 1 (~1e-16).
FLOAT_SLACK = 1e-12


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str | None = None  # why not; None when passed
    lower: float | None = None  # lower bound of candidate - reference (when compared)
    margin: float | None = None  # the least that bound may be: -tolerance * reference


def gate(
    candidate: float,
    reference: float | None = None,
    *,
    tolerance: float = 0.0,
    n: int | None = None,
    z: float = 0.0,
    chance: float | None = None,
    min_n: int = 0,
    name: str = "candidate",
    against: str = "reference",
) -> GateDecision:
    """Judge ``candidate``, in this order: a number; above ``chance`` (when given); with no
    ``reference``, that is all; ``n`` (the predictions both figures come from) at least
    ``min_n``, else not decided (a refusal); then the comparison of the module docstring.
    ``name`` and ``against`` name the two figures in the reason."""
    if not math.isfinite(candidate):
        return GateDecision(False, f"{name} is not a number")
    if chance is not None and candidate <= chance:
        return GateDecision(
            False, f"{name} {candidate:.4f} is no better than chance ({chance:.4f})"
        )
    if reference is None:
        return GateDecision(True)
    if n is not None and n < min_n:
        return GateDecision(
            False, f"{n} predictions, fewer than {min_n}: too few to compare, not deciding"
        )
    if z and n is None:
        raise ValueError("a gate at a confidence (z > 0) needs the number of predictions n")
    se = math.sqrt(
        max(candidate * (1 - candidate) + reference * (1 - reference), 0.0) / max(n or 1, 1)
    )
    lower = (candidate - reference) - z * se
    margin = -tolerance * reference
    if lower >= margin - FLOAT_SLACK:
        return GateDecision(True, None, lower, margin)
    on = f" on {n} predictions" if n is not None else ""
    return GateDecision(
        False,
        f"{name} {candidate:.4f} vs {against} {reference:.4f}{on}: not shown within the "
        f"tolerance {tolerance:.0%} (lower bound of the difference {lower:+.4f} < {margin:+.4f})",
        lower,
        margin,
    )


@torch.inference_mode()
def holdout_recall(
    model: StepModel,
    item_index: Mapping[str, int],
    sessions: Sequence[Sequence[str]],
    device: torch.device,
    k: int = 20,
) -> float:
    """Recall@k of next-item prediction on a held-out slice (lists of item ids), each session
    stepped from the initial state through the step API (the model in eval mode, on
    ``device``): the trainer's figure (``metrics[HOLDOUT_METRIC]``) and a worker's. Items
    outside ``item_index`` are unknown inputs and never hits. NaN when no session has two
    events."""
    k = min(k, model.n_items)
    hits = n = 0
    for sess in sessions:
        if len(sess) < 2:
            continue
        user = model.initial_user_state(1)
        state = model.initial_state(user, 1)
        for cur, nxt in itertools.pairwise(sess):
            rows = torch.tensor([item_index.get(cur, -1)], dtype=torch.long, device=device)
            state, scores = model.step(rows, state, user)
            top = torch.topk(scores, k, dim=1).indices[0].tolist()
            hits += int(item_index.get(nxt, -1) in top)
            n += 1
    return hits / n if n else math.nan
