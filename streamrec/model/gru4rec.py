"""GRU4Rec (Hidasi et al. 2016; Hidasi & Karatzoglou 2018) as a plain ``nn.Module``.

The structure follows the official PyTorch implementation (hidasib/GRU4Rec_PyTorch_Official):

* input: one-hot (``embedding=0``: the first GRU layer reads an item row of its own
  ``[n_items, 3*h]`` input matrix), a separate embedding (``embedding>0``), or the output
  matrix itself (``constrained_embedding``: the input embedding of an item is its row of ``Wy``);
* ``nn.GRUCell`` layers, dropout on the input (``dropout_p_embed``) and after every layer
  (``dropout_p_hidden``); as in the official code the dropped-out output is the state that is
  carried to the next step during training;
* scores ``h @ Wy[items].T + By[items]`` followed by the final activation;
* initialisation as the official code's default (compatibility) mode: every gate block
  uniform in ``±sqrt(6 / (fan_in + fan_out))``, biases zero.

Session memory (``session_memory`` K > 0; not in the papers, off in a config without it): the
state also carries the session's last K distinct items and a learnt offset is added to their
scores (``memory_gate``: as a linear function of the last layer's output); the rule, shared with
HRNN and p-RNN, is ``streamrec.model.session_memory``. ``train_forward`` is the paper's network:
``trainer.memory_head`` fits the offsets on held-out sessions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamrec.model.api import InnerProductScores, SplitStepModel
from streamrec.model.session_memory import (
    MAX_SESSION_MEMORY,
    SessionMemory,
    add_session_memory,
    check_size,
    push_recent,
    pushed,
    recency_groups,
    session_memory_of,
)
from streamrec.model.topk import TiledTopK

# the rule's parts, where GRU4Rec's callers have always found them
__all__ = ["MAX_SESSION_MEMORY", "GRU4Rec", "GRU4RecConfig", "push_recent", "recency_groups"]

FINAL_ACTS = ("linear", "tanh", "elu")


@dataclass
class GRU4RecConfig:
    """Everything needed to rebuild a GRU4Rec model (stored in checkpoints)."""

    n_items: int
    layers: list[int] = field(default_factory=lambda: [100])
    embedding: int = 0
    constrained_embedding: bool = True
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.0
    final_act: str = "linear"
    elu_param: float = 1.0
    #: the session's last K distinct items, each with a learnt score offset (0: the paper's model)
    session_memory: int = 0
    #: the offsets also depend on the hidden state (a linear function per position group)
    memory_gate: bool = False

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if self.n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {self.n_items}")
        if not self.layers or any(h < 1 for h in self.layers):
            raise ValueError(
                f"layers must be a non-empty list of positive sizes, got {self.layers}"
            )
        if self.embedding < 0:
            raise ValueError(f"embedding must be >= 0, got {self.embedding}")
        check_size(self.session_memory)
        for name in ("dropout_p_embed", "dropout_p_hidden"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.final_act not in FINAL_ACTS:
            raise ValueError(f"final_act must be one of {FINAL_ACTS}, got {self.final_act!r}")


def _uniform_blocks(t: Tensor, n_blocks: int, gen: torch.Generator | None, dim: int) -> None:
    """Uniform init of ``n_blocks`` equal blocks along ``dim``, each with its own Glorot range."""
    with torch.no_grad():
        for block in t.chunk(n_blocks, dim=dim):
            sigma = math.sqrt(6.0 / (block.shape[0] + block.shape[1]))
            block.copy_(torch.rand(block.shape, generator=gen) * 2 * sigma - sigma)


class OneHotGRU(nn.Module):
    """First GRU layer reading one-hot items: an item's input projection is one row of ``Wx``.

    Gate layout follows the official ``GRUEmbedding``: chunks (candidate, reset, update).
    """

    def __init__(self, n_items: int, hidden: int) -> None:
        super().__init__()
        self.Wx = nn.Parameter(torch.empty(n_items, 3 * hidden))
        self.Wh = nn.Parameter(torch.empty(hidden, 3 * hidden))
        self.Bh = nn.Parameter(torch.zeros(3 * hidden))

    def cell(self, vx: Tensor, h: Tensor) -> Tensor:
        """One step from the gathered input rows ``vx`` [B, 3h] and the state ``h`` [B, h]."""
        vx = vx + self.Bh
        vh = h @ self.Wh
        vx_x, vx_r, vx_z = vx.chunk(3, 1)
        vh_x, vh_r, vh_z = vh.chunk(3, 1)
        r = torch.sigmoid(vx_r + vh_r)
        z = torch.sigmoid(vx_z + vh_z)
        cand = torch.tanh(r * vh_x + vx_x)
        return (1.0 - z) * h + z * cand


class GRU4Rec(SplitStepModel, InnerProductScores, nn.Module):
    """Session-based GRU recommender with the serving step API of docs/architecture.md."""

    user_state_dim = 0
    # the session memory's tensors (when K > 0; memory_gate_weight with memory_gate), see
    # streamrec.model.session_memory.add_session_memory
    memory_groups: Tensor  # [K] recency group of each memory slot (a buffer)
    memory_slots: Tensor  # [1, K] arange(K) (a buffer)
    memory_held: Tensor  # [n_items] item row + 1 (a buffer)
    memory_bias: nn.Parameter
    memory_gate_weight: nn.Parameter

    def __init__(self, config: GRU4RecConfig | dict[str, Any], seed: int | None = None) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = GRU4RecConfig(**config)
        self.config = config
        c = config
        self.n_items = c.n_items
        self.layers = list(c.layers)
        self.hidden_dim = sum(self.layers)
        self.memory = c.session_memory
        self.state_dim = self.hidden_dim + self.memory
        self.onehot = not c.constrained_embedding and c.embedding == 0
        if c.constrained_embedding:
            n_input = self.layers[-1]
        elif c.embedding:
            self.E = nn.Parameter(torch.empty(c.n_items, c.embedding))
            n_input = c.embedding
        else:
            self.GE = OneHotGRU(c.n_items, self.layers[0])
            n_input = 0
        first = 1 if self.onehot else 0
        cells = []
        for i in range(first, len(self.layers)):
            cells.append(nn.GRUCell(self.layers[i - 1] if i > 0 else n_input, self.layers[i]))
        self.G = nn.ModuleList(cells)
        self.Wy = nn.Parameter(torch.empty(c.n_items, self.layers[-1]))
        self.By = nn.Parameter(torch.zeros(c.n_items, 1))
        if self.memory:  # memory_groups, memory_bias, memory_gate_weight (checkpoint names)
            gate = self.layers[-1] if c.memory_gate else 0
            add_session_memory(self, self.memory, gate, "memory_", c.n_items)
        self.reset_parameters(seed)

    # ------------------------------------------------------------------ construction
    def reset_parameters(self, seed: int | None = None) -> None:
        """Official (compatibility-mode) initialisation; seeded when ``seed`` is given."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        dev = self.Wy.device
        with torch.no_grad():
            if hasattr(self, "E"):
                e = torch.empty(self.E.shape)
                _uniform_blocks(e, 1, gen, 0)
                self.E.copy_(e.to(dev))
            if self.onehot:
                for p, nb in ((self.GE.Wx, 3), (self.GE.Wh, 3)):
                    t = torch.empty(p.shape)
                    _uniform_blocks(t, nb, gen, 1)
                    p.copy_(t.to(dev))
                self.GE.Bh.zero_()
            for g in self.G:
                assert isinstance(g, nn.GRUCell)  # self.G holds GRU cells only
                for weight in (g.weight_ih, g.weight_hh):
                    t = torch.empty(weight.shape)
                    _uniform_blocks(t, 3, gen, 0)
                    weight.copy_(t.to(dev))
                g.bias_ih.zero_()
                g.bias_hh.zero_()
            w = torch.empty(self.Wy.shape)
            _uniform_blocks(w, 1, gen, 0)
            self.Wy.copy_(w.to(dev))
            self.By.zero_()
            for name in ("memory_bias", "memory_gate_weight"):
                if hasattr(self, name):  # the memory starts silent: the paper's scores
                    getattr(self, name).zero_()

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int | None = None) -> GRU4Rec:
        return cls(GRU4RecConfig(**config), seed=seed)

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def sparse_tables(self) -> list[nn.Parameter]:
        """Item-indexed matrices that training updates row-wise (sparse)."""
        tabs = [self.Wy, self.By]
        if hasattr(self, "E"):
            tabs.append(self.E)
        if self.onehot:
            tabs.append(self.GE.Wx)
        return tabs

    # ------------------------------------------------------------------ the split step
    def embed(self, item_rows: Tensor) -> Tensor:
        """Input representation of items: their embedding, or (one-hot) their ``Wx`` rows."""
        if self.config.constrained_embedding:
            return self.Wy.index_select(0, item_rows)
        if self.config.embedding:
            return self.E.index_select(0, item_rows)
        return self.GE.Wx.index_select(0, item_rows)

    def hidden_step(self, x: Tensor, hidden: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Advance all GRU layers by one event; returns (last layer output, new hidden list).

        ``x`` is what :meth:`embed` returned.  Dropout is applied in training mode only.
        """
        c = self.config
        training = self.training
        new: list[Tensor] = []
        if self.onehot:
            h = self.GE.cell(x, hidden[0])
            if training and c.dropout_p_embed > 0:
                h = F.dropout(h, c.dropout_p_embed, True)
            new.append(h)
            x = h
        elif training and c.dropout_p_embed > 0:
            x = F.dropout(x, c.dropout_p_embed, True)
        offset = len(new)
        for i, cell in enumerate(self.G):
            x = cell(x, hidden[offset + i])
            if training and c.dropout_p_hidden > 0:
                x = F.dropout(x, c.dropout_p_hidden, True)
            new.append(x)
        return x, new

    def final_activation(self, scores: Tensor) -> Tensor:
        act = self.config.final_act
        if act == "tanh":
            return torch.tanh(scores)
        if act == "elu":
            return F.elu(scores, self.config.elu_param)
        return scores

    def score_items(self, output: Tensor, item_rows: Tensor | None = None) -> Tensor:
        """Scores [B, n_items] of all items, or [B, len(item_rows)] of a subset, from the
        last layer's output alone (no session memory: see :meth:`score_state`)."""
        if item_rows is None:
            scores = torch.addmm(self.By.view(1, -1), output, self.Wy.t())
        else:
            w = self.Wy.index_select(0, item_rows)
            b = self.By.index_select(0, item_rows).view(1, -1)
            scores = torch.addmm(b, output, w.t())
        return self.final_activation(scores)

    def forward(
        self, item_rows: Tensor, hidden: list[Tensor], target_rows: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """One event: scores of all items (or of ``target_rows``) and the new ``hidden``
        (:meth:`split_state` layout, the session memory last when there is one)."""
        out, new = self.hidden_step(self.embed(item_rows), hidden[: len(self.layers)])
        if not self.memory:
            return self.score_items(out, target_rows), new
        memory = push_recent(hidden[-1], item_rows)
        new.append(memory)
        scores = torch.addmm(self.By.view(1, -1), out, self.Wy.t())
        scores = self._memory().add_to_scores(scores, out, memory)
        if target_rows is not None:
            scores = scores[:, target_rows]
        return self.final_activation(scores), new

    # ------------------------------------------------------------------ training forward
    def train_forward(
        self, in_rows: Tensor, out_rows: Tensor, hidden: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[tuple[nn.Parameter, Tensor, Tensor]]]:
        """Forward for sampled training with row-sparse item matrices (the paper's network: the
        session memory takes no part; ``hidden`` holds the GRU layers' states).

        The needed item rows are gathered once into fresh leaf tensors so that their gradients
        arrive per gathered row (no dense ``n_items``-sized gradient); the caller hands the
        returned ``(table, rows, leaf)`` triples to the sparse optimiser after ``backward``.
        """
        leaves: list[tuple[nn.Parameter, Tensor, Tensor]] = []

        def gather(table: nn.Parameter, rows: Tensor) -> Tensor:
            leaf = table.detach().index_select(0, rows).requires_grad_(True)
            leaves.append((table, rows, leaf))
            return leaf

        if self.config.constrained_embedding:
            x = gather(self.Wy, in_rows)
            w = gather(self.Wy, out_rows)
        else:
            x = gather(self.E if self.config.embedding else self.GE.Wx, in_rows)
            w = gather(self.Wy, out_rows)
        b = gather(self.By, out_rows).view(1, -1)
        out, hidden = self.hidden_step(x, hidden[: len(self.layers)])
        scores = self.final_activation(torch.addmm(b, out, w.t()))
        return scores, hidden, leaves

    # ------------------------------------------------------------------ session memory
    def session_memory(self) -> SessionMemory | None:
        """The session memory's rule over this model's offsets (None: ``session_memory=0``)."""
        return session_memory_of(self, "memory_") if self.memory else None

    def _memory(self) -> SessionMemory:
        sm = self.session_memory()
        assert sm is not None  # called only where self.memory > 0
        return sm

    def slot_offsets(self, output: Tensor, filled: Tensor) -> Tensor:
        """The score offset of each memory slot ``[B, K]`` from the last layer's ``output``;
        0 where ``filled`` (``[B, K]``, nonzero = the slot holds an item) is 0."""
        return self._memory().slot_offsets(output, filled)

    def memory_head_inputs(
        self, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """What ``trainer.memory_head`` fits on, for states after a step: the gate's input (the
        last layer's output), the memory's item rows (-1 empty) and the scores of every item
        before the offsets and the final activation."""
        out = self.output(state)
        raw = torch.addmm(self.By.view(1, -1), out, self.Wy.t())
        return out, SessionMemory.rows(self.memory_of(state)), raw

    def memory_of(self, state: Tensor) -> Tensor:
        """The session memory part of states ``[B, K]`` (item row + 1, 0 empty, newest last)."""
        return state[:, self.hidden_dim :]

    def score_state(self, state: Tensor) -> Tensor:
        """Scores ``[B, n_items]`` of all items from full states (memory offsets included)."""
        out = self.output(state)
        if not self.memory:
            return self.score_items(out)
        scores = torch.addmm(self.By.view(1, -1), out, self.Wy.t())
        scores = self._memory().add_to_scores(scores, out, self.memory_of(state))
        return self.final_activation(scores)

    # ------------------------------------------------------------------ step API
    @property
    def state_sizes(self) -> list[int]:
        """Widths of the parts of a state: each GRU layer, then the session memory if any."""
        return self.layers + ([self.memory] if self.memory else [])

    def split_state(self, state: Tensor) -> list[Tensor]:
        """A state as :attr:`state_sizes` parts (what :meth:`train_forward` carries)."""
        return list(state.split(self.state_sizes, dim=1))

    def initial_user_state(self, batch_size: int) -> Tensor | None:
        return None

    def initial_state(self, user_state: Tensor | None, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, self.state_dim, device=self.Wy.device, dtype=self.Wy.dtype)

    def advance(self, item_rows: Tensor, state: Tensor) -> Tensor:
        """New states for one event of each of B sessions; ``item_rows < 0`` keeps a state."""
        known = item_rows >= 0
        parts = self.split_state(state)
        rows = item_rows.clamp(min=0)
        _, hidden = self.hidden_step(self.embed(rows), parts[: len(self.layers)])
        if self.memory:  # unknown rows keep their whole state below
            clicked = self.memory_held.index_select(0, rows).unsqueeze(1)
            hidden.append(pushed(parts[-1], clicked, self.memory_slots))
        return torch.where(known.unsqueeze(1), torch.cat(hidden, dim=1), state)

    def output(self, state: Tensor) -> Tensor:
        """The last GRU layer's part of a state (what the output layer reads)."""
        return state[:, self.hidden_dim - self.layers[-1] : self.hidden_dim]

    def state_scorer(
        self, dtype: torch.dtype = torch.float32, *, copy: bool = False
    ) -> Callable[[Tensor], Tensor]:
        if not copy and dtype == self.Wy.dtype:
            return self.score_state
        wy_t = self.Wy.detach().t().contiguous().to(dtype)
        by = self.By.detach().view(1, -1).to(dtype)

        def score(state: Tensor) -> Tensor:
            out = self.output(state)
            scores = torch.addmm(by, out.to(dtype), wy_t)
            if self.memory:
                scores = self._memory().add_to_scores(scores, out, self.memory_of(state))
            return self.final_activation(scores)

        return score

    def state_topk(
        self, dtype: torch.dtype = torch.float32
    ) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
        """``(states, k) -> (values, rows)``: the top-k of ``state_scorer(dtype, copy=True)``
        computed tile by tile (``streamrec.model.topk.TiledTopK``: no full score matrix).

        With a session memory, the offsets are added to the tiled score matrix before its
        top-k (the same ``scatter_add_`` as :meth:`state_scorer`'s on the same scores), over
        the m slot columns that are filled in some row (the filled slots are the last ones);
        for a few rows (``TiledTopK.whole_rows``) over all K, without reading m back (each
        tensor operation's fixed cost is most of a one-row step)."""
        wy_t = self.Wy.detach().t().contiguous().to(dtype)
        by = self.By.detach().view(1, -1).to(dtype).contiguous()
        tiled = TiledTopK(wy_t, by, self.final_activation)
        if not self.memory:
            return lambda state, k: tiled.topk(self.output(state), k)

        memory = self._memory().detached()  # looked up once (views: they follow the parameters)

        def topk(state: Tensor, k: int) -> tuple[Tensor, Tensor]:
            out = self.output(state)
            if tiled.whole_rows(state.shape[0]):  # every slot, no host sync: fewer operations
                return tiled.topk(out, k, add=memory.whole_add(out, self.memory_of(state)))
            add = memory.tiled_add(out, self.memory_of(state))
            return tiled.topk(out, k) if add is None else tiled.topk(out, k, add=add)

        return topk

    # ------------------------------------------------------------------ inner-product split
    def item_vectors(self) -> Tensor:
        return torch.cat([self.Wy.detach(), self.By.detach()], dim=1).float()

    def query_vectors(self, state: Tensor, user_state: Tensor | None = None) -> Tensor:
        out = self.output(state)
        return torch.cat([out, out.new_ones(out.shape[0], 1)], dim=1)

    def offset_rows(self, user_state: Tensor | None, state: Tensor | None = None) -> Tensor | None:
        """The session memory's items (-1: an empty slot): their scores carry the offsets."""
        if not self.memory or state is None:
            return None
        return SessionMemory.rows(self.memory_of(state))

    def score_all(self, state: Tensor, user_state: Tensor | None = None) -> Tensor:
        return self.score_state(state)

    def score_rows(self, state: Tensor, user_state: Tensor | None, rows: Tensor) -> Tensor:
        out = self.output(state)
        scores = torch.bmm(self.Wy[rows], out.unsqueeze(2)).squeeze(2) + self.By[rows].squeeze(2)
        if self.memory:  # each row's offset where it is in the memory
            scores = self._memory().add_to_rows(scores, rows, out, self.memory_of(state))
        return self.final_activation(scores)

    def step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One event for each of B sessions; ``item_rows < 0`` leaves that row's state as is."""
        new_state = self.advance(item_rows, state)
        return new_state, self.score_state(new_state)

    def end_session(self, user_state: Tensor | None, final_state: Tensor) -> Tensor | None:
        return user_state
