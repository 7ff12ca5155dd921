"""p-RNN: parallel recurrent networks over item ids and item features.

Hidasi, Quadrana, Karatzoglou, Tikk: "Parallel Recurrent Neural Network Architectures for
Feature-rich Session-based Recommendations", RecSys 2016.

One GRU subnet reads the item-id input (an embedding), one more reads each item feature vector
(the feature matrices are buffers of the model, looked up by item row, so a checkpoint carries
them). The subnets' hidden states are concatenated, each optionally multiplied by a fixed weight,
before the output layer. The output layer on the concatenation is kept as one block per subnet
(``Wy.<k>``), so ``scores = sum_k w_k h_k Wy_k^T + By`` — the same function, and it lets the
training schedules freeze one subnet together with its part of the output layer.

Architectures (``arch``):
- ``id``: the id subnet only (GRU4Rec);
- ``feature``: the feature subnets only;
- ``parallel``: id subnet + feature subnets;
- ``concat``: the naive baseline, one GRU over ``[embedding(item); features(item)...]``.

Option ``session_memory`` (K > 0; not in the paper): GRU4Rec's session memory
(``streamrec.model.session_memory``): the session's last K distinct items, each with a score
offset by recency group (``memory_gate``: also a linear function of the subnets' concatenated
states), fitted after training on held-out sessions (``trainer.memory_head``), zero until then.
The slots come after the subnets' states in the session state (item row + 1, 0 empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from streamrec.model.api import InnerProductScores, TrainableStepModel
from streamrec.model.hrnn import _init_uniform
from streamrec.model.session_memory import (
    SessionMemory,
    add_session_memory,
    check_size,
    push_recent,
    session_memory_of,
)

ARCHS = ("id", "feature", "parallel", "concat")


class PRNN(InnerProductScores, TrainableStepModel, nn.Module):
    """Parallel GRU subnets (id + features) with the streamrec step API."""

    # buffers (register_buffer), declared for the type checker
    w: Tensor
    active: Tensor
    # the session memory's tensors (session_memory > 0), see add_session_memory
    session_memory_groups: Tensor
    session_memory_bias: nn.Parameter
    session_memory_gate_weight: nn.Parameter

    def __init__(
        self,
        n_items: int,
        feature_dims: Sequence[int] = (),
        arch: str = "parallel",
        id_hidden: int = 100,
        feature_hidden: int | Sequence[int] = 100,
        embedding: int = 0,
        subnet_weights: Sequence[float] | None = None,
        feature_names: Sequence[str] | None = None,
        dropout_p_embed: float = 0.0,
        dropout_p_hidden: float = 0.0,
        feature_values: Sequence[Tensor] | None = None,
        final_act: str = "linear",
        elu_param: float = 1.0,
        session_memory: int = 0,
        memory_gate: bool = False,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        self.n_items = int(n_items)
        self.arch = arch
        self.feature_dims = [int(d) for d in feature_dims]
        if arch != "id" and not self.feature_dims:
            raise ValueError(f"arch {arch!r} needs at least one feature matrix")
        if arch == "id":
            self.feature_dims = []
        nf = len(self.feature_dims)
        self.feature_names = list(feature_names or [f"f{i}" for i in range(nf)])[:nf]
        self.id_hidden = int(id_hidden)
        fh = [int(feature_hidden)] * nf if isinstance(feature_hidden, int) else list(feature_hidden)
        if len(fh) != nf:
            raise ValueError("feature_hidden needs one size per feature matrix")
        self.feature_hidden = fh
        self.embedding = int(embedding)
        self.dropout_p_embed = float(dropout_p_embed)
        self.dropout_p_hidden = float(dropout_p_hidden)
        if final_act not in ("linear", "tanh", "elu"):
            raise ValueError(f"final_act must be linear, tanh or elu, got {final_act!r}")
        self.final_act = final_act  # on the scores; the trainer picks ELU for bpr-max
        self.elu_param = float(elu_param)

        for i, d in enumerate(self.feature_dims):
            self.register_buffer(f"feat_{i}", torch.zeros(self.n_items, d))
        if feature_values is not None and self.feature_dims:
            self.set_features(feature_values)

        emb_dim = self.embedding if self.embedding > 0 else self.id_hidden
        # subnets: names and hidden sizes, in state order
        self.subnets: list[str] = []
        sizes: list[int] = []
        self.G = nn.ModuleDict()
        if arch in ("id", "parallel", "concat"):
            self.E = nn.Embedding(self.n_items, emb_dim)
        if arch in ("id", "parallel"):
            self.subnets.append("id")
            sizes.append(self.id_hidden)
            self.G["id"] = nn.GRUCell(emb_dim, self.id_hidden)
        if arch in ("feature", "parallel"):
            for i, d in enumerate(self.feature_dims):
                self.subnets.append(f"f{i}")
                sizes.append(fh[i])
                self.G[f"f{i}"] = nn.GRUCell(d, fh[i])
        if arch == "concat":
            self.subnets.append("concat")
            sizes.append(self.id_hidden)
            self.G["concat"] = nn.GRUCell(emb_dim + sum(self.feature_dims), self.id_hidden)
        self.sizes = sizes
        w = (
            [1.0] * len(self.subnets)
            if subnet_weights is None
            else [float(x) for x in subnet_weights]
        )
        if len(w) != len(self.subnets):
            raise ValueError(f"subnet_weights needs {len(self.subnets)} values ({self.subnets})")
        self.subnet_weights = w
        self.register_buffer("w", torch.tensor(w), persistent=False)
        # training schedules switch subnets off (residual: the id subnet alone first)
        self.register_buffer("active", torch.ones(len(w)), persistent=False)
        self.Wy = nn.ModuleDict(
            {k: nn.Embedding(self.n_items, h) for k, h in zip(self.subnets, sizes, strict=True)}
        )
        self.By = nn.Embedding(self.n_items, 1)
        self.session_slots = check_size(int(session_memory))
        self.memory_gate = bool(memory_gate)
        if self.session_slots:
            gate = sum(sizes) if self.memory_gate else 0
            add_session_memory(self, self.session_slots, gate, "session_memory_")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            # the session memory starts silent: the paper's scores
            if name.endswith("bias") or name == "By.weight" or name.startswith("session_memory_"):
                nn.init.zeros_(p)
            else:
                _init_uniform(p)

    def set_features(self, values: Sequence[Tensor]) -> None:
        """Copy feature matrices (``[n_items, dim]`` each, in ``feature_dims`` order) in."""
        if len(values) != len(self.feature_dims):
            raise ValueError(
                f"expected {len(self.feature_dims)} feature matrices, got {len(values)}"
            )
        for i, v in enumerate(values):
            buf = getattr(self, f"feat_{i}")
            v = torch.as_tensor(v, dtype=buf.dtype)
            if tuple(v.shape) != tuple(buf.shape):
                raise ValueError(f"feature {i}: shape {tuple(v.shape)} != {tuple(buf.shape)}")
            buf.copy_(v)

    # ------------------------------------------------------------- contract
    @property
    def hidden_dim(self) -> int:
        """Width of the subnets' states (the session state without the session memory)."""
        return sum(self.sizes)

    @property
    def state_dim(self) -> int:
        return self.hidden_dim + self.session_slots

    @property
    def user_state_dim(self) -> int:
        return 0

    @property
    def device(self) -> torch.device:
        return self.By.weight.device

    def config_dict(self) -> dict[str, Any]:
        return {
            "n_items": self.n_items,
            "feature_dims": list(self.feature_dims),
            "arch": self.arch,
            "id_hidden": self.id_hidden,
            "feature_hidden": list(self.feature_hidden),
            "embedding": self.embedding,
            "subnet_weights": list(self.subnet_weights),
            "feature_names": list(self.feature_names),
            "dropout_p_embed": self.dropout_p_embed,
            "dropout_p_hidden": self.dropout_p_hidden,
            "final_act": self.final_act,
            "elu_param": self.elu_param,
            "session_memory": self.session_slots,
            "memory_gate": self.memory_gate,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int | None = None) -> PRNN:
        """The model of ``config_dict()``; ``seed`` seeds the global generator first (the
        model initialises from it)."""
        if seed is not None:
            torch.manual_seed(seed)
        return cls(**config)

    def param_groups(self) -> dict[str, list[Tensor]]:
        """Trainable parameters per subnet (its input, GRU and output block).

        The shared output bias belongs to the id subnet where there is one, else to the first
        subnet: the residual schedule fixes it with the id subnet.
        """
        groups: dict[str, list[Tensor]] = {k: [] for k in self.subnets}
        for k in self.subnets:
            groups[k] += list(self.G[k].parameters()) + list(self.Wy[k].parameters())
        if "id" in groups:
            groups["id"].append(self.E.weight)
        if "concat" in groups:
            groups["concat"].append(self.E.weight)
        groups[self.subnets[0]].append(self.By.weight)
        return groups

    def set_active(self, names: Sequence[str] | None) -> None:
        """Only these subnets contribute to the scores (None: all of them)."""
        on = [1.0 if names is None or k in names else 0.0 for k in self.subnets]
        self.active.copy_(torch.tensor(on))

    def initial_user_state(self, batch_size: int) -> None:
        return None

    def initial_state(self, user_state: Tensor | None, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, self.state_dim, device=self.device)

    def end_session(self, user_state: Tensor | None, final_state: Tensor) -> Tensor | None:
        return user_state

    # ------------------------------------------------------------- compute
    def _inputs(self, rows: Tensor) -> dict[str, Tensor]:
        drop = self.dropout_p_embed
        feats = [getattr(self, f"feat_{i}")[rows] for i in range(len(self.feature_dims))]
        xs: dict[str, Tensor] = {}
        if "id" in self.subnets or "concat" in self.subnets:
            e = self.E(rows)
            if "concat" in self.subnets:
                xs["concat"] = nn.functional.dropout(torch.cat([e, *feats], 1), drop, self.training)
            else:
                xs["id"] = nn.functional.dropout(e, drop, self.training)
        for i, f in enumerate(feats):
            if f"f{i}" in self.subnets:
                xs[f"f{i}"] = nn.functional.dropout(f, drop, self.training)
        return xs

    def split_state(self, state: Tensor) -> dict[str, Tensor]:
        """The subnets' parts of states (or of outputs)."""
        parts = state[:, : self.hidden_dim].split(self.sizes, dim=1)
        return dict(zip(self.subnets, parts, strict=True))

    def forward_step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(new_state, output); rows < 0 keep their state. Output = the new subnets' states (the
        new state without its session memory)."""
        known = item_rows >= 0
        xs = self._inputs(item_rows.clamp(min=0))
        hs = self.split_state(state)
        new = []
        for k in self.subnets:
            h = self.G[k](xs[k], hs[k])
            new.append(nn.functional.dropout(h, self.dropout_p_hidden, self.training))
        if self.session_slots:
            new.append(push_recent(self.memory_of(state), item_rows))
        out = torch.cat(new, 1) if len(new) > 1 else new[0]
        out = torch.where(known.unsqueeze(1), out, state)
        return out, self.output(out)

    def output(self, state: Tensor) -> Tensor:
        """What the output layer reads: the subnets' states."""
        return state[:, : self.hidden_dim] if self.session_slots else state

    def score_items(
        self, output: Tensor, user_state: Tensor | None = None, item_rows: Tensor | None = None
    ) -> Tensor:
        """Scores of all items (or of ``item_rows``) from the concatenated hidden states (the
        network trained: no session memory, see :meth:`score_all`)."""
        return self.final_activation(self._raw_scores(output, item_rows))

    def _raw_scores(self, output: Tensor, item_rows: Tensor | None) -> Tensor:
        """:meth:`score_items` before the final activation."""
        hs = self.split_state(output)
        b = self.By.weight if item_rows is None else self.By(item_rows)
        scores = b.T.expand(output.shape[0], -1)
        for j, k in enumerate(self.subnets):
            wy = self.Wy[k]
            assert isinstance(wy, nn.Embedding)  # self.Wy holds embeddings only
            w = wy.weight if item_rows is None else wy(item_rows)
            scores = scores + (self.w[j] * self.active[j]) * (hs[k] @ w.T)
        return scores

    # ------------------------------------------------------------- session memory
    def session_memory(self) -> SessionMemory | None:
        """The session memory's rule over this model's offsets (None: ``session_memory=0``)."""
        return session_memory_of(self, "session_memory_") if self.session_slots else None

    def memory_of(self, state: Tensor) -> Tensor:
        """The session memory part of states ``[B, K]`` (item row + 1, 0 empty, newest last)."""
        return state[:, self.hidden_dim :]

    def memory_head_inputs(
        self, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """What ``trainer.memory_head`` fits on: the subnets' states, the session memory's
        rows (-1 empty), every item's scores before the offsets and the final activation."""
        out = self.output(state)
        return out, SessionMemory.rows(self.memory_of(state)), self._raw_scores(out, None)

    # ------------------------------------------------------------- inner-product split
    def _out_table(self, k: str) -> Tensor:
        wy = self.Wy[k]
        assert isinstance(wy, nn.Embedding)  # self.Wy holds embeddings only
        return wy.weight

    def item_vectors(self) -> Tensor:
        parts = [self._out_table(k) for k in self.subnets] + [self.By.weight]
        return torch.cat([p.detach() for p in parts], dim=1).float()

    def query_vectors(self, state: Tensor, user_state: Tensor | None = None) -> Tensor:
        hs = self.split_state(state)
        parts = [(self.w[j] * self.active[j]) * hs[k] for j, k in enumerate(self.subnets)]
        return torch.cat([*parts, state.new_ones(state.shape[0], 1)], dim=1)

    def offset_rows(self, user_state: Tensor | None, state: Tensor | None = None) -> Tensor | None:
        """The session memory's items (-1: an empty slot): their scores carry its offsets."""
        if not self.session_slots or state is None:
            return None
        return SessionMemory.rows(self.memory_of(state))

    def score_all(self, state: Tensor, user_state: Tensor | None = None) -> Tensor:
        """Scores of every item from states after a step (what ``step`` returns)."""
        memory = self.session_memory()
        if memory is None:
            return self.score_items(state)
        out = self.output(state)
        scores = memory.add_to_scores(self._raw_scores(out, None), out, self.memory_of(state))
        return self.final_activation(scores)

    def score_rows(self, state: Tensor, user_state: Tensor | None, rows: Tensor) -> Tensor:
        hs = self.split_state(state)
        scores = self.By.weight[rows].squeeze(2)
        for j, k in enumerate(self.subnets):
            dots = torch.bmm(self._out_table(k)[rows], hs[k].unsqueeze(2)).squeeze(2)
            scores = scores + (self.w[j] * self.active[j]) * dots
        memory = self.session_memory()
        if memory is not None:
            scores = memory.add_to_rows(scores, rows, self.output(state), self.memory_of(state))
        return self.final_activation(scores)

    def final_activation(self, scores: Tensor) -> Tensor:
        if self.final_act == "tanh":
            return torch.tanh(scores)
        if self.final_act == "elu":
            return nn.functional.elu(scores, self.elu_param)
        return scores

    def step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        new, _ = self.forward_step(item_rows, state, user_state)
        return new, self.score_all(new)
