"""GRU4Rec losses over a [B, B + n_sample] score matrix whose diagonal holds the positives.

Columns ``0..B-1`` are the targets of the mini-batch (each a negative for the other rows),
columns ``B..`` the extra popularity-sampled negatives.  Every loss returns the *sum* over the
valid rows (the trainer divides by the batch size, as the official code does).  Definitions
follow the official implementations (Theano GRU4Rec for TOP1/BPR/TOP1-max, the PyTorch one for
BPR-max and cross-entropy) and Hidasi & Karatzoglou, CIKM 2018:

* TOP1:      mean_j [σ(r_j - r_i) + σ(r_j²)] - σ(r_i²)/N   (mean over all N columns)
* BPR:       mean_j -log σ(r_i - r_j)                      (mean over all N columns)
* TOP1-max:  Σ_j s_j [σ(r_j - r_i) + σ(r_j²)]
* BPR-max:   -log Σ_j s_j σ(r_i - r_j) + bpreg Σ_j s_j r_j²
* XE:        -log softmax(r - logq·log p)_i, with p = the target's count for in-batch columns
             and count^alpha for sampled ones (logQ correction of the sampling distribution)

where s = softmax over the negatives only (the positive's own column excluded; all zeros
for a row that has no negative, instead of the NaN of 0/0).

``valid`` (bool [B], optional) marks slots that hold a session; an empty slot's row adds nothing
and its column is not a negative for anyone (the official code shrinks the batch instead; a
fixed shape keeps the step free of host syncs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LOSSES = ("top1", "bpr", "top1-max", "bpr-max", "cross-entropy")
_EPS = 1e-24
_TINY = 1e-30


def _neg_weights(scores: Tensor, valid: Tensor | None) -> Tensor:
    """1 for (row, negative column) pairs, 0 on the diagonal and for empty slots' columns."""
    b = scores.shape[0]
    w = torch.ones_like(scores)
    w[:, :b].fill_diagonal_(0.0)
    if valid is not None:
        w[:, :b] = w[:, :b] * valid.to(scores.dtype).unsqueeze(0)
    return w


def _row_sum(per_row: Tensor, valid: Tensor | None) -> Tensor:
    if valid is not None:
        # select, not multiply: an empty slot's row must add exactly 0 (0 * NaN is NaN)
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum()


def _with_negatives(w: Tensor, valid: Tensor | None) -> Tensor:
    """Rows that have at least one negative (a max-loss is undefined without one)."""
    has = w.sum(dim=1) > 0
    return has if valid is None else has & valid


def _softmax_neg(scores: Tensor, w: Tensor) -> Tensor:
    """Softmax over the negatives of each row (weights ``w`` select them).

    A row with no negative at all (one live slot and no extra samples, which user-parallel
    batches produce at the end of the data) gets all-zero weights instead of 0/0 = NaN, so its
    loss is the positive-only term and no NaN reaches the parameters.
    """
    x = scores.masked_fill(w == 0, float("-inf"))
    m = x.max(dim=1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)  # exactly 0 where w == 0
    return e / e.sum(dim=1, keepdim=True).clamp_min(_TINY)


def top1(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    diag = scores.diagonal().unsqueeze(1)
    w = _neg_weights(scores, valid)
    n = w.sum(dim=1) + 1.0  # columns incl. the positive
    terms = torch.sigmoid(scores - diag) + torch.sigmoid(scores**2)
    # the positive's own column contributes σ(0) = 0.5 (its σ(r_i²) is removed), as the
    # official mean-minus-correction form does
    per_row = ((terms * w).sum(dim=1) + 0.5) / n
    return _row_sum(per_row, valid)


def bpr(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    diag = scores.diagonal().unsqueeze(1)
    w = _neg_weights(scores, valid)
    w = w + torch.eye(*scores.shape, dtype=scores.dtype, device=scores.device)
    n = w.sum(dim=1)
    per_row = (-torch.nn.functional.logsigmoid(diag - scores) * w).sum(dim=1) / n
    return _row_sum(per_row, valid)


def top1_max(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    diag = scores.diagonal().unsqueeze(1)
    w = _neg_weights(scores, valid)
    s = _softmax_neg(scores, w)
    per_row = (s * (torch.sigmoid(scores - diag) + torch.sigmoid(scores**2))).sum(dim=1)
    return _row_sum(per_row, _with_negatives(w, valid))


def bpr_max(scores: Tensor, valid: Tensor | None = None, bpreg: float = 1.0) -> Tensor:
    diag = scores.diagonal().unsqueeze(1)
    w = _neg_weights(scores, valid)
    s = _softmax_neg(scores, w)
    per_row = -torch.log((torch.sigmoid(diag - scores) * s).sum(dim=1) + _EPS)
    per_row = per_row + bpreg * (scores**2 * s).sum(dim=1)
    return _row_sum(per_row, _with_negatives(w, valid))


def cross_entropy(
    scores: Tensor, valid: Tensor | None = None, log_correction: Tensor | None = None
) -> Tensor:
    """Softmax cross-entropy; ``log_correction`` [N] is subtracted from every row (logQ)."""
    if log_correction is not None:
        scores = scores - log_correction.unsqueeze(0)
    if valid is not None:
        b = scores.shape[0]
        # empty slots' columns are no negatives: push them to -inf-like (finite, no NaN)
        pad = torch.zeros_like(scores[0])
        pad[:b] = (~valid).to(scores.dtype) * -1e9
        scores = scores + pad.unsqueeze(0)
    logp = torch.log_softmax(scores, dim=1).diagonal()
    return _row_sum(-logp, valid)


def logq_correction(
    item_counts: Tensor, out_rows: Tensor, batch_size: int, sample_alpha: float, logq: float
) -> Tensor:
    """The official logQ term: log count for in-batch targets, log count^alpha for samples.

    A count is floored at 1: a warm start keeps rows of items that have no event in the new
    window, and such a row in a padded slot would otherwise add log 0 = -inf (NaN weights)."""
    p = item_counts.index_select(0, out_rows).clamp_min(1.0)
    p = torch.cat([p[:batch_size], p[batch_size:] ** sample_alpha])
    return logq * torch.log(p)


def get_loss(name: str, bpreg: float = 1.0) -> Callable[..., Tensor]:
    """Loss function by its official name."""
    if name == "top1":
        return top1
    if name == "bpr":
        return bpr
    if name == "top1-max":
        return top1_max
    if name == "bpr-max":
        return lambda scores, valid=None: bpr_max(scores, valid, bpreg)
    if name in ("cross-entropy", "xe"):
        return cross_entropy
    raise ValueError(f"unknown loss {name!r} (one of {', '.join(LOSSES)})")
