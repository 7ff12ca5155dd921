"""HRNN: hierarchical recurrent network for personalised session-based recommendation.

Quadrana, Karatzoglou, Hidasi, Cremonesi: "Personalizing Session-based Recommendations with
Hierarchical Recurrent Neural Networks", RecSys 2017 (official Theano code: mquad/hgru4rec).

A session GRU (GRU4Rec) reads the clicks of a session. When the session ends, its final state
updates a user-level GRU, ``c_m = GRU_user(s_m, c_{m-1})``, and the next session starts from
``s_{m+1,0} = dropout(tanh(W_init c_m + b_init))``.

Variants (``variant``):
- ``init``: the user state only initialises the session state;
- ``all``: the user state is also an input of the (first) session GRU layer at every step;
- ``none``: the user path is disabled: sessions start from zeros and nothing reads the user
  state, which makes the model exactly a GRU4Rec (used as the session-only control).

Option ``user_to_output``: the user state also feeds the output layer (``c W_uy^T`` added to the
scores).

Option ``memory`` (K > 0; not in the paper): the user path also remembers the user's last K
distinct items of earlier sessions, and one learnt score offset (``memory_bias``, starting at 0)
is added to those items' scores. A GRU state of 100 numbers cannot say which of thousands of
items a user has already consumed; the offset learns from the log whether they come back (it
grows, e.g. favourite products) or do not (it falls, e.g. films rated once). The session state
carries the items of the session (the last K distinct), folded into the user's memory by
``end_session``; both memories are item rows stored as floats after the GRU states (exact below
2^24 items), -1 for an empty slot.

Initialisation: the session GRU as GRU4Rec's (``streamrec.model.gru4rec``: every gate block
uniform in its own Glorot range, biases zero), and every weight through which the user state
reaches the session or the scores (``W_init``, the user columns of the first session layer in
``all``, ``Wuy``) starts at **zero**: at initialisation HRNN scores exactly as the GRU4Rec with
the same session weights, whatever the user state, and training moves the user path away from
zero only where it lowers the loss (a useless user signal cannot start by hurting).

Deliberate differences from the official code, for the live service: a user's first session starts
from the learnt initialisation of an empty (zero) user state, ``tanh(b_init)`` (the official code
starts it from zeros), and every GRU layer of a new session is initialised (layer 0 from the user
state, deeper layers from zeros, as GRU4Rec resets them).

Option ``session_memory`` (K > 0; not in the paper): GRU4Rec's session memory on the session
part (``streamrec.model.session_memory``): the current session's last K distinct items, each with
a score offset by recency group (``memory_gate``: also a linear function of the top session
layer's output), fitted after training on held-out sessions (``trainer.memory_head``), zero
until then. The slots come last in the session state (item row + 1, 0 empty). It is another
thing than ``memory``: that one is about the items of the user's earlier sessions.

The session state is the concatenation of all session layers (then the session's items for the
user memory when ``memory`` > 0, then the session memory when ``session_memory`` > 0), the user
state that of all user layers (then the user's item memory when ``memory`` > 0), both
``[B, dim]`` tensors, so the live service stores them as flat vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from streamrec.model.api import InnerProductScores, TrainableStepModel
from streamrec.model.gru4rec import _uniform_blocks
from streamrec.model.session_memory import (
    SessionMemory,
    add_session_memory,
    check_size,
    push_recent,
    session_memory_of,
)

VARIANTS = ("init", "all", "none")


def _init_uniform(t: Tensor) -> None:
    """Glorot-style uniform init over a whole matrix: U(-s, s), s = sqrt(6/(in+out)) (p-RNN)."""
    fan = t.shape[0] + (t.shape[1] if t.dim() > 1 else 1)
    s = (6.0 / fan) ** 0.5
    with torch.no_grad():
        t.uniform_(-s, s)


def push_distinct(memory: Tensor, rows: Tensor) -> Tensor:
    """``memory`` ``[B, K]`` (item rows as floats, -1 empty, newest last) after each row of
    ``rows`` ``[B]`` is remembered: appended (the oldest dropped) unless it is already there or
    unknown (< 0)."""
    r = rows.to(memory.dtype).unsqueeze(1)
    push = (rows >= 0).unsqueeze(1) & ~(memory == r).any(dim=1, keepdim=True)
    return torch.where(push, torch.cat([memory[:, 1:], r], dim=1), memory)


def merge_distinct(older: Tensor, newer: Tensor) -> Tensor:
    """The last ``K`` distinct rows of ``older`` followed by ``newer`` (both ``[B, K]``, -1
    empty, newest last); a row in both counts at its newer place."""
    k = older.shape[1]
    both = torch.cat([older, newer], dim=1)
    n = both.shape[1]
    later = torch.triu(torch.ones(n, n, dtype=torch.bool, device=both.device), diagonal=1)
    dup = ((both.unsqueeze(2) == both.unsqueeze(1)) & later).any(dim=2)  # seen again later
    keep = (both >= 0) & ~dup
    # stable sort puts the dropped entries first and keeps the kept ones in order
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, n - k :]
    kept = both.gather(1, order)
    return torch.where(keep.gather(1, order), kept, torch.full_like(kept, -1.0))


def _run_stack(
    cells: nn.ModuleList, sizes: Sequence[int], x: Tensor, state: Tensor, p: float, training: bool
) -> list[Tensor]:
    """Advance a stack of GRU cells by one input; ``state`` is their concatenated states.

    Dropout ``p`` after every layer (training only); the dropped-out output is the carried
    state, as in GRU4Rec."""
    out = []
    off = 0
    for cell, h in zip(cells, sizes, strict=True):
        x = cell(x, state[:, off : off + h])
        x = nn.functional.dropout(x, p, training)
        out.append(x)
        off += h
    return out


class HRNN(InnerProductScores, TrainableStepModel, nn.Module):
    """Session GRU + user GRU with the streamrec step API (see docs/architecture.md)."""

    # the session memory's tensors (session_memory > 0), see add_session_memory
    session_memory_groups: Tensor
    session_memory_bias: nn.Parameter
    session_memory_gate_weight: nn.Parameter

    def __init__(
        self,
        n_items: int,
        layers: Sequence[int] = (100,),
        user_layers: Sequence[int] = (100,),
        embedding: int = 0,
        variant: str = "init",
        user_to_output: bool = False,
        constrained_embedding: bool = False,
        final_act: str = "linear",
        elu_param: float = 1.0,
        dropout_p_embed: float = 0.0,
        dropout_p_hidden: float = 0.0,
        dropout_p_user: float = 0.0,
        dropout_p_init: float = 0.0,
        memory: int = 0,
        session_memory: int = 0,
        memory_gate: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not layers or not user_layers:
            raise ValueError("layers and user_layers must be non-empty")
        self.n_items = int(n_items)
        self.layers = [int(x) for x in layers]
        self.user_layers = [int(x) for x in user_layers]
        self.embedding = int(embedding)
        self.variant = variant
        self.user_to_output = bool(user_to_output) and variant != "none"
        self.memory = int(memory) if variant != "none" else 0
        if self.memory < 0:
            raise ValueError(f"memory must be >= 0, got {memory}")
        self.session_slots = check_size(int(session_memory))
        self.memory_gate = bool(memory_gate)
        self.dropout_p_embed = float(dropout_p_embed)
        self.dropout_p_hidden = float(dropout_p_hidden)
        self.dropout_p_user = float(dropout_p_user)
        self.dropout_p_init = float(dropout_p_init)
        self.constrained_embedding = bool(constrained_embedding)
        if final_act not in ("linear", "tanh", "elu"):
            raise ValueError(f"final_act must be linear, tanh or elu, got {final_act!r}")
        self.final_act = final_act
        self.elu_param = float(elu_param)

        # Item input: the output matrix's rows (constrained), or an embedding table
        # (embedding=0 means "as wide as the first layer": a one-hot input times W_ih is such a
        # table, factorised).
        if self.constrained_embedding:
            emb_dim = self.layers[-1]
        else:
            emb_dim = self.embedding if self.embedding > 0 else self.layers[0]
            self.E = nn.Parameter(torch.empty(self.n_items, emb_dim))
        self.user_dim_total = sum(self.user_layers)
        u_in = self.user_layers[-1] if variant == "all" else 0
        self.G = nn.ModuleList()
        for i, h in enumerate(self.layers):
            in_dim = (emb_dim + u_in) if i == 0 else self.layers[i - 1]
            self.G.append(nn.GRUCell(in_dim, h))
        self.Wy = nn.Parameter(torch.empty(self.n_items, self.layers[-1]))
        self.By = nn.Parameter(torch.zeros(self.n_items, 1))
        # user level
        self.U = nn.ModuleList()
        for i, h in enumerate(self.user_layers):
            in_dim = self.layers[-1] if i == 0 else self.user_layers[i - 1]
            self.U.append(nn.GRUCell(in_dim, h))
        self.W_init = nn.Linear(self.user_layers[-1], self.layers[0])
        if self.user_to_output:
            self.Wuy = nn.Parameter(torch.empty(self.n_items, self.user_layers[-1]))
        if self.memory:
            self.memory_bias = nn.Parameter(torch.zeros(1))
        if self.session_slots:
            gate = self.layers[-1] if self.memory_gate else 0
            add_session_memory(self, self.session_slots, gate, "session_memory_")
        # off while a staged schedule trains the session network alone (set_active)
        self.user_path_on = True
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    def reset_parameters(self) -> None:
        """GRU4Rec's initialisation for the session part, zeros where the user state enters.

        Draws from the global torch generator (seed it with ``torch.manual_seed``)."""
        with torch.no_grad():
            for cells in (self.G, self.U):
                for i in range(len(cells)):
                    cell = self._cell(cells, i)
                    for w in (cell.weight_ih, cell.weight_hh):
                        _uniform_blocks(w, 3, None, 0)  # one Glorot range per gate (r, z, n)
                    cell.bias_ih.zero_()
                    cell.bias_hh.zero_()
            for table in (self.Wy, getattr(self, "E", None)):
                if table is not None:
                    _uniform_blocks(table, 1, None, 0)
            self.By.zero_()
            # the user path starts silent: HRNN == GRU4Rec at init (see the module docstring)
            nn.init.zeros_(self.W_init.weight)
            nn.init.zeros_(self.W_init.bias)
            if self.variant == "all":
                g0 = self._cell(self.G, 0)
                g0.weight_ih[:, g0.input_size - self.user_layers[-1] :].zero_()
            if self.user_to_output:
                self.Wuy.zero_()
            if self.memory:
                self.memory_bias.zero_()
            for head in self.session_memory_parameters():  # silent until fitted
                head.zero_()

    @staticmethod
    def _cell(cells: nn.ModuleList, i: int) -> nn.GRUCell:
        cell = cells[i]
        assert isinstance(cell, nn.GRUCell)
        return cell

    @property
    def hidden_dim(self) -> int:
        """Width of the session GRU states (the session state without its item memory)."""
        return sum(self.layers)

    @property
    def state_dim(self) -> int:
        return self.hidden_dim + self.memory + self.session_slots

    @property
    def user_state_dim(self) -> int:
        return self.user_dim_total + self.memory

    @property
    def device(self) -> torch.device:
        return self.By.device

    def config_dict(self) -> dict[str, Any]:
        """Arguments that rebuild this model (stored in checkpoints)."""
        return {
            "n_items": self.n_items,
            "layers": list(self.layers),
            "user_layers": list(self.user_layers),
            "embedding": self.embedding,
            "variant": self.variant,
            "user_to_output": self.user_to_output,
            "constrained_embedding": self.constrained_embedding,
            "final_act": self.final_act,
            "elu_param": self.elu_param,
            "dropout_p_embed": self.dropout_p_embed,
            "dropout_p_hidden": self.dropout_p_hidden,
            "dropout_p_user": self.dropout_p_user,
            "dropout_p_init": self.dropout_p_init,
            "memory": self.memory,
            "session_memory": self.session_slots,
            "memory_gate": self.memory_gate,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int | None = None) -> HRNN:
        """The model of ``config_dict()``; ``seed`` seeds the global generator first (the
        model initialises from it)."""
        if seed is not None:
            torch.manual_seed(seed)
        return cls(**config)

    # ------------------------------------------------------------ user level
    def _top_user(self, user_state: Tensor | None, batch_size: int) -> Tensor:
        if user_state is None or not self.user_path_on:
            return torch.zeros(batch_size, self.user_layers[-1], device=self.device)
        return user_state[:, self.user_dim_total - self.user_layers[-1] : self.user_dim_total]

    def _empty_memory(self, batch_size: int) -> Tensor:
        return torch.full((batch_size, self.memory), -1.0, device=self.device)

    def initial_user_state(self, batch_size: int) -> Tensor:
        """The empty user state (a user with no finished session): zeros, memory empty."""
        zeros = torch.zeros(batch_size, self.user_dim_total, device=self.device)
        return torch.cat([zeros, self._empty_memory(batch_size)], dim=1) if self.memory else zeros

    def initial_state(self, user_state: Tensor | None, batch_size: int) -> Tensor:
        """Session state at session start: layer 0 = dropout(tanh(W_init c + b_init)), others 0."""
        state = torch.zeros(batch_size, self.hidden_dim, device=self.device)
        if self.variant != "none" and self.user_path_on:
            c = self._top_user(user_state, batch_size)
            s0 = torch.tanh(self.W_init(c))
            s0 = nn.functional.dropout(s0, self.dropout_p_init, self.training)
            state = torch.cat([s0, state[:, self.layers[0] :]], dim=1)
        if self.memory:
            state = torch.cat([state, self._empty_memory(batch_size)], dim=1)
        if self.session_slots:  # an empty session memory: zeros
            state = torch.cat([state, state.new_zeros(batch_size, self.session_slots)], dim=1)
        return state

    def end_session(self, user_state: Tensor | None, final_state: Tensor) -> Tensor:
        """User state after a session whose final session state is ``final_state``."""
        b = final_state.shape[0]
        if user_state is None:
            user_state = self.initial_user_state(b)
        if self.variant == "none" or not self.user_path_on:
            return user_state
        x = self.output(final_state)
        d = self.user_dim_total
        out = _run_stack(
            self.U, self.user_layers, x, user_state[:, :d], self.dropout_p_user, self.training
        )
        if self.memory:
            h = self.hidden_dim
            out.append(merge_distinct(user_state[:, d:], final_state[:, h : h + self.memory]))
        return torch.cat(out, dim=1)

    # ---------------------------------------------------------- session level
    def embed(self, item_rows: Tensor) -> Tensor:
        table = self.Wy if self.constrained_embedding else self.E
        x = table.index_select(0, item_rows)
        return nn.functional.dropout(x, self.dropout_p_embed, self.training)

    def hidden_step(self, x: Tensor, state: Tensor, user_state: Tensor | None) -> Tensor:
        """One step of the session GRU stack; returns the new (concatenated) state."""
        if self.variant == "all":
            x = torch.cat([x, self._top_user(user_state, x.shape[0])], dim=1)
        out = _run_stack(self.G, self.layers, x, state, self.dropout_p_hidden, self.training)
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def output(self, state: Tensor) -> Tensor:
        """The vector the output layer reads: the top session layer."""
        return state[:, self.hidden_dim - self.layers[-1] : self.hidden_dim]

    def _advance(self, item_rows: Tensor, x: Tensor, state: Tensor, user: Tensor | None) -> Tensor:
        """New session state from the embedded input ``x``; rows < 0 keep their state."""
        h = self.hidden_dim
        parts = [self.hidden_step(x, state[:, :h], user)]
        if self.memory:
            parts.append(push_distinct(state[:, h : h + self.memory], item_rows))
        if self.session_slots:
            parts.append(push_recent(self.memory_of(state), item_rows))
        new = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return torch.where((item_rows >= 0).unsqueeze(1), new, state)

    def _memory_offset(self, user_state: Tensor | None, item_rows: Tensor | None) -> Tensor | None:
        """``memory_bias`` where an item (all, or ``item_rows``) is in the user's memory."""
        if not self.memory or user_state is None or not self.user_path_on:
            return None
        mem = user_state[:, self.user_dim_total :]
        if item_rows is None:  # all items: scatter, empty slots write to a spare column
            n = self.n_items
            idx = torch.where(mem >= 0, mem, torch.full_like(mem, float(n))).long()
            hit = torch.zeros(mem.shape[0], n + 1, device=mem.device, dtype=mem.dtype)
            hit = hit.scatter_(1, idx, 1.0)[:, :n]
        else:  # a few rows: look them up in each sorted memory, no n_items buffer
            # rows shared by every state ([C], training), or rows per state ([B, C], retrieval)
            srt = mem.sort(dim=1).values
            q = item_rows.to(mem.dtype)
            q = q if q.dim() == 2 else q.unsqueeze(0).expand(mem.shape[0], -1).contiguous()
            pos = torch.searchsorted(srt, q).clamp(max=mem.shape[1] - 1)
            hit = (srt.gather(1, pos) == q).to(mem.dtype)  # rows >= 0 never match an empty -1
        return hit * self.memory_bias

    def score_items(
        self, output: Tensor, user_state: Tensor | None = None, item_rows: Tensor | None = None
    ) -> Tensor:
        """Scores ``[B, n]`` of all items, or of ``item_rows`` (e.g. targets + negative
        samples), from the output alone (the network trained: no session memory, see
        :meth:`score_all`)."""
        return self.final_activation(self._raw_scores(output, user_state, item_rows))

    def _raw_scores(
        self, output: Tensor, user_state: Tensor | None, item_rows: Tensor | None
    ) -> Tensor:
        """:meth:`score_items` before the final activation."""
        w: Tensor = self.Wy
        b: Tensor = self.By
        if item_rows is not None:
            w, b = self.Wy.index_select(0, item_rows), self.By.index_select(0, item_rows)
        scores = torch.addmm(b.view(1, -1), output, w.T)
        if self.user_to_output:
            c = self._top_user(user_state, output.shape[0])
            wu = self.Wuy if item_rows is None else self.Wuy.index_select(0, item_rows)
            scores = scores + c @ wu.T
        offset = self._memory_offset(user_state, item_rows)
        if offset is not None:
            scores = scores + offset
        return scores

    # ------------------------------------------------------ session memory
    def session_memory(self) -> SessionMemory | None:
        """The session memory's rule over this model's offsets (None: ``session_memory=0``)."""
        return session_memory_of(self, "session_memory_") if self.session_slots else None

    def memory_of(self, state: Tensor) -> Tensor:
        """The session memory part of states ``[B, K]`` (item row + 1, 0 empty, newest last)."""
        return state[:, self.hidden_dim + self.memory :]

    def memory_head_inputs(
        self, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """What ``trainer.memory_head`` fits on (states after a step, the user states they were
        given): the top layer's output, the session memory's rows (-1 empty) and the scores of
        every item before the session memory's offsets and the final activation."""
        out = self.output(state)
        raw = self._raw_scores(out, user_state, None)
        return out, SessionMemory.rows(self.memory_of(state)), raw

    def score_all(self, state: Tensor, user_state: Tensor | None) -> Tensor:
        """Scores ``[B, n_items]`` of every item from states after a step (what ``step``
        returns): :meth:`score_items` plus the session memory's offsets."""
        out = self.output(state)
        memory = self.session_memory()
        if memory is None:
            return self.score_items(out, user_state)
        scores = memory.add_to_scores(
            self._raw_scores(out, user_state, None), out, self.memory_of(state)
        )
        return self.final_activation(scores)

    # ------------------------------------------------------ inner-product split
    def item_vectors(self) -> Tensor:
        parts = [self.Wy, self.Wuy, self.By] if self.user_to_output else [self.Wy, self.By]
        return torch.cat([p.detach() for p in parts], dim=1).float()

    def query_vectors(self, state: Tensor, user_state: Tensor | None) -> Tensor:
        out = self.output(state)
        parts = [out]
        if self.user_to_output:
            parts.append(self._top_user(user_state, out.shape[0]))
        parts.append(out.new_ones(out.shape[0], 1))
        return torch.cat(parts, dim=1)

    def offset_rows(self, user_state: Tensor | None, state: Tensor | None = None) -> Tensor | None:
        """The user's memory items (their scores carry ``memory_bias``), then the session
        memory's (their scores carry its offsets); -1: an empty slot."""
        parts = []
        if self.memory and user_state is not None and self.user_path_on:
            parts.append(user_state[:, self.user_dim_total :].long())  # empty slots are -1
        if self.session_slots and state is not None:
            parts.append(SessionMemory.rows(self.memory_of(state)))
        if not parts:
            return None
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def score_rows(self, state: Tensor, user_state: Tensor | None, rows: Tensor) -> Tensor:
        out = self.output(state)
        scores = torch.bmm(self.Wy[rows], out.unsqueeze(2)).squeeze(2) + self.By[rows].squeeze(2)
        if self.user_to_output:
            c = self._top_user(user_state, out.shape[0])
            scores = scores + torch.bmm(self.Wuy[rows], c.unsqueeze(2)).squeeze(2)
        offset = self._memory_offset(user_state, rows)
        if offset is not None:
            scores = scores + offset
        memory = self.session_memory()
        if memory is not None:
            scores = memory.add_to_rows(scores, rows, out, self.memory_of(state))
        return self.final_activation(scores)

    @classmethod
    def from_gru4rec(cls, g: nn.Module, **kwargs: Any) -> HRNN:
        """An HRNN whose session part carries the weights of GRU4Rec ``g`` (user path fresh).

        With ``variant="none"`` the result scores exactly as ``g``. ``g``'s session memory comes
        along (its size, gate and fitted offsets; ``session_memory``/``memory_gate`` in
        ``kwargs`` override the first two, and offsets of another shape start at zero).
        One-hot-input GRU4Rec
        models (``embedding=0``, not constrained) have no factorised table to copy and are
        refused.
        """
        c = g.config_dict()  # type: ignore[operator]  # nn.Module attributes read as Tensor | Module
        if not c["constrained_embedding"] and not c["embedding"]:
            raise ValueError("one-hot input GRU4Rec has no HRNN equivalent; use an embedding")
        m = cls(
            n_items=c["n_items"],
            layers=c["layers"],
            embedding=c["embedding"],
            constrained_embedding=c["constrained_embedding"],
            final_act=c["final_act"],
            elu_param=c["elu_param"],
            dropout_p_embed=c["dropout_p_embed"],
            dropout_p_hidden=c["dropout_p_hidden"],
            **{
                "session_memory": c.get("session_memory", 0),
                "memory_gate": c.get("memory_gate", False),
                **kwargs,
            },
        )
        with torch.no_grad():
            src = dict(g.named_parameters())
            # GRU4Rec's session memory is HRNN's session_memory_*, not the user memory_bias
            src = {("session_" + n if n.startswith("memory_") else n): t for n, t in src.items()}
            for name, p in m.named_parameters():
                if name in src and src[name].shape == p.shape and not name.startswith("G.0."):
                    p.copy_(src[name])
            g_cells = g.G
            assert isinstance(g_cells, nn.ModuleList)
            g0 = cls._cell(g_cells, 0)
            h0 = m._cell(m.G, 0)
            h0.weight_hh.copy_(g0.weight_hh)
            h0.bias_ih.copy_(g0.bias_ih)
            h0.bias_hh.copy_(g0.bias_hh)
            w = h0.weight_ih
            w.zero_()  # the user-state columns ("all") start at zero: no user influence yet
            w[:, : g0.weight_ih.shape[1]].copy_(g0.weight_ih)
        return m

    # ------------------------------------------------------ staged training
    def param_groups(self) -> dict[str, list[Tensor]]:
        """The two parts a staged schedule trains one after the other: ``session`` (GRU4Rec's
        network: session GRU, item tables, output) and ``user`` (user GRU, ``W_init``,
        ``Wuy``, ``memory_bias``; and, in ``all``, the user columns of the first session layer,
        see :meth:`grad_masks`)."""
        head = {id(p) for p in self.session_memory_parameters()}  # fitted apart, never here
        if self.variant == "none":  # no user path: one part, so every schedule is joint
            return {"session": [p for p in self.parameters() if id(p) not in head]}
        groups: dict[str, list[Tensor]] = {"session": [], "user": []}
        for name, p in self.named_parameters():
            if id(p) in head:
                continue
            user = name.startswith(("U.", "W_init.", "Wuy", "memory_bias"))
            groups["user" if user else "session"].append(p)
        return groups

    def grad_masks(self, groups: Sequence[str]) -> list[tuple[Tensor, Tensor]]:
        """Parameters trained only in part when just ``groups`` train: ``(parameter, 0/1 mask
        of its trained entries)``. In ``all`` the user columns of the first session layer's
        input weights belong to the user path, the rest to the session network."""
        if self.variant != "all" or "user" not in groups or "session" in groups:
            return []
        w = self._cell(self.G, 0).weight_ih
        mask = torch.zeros_like(w)
        mask[:, w.shape[1] - self.user_layers[-1] :] = 1.0
        return [(w, mask)]

    def set_active(self, names: Sequence[str] | None) -> None:
        """``None`` or with ``"user"``: the whole model; ``["session"]``: the user path is off
        (sessions start from zeros, nothing reads the user state): the model is its GRU4Rec."""
        self.user_path_on = names is None or "user" in names

    def sparse_tables(self) -> list[nn.Parameter]:
        """The item-indexed matrices (updated row-sparsely in training)."""
        tabs = [self.Wy, self.By]
        if not self.constrained_embedding:
            tabs.append(self.E)
        if self.user_to_output:
            tabs.append(self.Wuy)
        return tabs

    def train_step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None, out_rows: Tensor
    ) -> tuple[Tensor, Tensor, list[tuple[nn.Parameter, Tensor, Tensor]]]:
        """Training step with row-sparse item matrices, as ``GRU4Rec.train_forward``.

        The input and output item rows are gathered into fresh leaf tensors, so backward
        produces gradients for those rows only (no ``n_items``-sized dense gradient); returns
        ``(new_state, scores of out_rows, [(table, rows, leaf)])`` for the sparse optimiser.
        """
        leaves: list[tuple[nn.Parameter, Tensor, Tensor]] = []

        def gather(table: nn.Parameter, rows: Tensor) -> Tensor:
            leaf = table.detach().index_select(0, rows).requires_grad_(True)
            leaves.append((table, rows, leaf))
            return leaf

        rows = item_rows.clamp(min=0)
        x = gather(self.Wy if self.constrained_embedding else self.E, rows)
        x = nn.functional.dropout(x, self.dropout_p_embed, self.training)
        new = self._advance(item_rows, x, state, user_state)
        w, b = gather(self.Wy, out_rows), gather(self.By, out_rows)
        scores = torch.addmm(b.view(1, -1), self.output(new), w.T)
        if self.user_to_output:
            c = self._top_user(user_state, new.shape[0])
            scores = scores + c @ gather(self.Wuy, out_rows).T
        offset = self._memory_offset(user_state, out_rows)
        if offset is not None:
            scores = scores + offset
        return new, self.final_activation(scores), leaves

    def final_activation(self, scores: Tensor) -> Tensor:
        if self.final_act == "tanh":
            return torch.tanh(scores)
        if self.final_act == "elu":
            return nn.functional.elu(scores, self.elu_param)
        return scores

    def forward_step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Training step without scoring: (new_state, output vector); rows < 0 keep their state."""
        x = self.embed(item_rows.clamp(min=0))
        new = self._advance(item_rows, x, state, user_state)
        return new, self.output(new)

    def step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The step API: (new_state, scores over all items)."""
        new, _ = self.forward_step(item_rows, state, user_state)
        return new, self.score_all(new, user_state)
