"""Adagrad with optional momentum and row-sparse updates, as the official ``IndexedAdagradM``.

Update (per touched row for item matrices, everywhere for dense parameters)::

    acc += g²;   d = -lr · g / sqrt(acc + eps)
    momentum 0:  p += d
    momentum m:  v = m·v + d;  p += v          (Nesterov: p += m·v + d)

Sparse gradients arrive as ``(table, rows, grad_rows)`` with repeated rows allowed; since the
update is non-linear they are first summed per unique row.  Everything is fixed-shape and
sync-free: duplicates are summed in a sorted order (deterministic, also on CUDA), and the state
writes of non-final duplicates go to a spare row of the optimiser state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def segment_sum_sorted(rows: Tensor, grads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort ``rows`` and sum the gradients of equal rows.

    Returns ``(sorted_rows, is_last, summed)``: ``summed[k]`` holds the total gradient of row
    ``sorted_rows[k]`` where ``is_last[k]`` (the last of its run), zeros elsewhere.
    """
    k = rows.shape[0]
    srt, perm = torch.sort(rows, stable=True)
    g = grads.index_select(0, perm)
    change = srt[1:] != srt[:-1]
    true1 = torch.ones(1, dtype=torch.bool, device=rows.device)
    is_last = torch.cat([change, true1])
    if g.is_cuda:
        # Deterministic on CUDA (no atomics): float64 running sums, differenced per run.
        is_first = torch.cat([true1, change])
        pos = torch.arange(k, device=rows.device)
        start = torch.cummax(torch.where(is_first, pos, 0), 0).values
        c = torch.cumsum(g.double(), 0)
        c0 = torch.cat([torch.zeros_like(c[:1]), c])
        seg = (c - c0.index_select(0, start)).to(g.dtype)
    else:
        # CPU index_add_ is sequential, hence deterministic; sums land on each run's last slot.
        group = torch.cumsum(torch.cat([true1, change]).long(), 0) - 1
        last_pos = torch.zeros(k, dtype=torch.long).index_copy_(
            0, group.masked_select(is_last), torch.arange(k).masked_select(is_last)
        )
        seg = torch.zeros_like(g).index_add_(0, last_pos.index_select(0, group), g)
    summed = seg * is_last.unsqueeze(1).to(seg.dtype)
    return srt, is_last, summed


class IndexedAdagradM:
    """Adagrad(+momentum) for dense parameters (``.grad``) and row-sparse item tables."""

    def __init__(
        self,
        dense: Iterable[nn.Parameter],
        sparse: Iterable[nn.Parameter],
        lr: float = 0.05,
        momentum: float = 0.0,
        eps: float = 1e-6,
        nesterov: bool = False,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"learning_rate must be > 0, got {lr}")
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        self.lr, self.momentum, self.eps, self.nesterov = float(lr), float(momentum), eps, nesterov
        self.dense = list(dense)
        self.sparse = list(sparse)
        self.acc = {p: torch.zeros_like(p) for p in self.dense}
        self.mom = {p: torch.zeros_like(p) for p in self.dense} if momentum > 0 else {}
        # one spare row at the end takes the writes of duplicate rows
        for p in self.sparse:
            self.acc[p] = torch.zeros(p.shape[0] + 1, *p.shape[1:], device=p.device, dtype=p.dtype)
            if momentum > 0:
                self.mom[p] = torch.zeros_like(self.acc[p])

    @torch.no_grad()
    def step(self, sparse_grads: Sequence[tuple[nn.Parameter, Tensor, Tensor]] = ()) -> None:
        self._dense_step()
        by_table: dict[nn.Parameter, list[tuple[Tensor, Tensor]]] = {}
        for table, rows, grad in sparse_grads:
            by_table.setdefault(table, []).append((rows, grad))
        for table, parts in by_table.items():
            if len(parts) == 1:
                rows, grad = parts[0]
            else:
                rows = torch.cat([r for r, _ in parts])
                grad = torch.cat([g for _, g in parts])
            self._sparse_step(table, rows, grad)

    def _dense_step(self) -> None:
        ps = [p for p in self.dense if p.grad is not None]
        if not ps:
            return
        gs = [p.grad for p in ps]
        accs = [self.acc[p] for p in ps]
        torch._foreach_addcmul_(accs, gs, gs)
        denom = torch._foreach_add(accs, self.eps)
        torch._foreach_sqrt_(denom)
        upd = torch._foreach_div(gs, denom)
        torch._foreach_mul_(upd, -self.lr)
        if self.momentum > 0:
            moms = [self.mom[p] for p in ps]
            torch._foreach_mul_(moms, self.momentum)
            torch._foreach_add_(moms, upd)
            if self.nesterov:
                torch._foreach_add_(upd, moms, alpha=self.momentum)
                torch._foreach_add_(ps, upd)
            else:
                torch._foreach_add_(ps, moms)
        else:
            torch._foreach_add_(ps, upd)

    def _sparse_step(self, p: nn.Parameter, rows: Tensor, grad: Tensor) -> None:
        grad = grad.reshape(rows.shape[0], *p.shape[1:])
        srt, is_last, g = segment_sum_sorted(rows, grad)
        spare = torch.full_like(srt, p.shape[0])
        state_rows = torch.where(is_last, srt, spare)
        acc = self.acc[p]
        acc_rows = acc.index_select(0, srt).addcmul_(g, g)
        acc.index_copy_(0, state_rows, acc_rows)
        step = g / (acc_rows + self.eps).sqrt_() * -self.lr  # zero on non-last rows
        if self.momentum > 0:
            mom = self.mom[p]
            mom_rows = mom.index_select(0, srt).mul_(self.momentum).add_(step)
            mom.index_copy_(0, state_rows, mom_rows)
            step = step + self.momentum * mom_rows if self.nesterov else mom_rows
            step = step * is_last.unsqueeze(1).to(step.dtype)
        # non-last rows add exact zeros: order-independent, hence deterministic
        p.index_add_(0, srt, step)

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"acc{i}": t for i, t in enumerate(self.acc.values())}
