"""Next-item ranking metrics: ranks with tie handling, Recall@k and MRR@k.

Tie modes follow the official GRU4Rec evaluation (hidasib/GRU4Rec_PyTorch_Official, evaluation.py):

- ``standard``: 1 + number of items scored strictly higher than the target (optimistic on ties);
- ``conservative``: number of items scored higher than or equal to the target, the target itself
  included (pessimistic on ties; the default there and here);
- ``median``: standard + (number of *other* items tied with the target) / 2, i.e. the mean of the
  two above.

Everything stays on the scores' device; nothing is copied to the host until ``result()``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

TIE_MODES = ("standard", "conservative", "median")


def ranks(scores: torch.Tensor, targets: torch.Tensor, ties: str = "conservative") -> torch.Tensor:
    """1-based rank of ``targets[i]`` among all items of ``scores[i]`` (float tensor ``[B]``).

    A NaN target score gets the worst rank (``n_items``): a broken model must not score well.
    """
    if ties not in TIE_MODES:
        raise ValueError(f"unknown tie mode {ties!r}; expected one of {TIE_MODES}")
    if scores.dim() != 2 or targets.dim() != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"scores must be [B, n_items] and targets [B]; got {tuple(scores.shape)} "
            f"and {tuple(targets.shape)}"
        )
    targets = targets.to(device=scores.device, dtype=torch.long)
    target_scores = scores.gather(1, targets.unsqueeze(1))
    # one full pass over the scores per comparison: only make the ones the mode needs
    if ties == "standard":
        r = ((scores > target_scores).sum(dim=1) + 1).to(torch.float32)
    elif ties == "conservative":
        r = (scores >= target_scores).sum(dim=1).to(torch.float32)
    else:  # median: (higher + 1 + at_least) / 2 == higher + 1 + (tied others) / 2
        higher = (scores > target_scores).sum(dim=1)
        at_least = (scores >= target_scores).sum(dim=1)
        r = (higher + 1 + at_least).to(torch.float32) / 2
    return torch.where(torch.isnan(target_scores.squeeze(1)), float(scores.shape[1]), r)


class MetricAccumulator:
    """Accumulates Recall@k and MRR@k (1/rank if rank <= k, else 0) for several cut-offs k."""

    def __init__(self, ks: Iterable[int] = (1, 5, 10, 20)) -> None:
        self.ks = tuple(sorted({int(k) for k in ks}))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"cut-offs must be positive integers, got {ks!r}")
        self._hits: torch.Tensor | None = None
        self._rr: torch.Tensor | None = None
        self._n: torch.Tensor | None = None
        self._k: torch.Tensor | None = None

    def _init(self, device: torch.device) -> None:
        # float64 sums keep MRR exact enough over millions of events; MPS has no float64
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._hits = torch.zeros(len(self.ks), dtype=dtype, device=device)
        self._rr = torch.zeros(len(self.ks), dtype=dtype, device=device)
        self._n = torch.zeros((), dtype=dtype, device=device)
        self._k = torch.tensor(self.ks, dtype=dtype, device=device).unsqueeze(1)  # [K, 1]

    def add_ranks(self, r: torch.Tensor) -> None:
        """Add a batch of 1-based ranks (``[B]``, any device)."""
        if self._hits is None:
            self._init(r.device)
        assert self._hits is not None and self._rr is not None and self._n is not None
        assert self._k is not None
        r = r.to(device=self._hits.device, dtype=self._hits.dtype)
        within = r.unsqueeze(0) <= self._k  # [K, B]
        self._hits += within.sum(dim=1).to(r.dtype)
        self._rr += torch.where(within, 1.0 / r.unsqueeze(0), 0.0).sum(dim=1)
        self._n += r.shape[0]

    def add(self, scores: torch.Tensor, targets: torch.Tensor, ties: str = "conservative") -> None:
        """Rank ``targets`` in ``scores`` and add the ranks."""
        self.add_ranks(ranks(scores, targets, ties))

    def result(self) -> dict[str, float]:
        """``{"recall@k": ..., "mrr@k": ..., "n_events": n}`` (zeros when nothing was added)."""
        out: dict[str, float] = {}
        if self._hits is None or self._rr is None or self._n is None:
            for k in self.ks:
                out[f"recall@{k}"] = 0.0
                out[f"mrr@{k}"] = 0.0
            out["n_events"] = 0
            return out
        hits = self._hits.cpu().tolist()
        rr = self._rr.cpu().tolist()
        n = float(self._n.cpu())
        for i, k in enumerate(self.ks):
            out[f"recall@{k}"] = hits[i] / n if n else 0.0
            out[f"mrr@{k}"] = rr[i] / n if n else 0.0
        out["n_events"] = int(n)
        return out
