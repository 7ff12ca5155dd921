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


def segment_sum_sorted(
    rows: Tensor, grads: Tensor, n_rows: int, scan: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum the gradients of equal rows, with fixed output size ``K = len(rows)``.

    Returns ``(param_rows, state_rows, summed)``: slot ``k`` either holds the total gradient of
    row ``param_rows[k]`` (``state_rows[k] == param_rows[k]``) or is a filler slot with a zero
    gradient whose ``state_rows[k]`` is the spare row ``n_rows``.  Each real row occurs in exactly
    one non-filler slot.  ``scan`` (default: on CUDA) picks the atomics-free prefix-sum method.
    """
    k = rows.shape[0]
    srt, perm = torch.sort(rows, stable=True)
    g = grads.index_select(0, perm)
    change = srt[1:] != srt[:-1]
    true1 = torch.ones(1, dtype=torch.bool, device=rows.device)
    spare = torch.full_like(srt, n_rows)
    if g.is_cuda if scan is None else scan:
        # Deterministic on CUDA (no atomics): float64 running sums, differenced per run; the
        # sum of a run lands on its last slot.
        is_first = torch.cat([true1, change])
        is_last = torch.cat([change, true1])
        pos = torch.arange(k, device=rows.device)
        start = torch.cummax(torch.where(is_first, pos, 0), 0).values
        c = torch.cumsum(g.double(), 0)
        c0 = torch.cat([torch.zeros_like(c[:1]), c])
        summed = (c - c0.index_select(0, start)).to(g.dtype) * is_last.unsqueeze(1).to(g.dtype)
        return srt, torch.where(is_last, srt, spare), summed
    # CPU: index_add_ runs sequentially (deterministic); run r's sum lands on slot r.
    group = torch.cumsum(torch.cat([true1, change]).long(), 0) - 1
    summed = torch.zeros_like(g).index_add_(0, group, g)
    # every member of a run writes the same row id, so duplicate writes agree
    state_rows = spare.scatter(0, group, srt)
    param_rows = torch.where(state_rows < n_rows, state_rows, 0)
    return param_rows, state_rows, summed


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
        # keyed by the parameters themselves (tensors hash by identity)
        self.acc: dict[Tensor, Tensor] = {p: torch.zeros_like(p) for p in self.dense}
        self.mom: dict[Tensor, Tensor] = (
            {p: torch.zeros_like(p) for p in self.dense} if momentum > 0 else {}
        )
        # one spare row at the end takes the writes of duplicate rows
        for p in self.sparse:
            self.acc[p] = torch.zeros(p.shape[0] + 1, *p.shape[1:], device=p.device, dtype=p.dtype)
            if momentum > 0:
                self.mom[p] = torch.zeros_like(self.acc[p])

    def export_state(self, names: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """The accumulators (and momenta) by parameter name, ``acc.<name>`` / ``mom.<name>``,
        on the CPU; a sparse table's spare row is left out."""
        out: dict[str, Tensor] = {}
        for name, p in names.items():
            for kind, state in (("acc", self.acc), ("mom", self.mom)):
                if p in state:
                    out[f"{kind}.{name}"] = state[p][: p.shape[0]].detach().to("cpu").clone()
        return out

    @torch.no_grad()
    def import_state(self, names: dict[str, nn.Parameter], state: dict[str, Tensor]) -> int:
        """Continue from :meth:`export_state` of a model with fewer (or as many) item rows:
        an item table's old rows take their saved state, new rows start at zero (a fresh row).
        Entries that do not fit (another architecture) are refused. Returns tensors loaded."""
        loaded = 0
        for name, p in names.items():
            for kind, mine in (("acc", self.acc), ("mom", self.mom)):
                saved = state.get(f"{kind}.{name}")
                if saved is None or p not in mine:
                    continue
                cur = mine[p]
                n = saved.shape[0]
                if saved.shape[1:] != p.shape[1:] or n > p.shape[0]:
                    raise ValueError(
                        f"optimiser state {kind}.{name}: {tuple(saved.shape)} does not fit "
                        f"{tuple(p.shape)}"
                    )
                cur[:n].copy_(saved.to(cur.device, cur.dtype))
                loaded += 1
        return loaded

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
        ps: list[Tensor] = []
        gs: list[Tensor] = []
        for p in self.dense:
            if p.grad is not None:
                ps.append(p)
                gs.append(p.grad)
        if not ps:
            return
        accs = [self.acc[p] for p in ps]
        torch._foreach_addcmul_(accs, gs, gs)
        denom = torch._foreach_add(accs, self.eps)
        torch._foreach_sqrt_(denom)
        if self.momentum > 0:
            moms = [self.mom[p] for p in ps]
            torch._foreach_mul_(moms, self.momentum)
            torch._foreach_addcdiv_(moms, gs, denom, -self.lr)
            if self.nesterov:
                torch._foreach_addcdiv_(ps, gs, denom, -self.lr)
                torch._foreach_add_(ps, moms, alpha=self.momentum)
            else:
                torch._foreach_add_(ps, moms)
        else:
            torch._foreach_addcdiv_(ps, gs, denom, -self.lr)

    def _sparse_step(self, p: nn.Parameter, rows: Tensor, grad: Tensor) -> None:
        grad = grad.reshape(rows.shape[0], *p.shape[1:])
        param_rows, state_rows, g = segment_sum_sorted(rows, grad, p.shape[0])
        acc = self.acc[p]
        acc_rows = acc.index_select(0, state_rows).addcmul_(g, g)
        acc.index_copy_(0, state_rows, acc_rows)  # filler slots only write the spare row
        step = g / (acc_rows + self.eps).sqrt_() * -self.lr  # zero in filler slots
        if self.momentum > 0:
            mom = self.mom[p]
            mom_rows = mom.index_select(0, state_rows).mul_(self.momentum).add_(step)
            mom.index_copy_(0, state_rows, mom_rows)
            step = step + self.momentum * mom_rows if self.nesterov else mom_rows
            step = step * (state_rows < p.shape[0]).unsqueeze(1).to(step.dtype)
        # filler slots add exact zeros: order-independent, hence deterministic
        p.index_add_(0, param_rows, step)
