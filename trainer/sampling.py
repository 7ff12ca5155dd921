"""Negative samples drawn with probability proportional to popularity^alpha, in bulk on device."""

from __future__ import annotations

import torch
from torch import Tensor


class SampleBuffer:
    """A device-resident buffer of ``n_batches`` rows of ``n_sample`` item rows each.

    Rows are handed out in order; the whole buffer is refilled with one ``rand`` +
    ``searchsorted`` when exhausted (a host-side counter: no device sync).  Like the official
    ``SampleCache`` the buffer is sized from ``max_size`` total samples.
    """

    def __init__(
        self,
        item_counts: Tensor,
        n_sample: int,
        alpha: float,
        device: torch.device | str,
        seed: int = 0,
        max_size: int = 10_000_000,
    ) -> None:
        self.device = torch.device(device)
        self.n_sample = int(n_sample)
        self.n_batches = max(1, max_size // self.n_sample) if self.n_sample > 0 else 0
        p = item_counts.to(device=self.device, dtype=torch.float64) ** alpha
        cdf = torch.cumsum(p, 0)
        cdf = cdf / cdf[-1]
        self.cdf = cdf.to(torch.float32)
        self.cdf[-1] = 1.0
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.pointer = self.n_batches
        self.buffer: Tensor | None = None

    def refill(self) -> None:
        u = torch.rand(self.n_batches, self.n_sample, generator=self.gen, device=self.device)
        # first index whose cdf exceeds u (the official binary search: cdf <= u moves right)
        idx = torch.searchsorted(self.cdf, u, right=True)
        self.buffer = idx.clamp_(max=self.cdf.shape[0] - 1)
        self.pointer = 0

    def get(self) -> Tensor:
        """The next ``[n_sample]`` LongTensor of item rows."""
        if self.pointer >= self.n_batches:
            self.refill()
        assert self.buffer is not None
        out = self.buffer[self.pointer]
        self.pointer += 1
        return out
