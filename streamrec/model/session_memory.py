"""The session memory: one copy of the rule for every model that has one (GRU4Rec, HRNN,
p-RNN; not in the papers, off by default where a paper's model is asked for).

A model's session state also carries the session's last K distinct items, most recent last (an
item clicked again moves to the end), and an offset is added to the score of each of them when
the model scores. The offset depends on the item's recency position (1 = the current item;
positions grouped in powers of two: 1, 2-3, 4-7, ...) and, with a gate, on the hidden state (a
linear function of the vector the output layer reads, per position group): how likely a
re-click is now. A recurrent state cannot say which items the session already showed; the
offsets say whether they come back (e-commerce: re-clicks are a quarter of all clicks) or do
not (films rated once). They are not trained with the network: ``trainer.memory_head`` fits
them on held-out sessions, for the ranking. They start at zero: the model then scores exactly as
without the memory. The slots hold ``item row + 1`` as floats (exact below 2^24 items), 0 for an
empty slot, so an all-zero state block is an empty memory.

A model registers the memory's tensors on itself with :func:`add_session_memory` (under a name
prefix, so that its checkpoints name them as before: GRU4Rec's ``memory_bias``) and hands out
:class:`SessionMemory`, the rule over those tensors, from :func:`session_memory_of`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MAX_SESSION_MEMORY = 4096


def recency_groups(k: int) -> Tensor:
    """The position group of each of ``k`` memory slots (slot ``k - 1`` holds the most recent
    item, recency position 1): ``floor(log2(position))``, so groups 1, 2-3, 4-7, 8-15, ..."""
    position = torch.arange(k, 0, -1)
    return torch.floor(torch.log2(position.to(torch.float64))).to(torch.int64)


def push_recent(memory: Tensor, rows: Tensor) -> Tensor:
    """``memory`` ``[B, K]`` (item row + 1 as floats, 0 empty, most recent last) after each row of
    ``rows`` ``[B]`` is clicked: an item already there moves to the end, a new one is appended
    and the oldest slot dropped; a row < 0 (unknown item) leaves its memory as it is."""
    slots = torch.arange(memory.shape[1], device=memory.device).unsqueeze(0)
    clicked = (rows + 1).to(memory.dtype).unsqueeze(1)
    return torch.where((rows >= 0).unsqueeze(1), pushed(memory, clicked, slots), memory)


def pushed(memory: Tensor, clicked: Tensor, slots: Tensor) -> Tensor:
    """:func:`push_recent` of ``clicked`` ``[B, 1]`` (item row + 1, as the memory holds it);
    ``slots`` is ``arange(K)`` ``[1, K]``. Few tensor operations: a batch-1 step is mostly the
    fixed cost of each."""
    # the slot the clicked item leaves (0 when it is new: then every slot moves one to the left)
    leave = (memory == clicked).view(torch.uint8).argmax(dim=1, keepdim=True)
    return torch.where(slots < leave, memory, torch.cat([memory[:, 1:], clicked], dim=1))


def group_offsets(bias: Tensor, gate: Tensor | None, groups: Tensor, output: Tensor) -> Tensor:
    """The score offsets ``[B, len(groups)]`` of memory slots in recency ``groups``: the
    group's ``bias`` ``[G]``, plus (``gate`` ``[H, G]``) a linear function of the
    ``output`` ``[B, H]``."""
    if gate is None:  # one row for all
        return bias.index_select(0, groups).expand(output.shape[0], -1)
    return (bias + torch.mm(output, gate)).index_select(1, groups)


def check_size(k: int, name: str = "session_memory") -> int:
    """``k`` if it is a valid number of slots, else ``ValueError`` naming ``name``."""
    if not 0 <= k <= MAX_SESSION_MEMORY:
        raise ValueError(f"{name} must be in [0, {MAX_SESSION_MEMORY}], got {k}")
    return k


def add_session_memory(
    module: nn.Module, k: int, gate_dim: int, prefix: str, n_items: int = 0
) -> None:
    """Register a memory of ``k`` slots on ``module``: the buffer ``{prefix}groups`` (derived
    from ``k``, so not saved in checkpoints), the parameter ``{prefix}bias`` (one offset per
    recency group) and, when ``gate_dim`` > 0, ``{prefix}gate_weight`` ``[gate_dim, groups]``;
    all zero-initialised: the memory starts silent. With ``n_items``, also the buffers
    ``{prefix}slots`` (``arange(K)`` ``[1, K]``) and ``{prefix}held`` (item row + 1 by row, as
    the memory holds it: one lookup per step, not two casts) of :func:`pushed`."""
    groups = recency_groups(k)
    module.register_buffer(f"{prefix}groups", groups, persistent=False)
    if n_items:
        module.register_buffer(f"{prefix}slots", torch.arange(k).unsqueeze(0), persistent=False)
        held = torch.arange(1, n_items + 1, dtype=torch.get_default_dtype())
        module.register_buffer(f"{prefix}held", held, persistent=False)
    n_groups = int(groups.max()) + 1
    setattr(module, f"{prefix}bias", nn.Parameter(torch.zeros(n_groups)))
    if gate_dim > 0:
        setattr(module, f"{prefix}gate_weight", nn.Parameter(torch.zeros(gate_dim, n_groups)))


def session_memory_of(module: nn.Module, prefix: str) -> SessionMemory | None:
    """The rule over the tensors :func:`add_session_memory` registered (None: no memory)."""
    bias = getattr(module, f"{prefix}bias", None)
    if bias is None:
        return None
    gate = getattr(module, f"{prefix}gate_weight", None)
    return SessionMemory(getattr(module, f"{prefix}groups"), bias, gate)


class SessionMemory:
    """The offsets of a memory's slots and how they enter the scores, over a model's tensors
    (made afresh on each use, so it always sees the model's current device and values).

    ``memory`` arguments are the memory blocks of states ``[B, K]`` (item row + 1, 0 empty,
    newest last); ``output`` the vector the output layer reads ``[B, H]`` (the gate's input)."""

    def __init__(self, groups: Tensor, bias: Tensor, gate_weight: Tensor | None) -> None:
        self.groups, self.bias, self.gate_weight = groups, bias, gate_weight

    @property
    def size(self) -> int:
        return int(self.groups.shape[0])

    def parameters(self) -> list[Tensor]:
        """What ``trainer.memory_head`` fits."""
        return [self.bias] if self.gate_weight is None else [self.bias, self.gate_weight]

    def penalty(self) -> Tensor | None:
        """The squared norm of the gate weights (what the fit's L2 is on); None without gate."""
        return None if self.gate_weight is None else self.gate_weight.pow(2).sum()

    @staticmethod
    def rows(memory: Tensor) -> Tensor:
        """The item rows of the slots (-1: empty)."""
        return memory.long() - 1

    def slot_offsets(self, output: Tensor, filled: Tensor) -> Tensor:
        """The score offset of each slot ``[B, K]``; 0 where ``filled`` (``[B, K]``, nonzero =
        the slot holds an item) is 0."""
        offsets = self.unmasked(output)
        return offsets * (filled > 0).to(offsets.dtype)

    def unmasked(self, output: Tensor, first_slot: int = 0) -> Tensor:
        """:meth:`slot_offsets` of the slots from ``first_slot`` on ``[B, K - first_slot]``,
        whether a slot holds an item or not."""
        groups = self.groups[first_slot:] if first_slot else self.groups
        return group_offsets(self.bias, self.gate_weight, groups, output)

    def add_to_scores(self, scores: Tensor, output: Tensor, memory: Tensor) -> Tensor:
        """``scores`` ``[B, n_items]`` (before the final activation) plus each row's offsets,
        in place."""
        offsets = self.slot_offsets(output, memory).to(scores.dtype)
        # an empty slot adds its 0 offset to item row 0
        return scores.scatter_add_(1, self.rows(memory).clamp(min=0), offsets)

    def add_to_rows(self, scores: Tensor, rows: Tensor, output: Tensor, memory: Tensor) -> Tensor:
        """``scores`` ``[B, C]`` of item ``rows`` ``[B, C]`` plus the offset of each row that is
        in its memory (an item is there at most once)."""
        hit = (rows.unsqueeze(2) + 1).to(memory.dtype) == memory.unsqueeze(1)
        slots = self.slot_offsets(output, memory).to(scores.dtype)
        return scores + (hit.to(scores.dtype) * slots.unsqueeze(1)).sum(dim=2)

    def tiled_add(self, output: Tensor, memory: Tensor) -> tuple[Tensor, Tensor] | None:
        """What a tiled top-k adds to its score tiles (``TiledTopK.topk``'s ``add``): the slots
        ``[B, m]`` (item row + 1, 0: nothing) and offsets ``[B, m]`` of the last m slots, the
        ones filled in some row (the filled slots are the last ones); None when all are
        empty."""
        filled = (memory > 0).any(dim=0)
        k = self.size
        m = k - int(filled.to(torch.uint8).argmax()) if bool(filled.any()) else 0
        if m == 0:
            return None
        offsets = self.unmasked(output, k - m)
        # an empty slot (0) adds nothing in the tiled top-k
        return memory[:, k - m :].long(), offsets

    def detached(self) -> SessionMemory:
        """The same rule over detached views of the tensors (they follow the parameters)."""
        gate = None if self.gate_weight is None else self.gate_weight.detach()
        return SessionMemory(self.groups, self.bias.detach(), gate)

    def whole_add(self, output: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`tiled_add` over every slot, without reading back which are filled (for a
        few rows, ``TiledTopK.whole_rows``: each tensor operation's fixed cost is most of a
        one-row step)."""
        # an empty slot (0) adds nothing in the tiled top-k
        return memory.long(), group_offsets(self.bias, self.gate_weight, self.groups, output)
