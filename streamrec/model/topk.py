"""Exact top-k over a whole catalogue, cheaper than ``torch.topk`` over every score.

Two tools, both exact:

* :func:`blocked_topk`: the k best items lie in the k blocks (of 64 items) with the highest
  maxima, so one max per block and two small top-k's replace one top-k over every item.
* :func:`bf16_left_out_bound`: with scores computed in bfloat16 (several times faster matrix
  products where the CPU has bf16 dot products), take a shortlist, score it in float32 and
  keep the answer only where a rounding bound proves that no item outside the shortlist can
  be better than the k-th: the answer is then the float32 answer. Rows it cannot prove are
  returned for a float32 pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: catalogue size from which :func:`blocked_topk` splits the scores into blocks
BLOCK_TOPK_MIN_ITEMS = 4096
#: items per block
BLOCK = 64
#: a bound on |bf16 score - fp32 score| per unit of ``|query| * max |item vector|``: inputs
#: rounded to bf16 (2 x 2^-8 relative on each product), the bf16 output (2^-8), both
#: float32 accumulations (~100 x 2^-24 each): 0.0118 in all, rounded up to 2^-6
BF16_ERROR = 2.0**-6


def blocked_topk(scores: Tensor, k: int, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """``torch.topk(scores, k, dim=1)`` (values, indices), faster over many items on CPU.

    A block holding one of the k best items has a maximum at least the k-th best score, and at
    most k blocks can hold them, so the top-k of the k blocks with the highest maxima is the
    exact answer. Values are always torch.topk's; where items tie at the k-th score, which of
    them is returned may differ (as it may between torch versions).
    """
    b, n = scores.shape
    if scores.device.type != "cpu" or n < BLOCK_TOPK_MIN_ITEMS or k * block >= n or b == 0:
        return torch.topk(scores, k, dim=1)
    full = n - n % block
    blocks = scores[:, :full].view(b, -1, block)  # a view: the row stride stays n
    _, best = torch.topk(blocks.amax(dim=2), k, dim=1)
    cols = (best.unsqueeze(2) * block + torch.arange(block, device=scores.device)).view(b, -1)
    if full < n:  # the ragged tail (< one block) is always looked at
        tail = torch.arange(full, n, device=scores.device).expand(b, -1)
        cols = torch.cat([cols, tail], dim=1)
    values, pos = torch.topk(scores.gather(1, cols), k, dim=1)
    return values, cols.gather(1, pos)


def bf16_left_out_bound(shortlist_low: Tensor, query_norm: Tensor, max_item_norm: float) -> Tensor:
    """The highest float32 inner product an item left out of a bf16 shortlist can have.

    ``shortlist_low`` ``[B]``: the lowest bf16 score in each row's shortlist (an item left out
    scores at most that in bf16); its float32 score differs by at most
    ``BF16_ERROR * |q| * |v|``. Where the k-th best float32 score of the shortlist is at
    least this bound, the shortlist's top-k is the float32 top-k (up to exact ties).
    """
    return shortlist_low.float() + BF16_ERROR * query_norm * max_item_norm
