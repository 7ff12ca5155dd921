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

import threading
from collections.abc import Callable

import torch
from torch import Tensor

#: catalogue size from which :func:`blocked_topk` splits the scores into blocks
BLOCK_TOPK_MIN_ITEMS = 4096
#: items per block
BLOCK = 64
#: rows :class:`TiledTopK` scores at a time on CPU (a tile of their scores stays in cache)
ROWS_PER_PASS = 64
#: rows up to which :class:`TiledTopK` writes every tile first and then takes all block maxima
#: (and adds ``add``) over whole rows at once: a few rows of scores stay in cache, and a
#: dozen fewer tensor operations per call is a fifth of a one-row step
WHOLE_ROWS_MAX = 8
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


class TiledTopK:
    """Exact top-k of ``act(x @ weight_t + bias)`` over every item, on CPU, without a pass
    over a freshly allocated score matrix.

    The scores are written tile by tile (``tile`` items) into a buffer kept between calls
    (a new multi-megabyte tensor per call costs page faults), and each tile's block maxima are
    taken while the tile is still in cache; then :func:`blocked_topk`'s argument picks the k
    best blocks. Each score is the same ``addmm`` element as over all items at once, so the
    answer is the untiled one's. ``act`` must be increasing (it is applied to the k values).
    Buffers are per thread.
    """

    def __init__(
        self,
        weight_t: Tensor,
        bias: Tensor,
        act: Callable[[Tensor], Tensor] | None = None,
        *,
        tile: int = 2048,
        block: int = BLOCK,
    ) -> None:
        if tile % block:
            raise ValueError("tile must be a multiple of block")
        self.weight_t = weight_t  # [D, N], contiguous
        self.bias = bias.reshape(1, -1)  # [1, N]
        self.act = act
        self.tile = tile
        self.block = block
        self.n = weight_t.shape[1]
        #: tiles, and the last tile's width (for ``add``)
        self._n_tiles = -(-self.n // tile)
        self._last_width = self.n - (self._n_tiles - 1) * tile
        self._local = threading.local()

    def whole_rows(self, rows: int) -> bool:
        """Whether a call with ``rows`` rows takes whole score rows at once (a slot 0 in
        ``add`` is then as cheap as any other: a caller need not leave empty slots out)."""
        return rows <= WHOLE_ROWS_MAX

    def _buffers(self, rows: int) -> tuple[Tensor, Tensor]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None or bufs[0].shape[0] < rows:
            full = self.n - self.n % self.block
            scores = torch.empty(rows, self.n, dtype=self.weight_t.dtype)
            maxima = torch.empty(rows, full // self.block, dtype=self.weight_t.dtype)
            bufs = self._local.bufs = (scores, maxima)
        return bufs[0][:rows], bufs[1][:rows]

    def topk(
        self, x: Tensor, k: int, add: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(values, item rows) ``[B, k]`` for the rows of ``x`` ``[B, D]`` (on CPU, in passes of
        :data:`ROWS_PER_PASS` rows).

        ``add`` (``slots`` ``[B, M]``: item row + 1, 0 for none, as a session memory holds
        them; ``values`` ``[B, M]``): added to those items' scores before the top-k, as
        ``scores.scatter_add_(1, slots - 1, values)`` on the full score matrix (a session
        memory's offsets; a row's items distinct); a slot 0 adds nothing."""
        b, n, blk = x.shape[0], self.n, self.block
        if b > ROWS_PER_PASS and x.device.type == "cpu":  # the same passes as one call each
            parts = [
                self.topk(x[lo : lo + ROWS_PER_PASS], k,
                          None if add is None else (add[0][lo : lo + ROWS_PER_PASS],
                                                    add[1][lo : lo + ROWS_PER_PASS]))
                for lo in range(0, b, ROWS_PER_PASS)
            ]  # fmt: skip
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if b == 0 or n < BLOCK_TOPK_MIN_ITEMS or k * blk >= n or x.device.type != "cpu":
            return self._plain(x, k, add)
        x = x.to(self.weight_t.dtype)
        full = n - n % blk
        if self.whole_rows(b):
            scores, maxima = self._whole_rows(x, add)
        else:
            scores, maxima = self._buffers(b)
            per_tile = None if add is None else self._per_tile(add[0] - 1, add[1])
            for t, c0 in enumerate(range(0, n, self.tile)):
                c1 = min(n, c0 + self.tile)
                out = scores[:, c0:c1]
                torch.addmm(self.bias[:, c0:c1], x, self.weight_t[:, c0:c1], out=out)
                if per_tile is not None:  # while the tile is in cache, before its block maxima
                    local, last, tile_values = per_tile
                    out.scatter_add_(1, local if c1 - c0 == self.tile else last, tile_values[t])
                m1 = min(c1, full)
                if m1 > c0:
                    torch.amax(out[:, : m1 - c0].view(b, -1, blk), dim=2,
                               out=maxima[:, c0 // blk : m1 // blk])  # fmt: skip
        _, best = torch.topk(maxima, k, dim=1)
        cols = (best.unsqueeze(2) * blk + torch.arange(blk)).view(b, -1)
        if full < n:
            cols = torch.cat([cols, torch.arange(full, n).expand(b, -1)], dim=1)
        values, pos = torch.topk(scores.gather(1, cols), k, dim=1)
        rows = cols.gather(1, pos)
        return (values if self.act is None else self.act(values)), rows

    def _whole_rows(self, x: Tensor, add: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """The scores ``[b, n]`` and block maxima of a few rows (at most
        :data:`WHOLE_ROWS_MAX`): the same ``addmm`` per tile as the tiled pass, then ``add`` in
        one ``scatter_add_`` and the maxima of all blocks in one ``amax``. The scores are a view
        of a buffer whose column 0 is spare: a slot of ``add`` is the column (0 adds to it,
        and no top-k reads it); item columns start 64-byte aligned."""
        b, n, blk = x.shape[0], self.n, self.block
        bufs = getattr(self._local, "rows", None)
        if bufs is None:
            width = -(-(n + 16) // 16) * 16  # the spare column at 15, items from 16 on
            spare = torch.empty(WHOLE_ROWS_MAX, width, dtype=self.weight_t.dtype)[:, 15 : 16 + n]
            maxima = torch.empty(WHOLE_ROWS_MAX, n // blk, dtype=self.weight_t.dtype)
            bufs = self._local.rows = (spare, maxima)
        spare, maxima = bufs[0][:b], bufs[1][:b]
        scores = spare[:, 1:]
        for c0 in range(0, n, self.tile):
            c1 = min(n, c0 + self.tile)
            torch.addmm(self.bias[:, c0:c1], x, self.weight_t[:, c0:c1], out=scores[:, c0:c1])
        if add is not None:
            slots, values = add
            spare.scatter_add_(1, slots, values if values.dtype == spare.dtype
                               else values.to(spare.dtype))  # fmt: skip
        full = n - n % blk
        torch.amax(scores[:, :full].view(b, -1, blk), dim=2, out=maxima)
        return scores, maxima

    def _per_tile(self, cols: Tensor, values: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """``add`` as one scatter per tile: each column's place in its tile ``[B, M]`` (and in
        the last, narrower tile: clamped into it), and per tile the values ``[B, M]``, 0 but in
        the column's own tile (adding 0 leaves a score as it is, so every tile can take the
        same places). A col < 0 goes to a tile past the last: its values are 0 everywhere."""
        local = cols % self.tile
        tile = (cols // self.tile) % (self._n_tiles + 1)  # -1 // tile = -1: the extra tile
        per_tile = torch.zeros((self._n_tiles + 1, *cols.shape), dtype=self.weight_t.dtype)
        per_tile.scatter_(0, tile.unsqueeze(0), values.to(per_tile.dtype).unsqueeze(0))
        return local, local.clamp(max=self._last_width - 1), per_tile.unbind(0)

    def _plain(
        self, x: Tensor, k: int, add: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        s = torch.addmm(self.bias, x.to(self.weight_t.dtype), self.weight_t)
        if add is not None:
            slots, values = add
            values = torch.where(slots > 0, values.to(s.dtype), 0.0)
            s.scatter_add_(1, (slots - 1).clamp(min=0), values)
        values, rows = torch.topk(s, min(k, self.n), dim=1)
        return (values if self.act is None else self.act(values)), rows
