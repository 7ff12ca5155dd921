"""The step API every served model implements (see docs/architecture.md, "The step API").

``StepModel`` is the contract the workers and the evaluators program against.
``SplitStepModel`` is the finer split of models whose step is "advance the state, then score
all items from it" (GRU4Rec): a worker can then advance states click by click and score a
whole batch in one matmul. ``TrainableStepModel`` is what the user-aware trainer
(``trainer.hier``) trains (HRNN, p-RNN): the step split for training, and the parts a staged
schedule trains in turn. A model declares a split by subclassing it; nothing probes for
attributes. ``TrainableModule`` is how the trainer types such a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from streamrec.model.session_memory import SessionMemory

#: an item table's rows gathered into a leaf for one training step: ``(table, rows, leaf)``;
#: the leaf's gradient is the table's row-sparse gradient (``trainer.optim.IndexedAdagradM``)
SparseLeaf = tuple[nn.Parameter, Tensor, Tensor]


class StepModel(Protocol):
    """The step API. All tensors on the model's device; callers use ``inference_mode``."""

    # read-only properties, so that a model may declare them as attributes or properties
    @property
    def n_items(self) -> int: ...
    @property
    def state_dim(self) -> int: ...
    @property
    def user_state_dim(self) -> int: ...

    def initial_user_state(self, batch_size: int) -> Tensor | None: ...
    def initial_state(self, user_state: Tensor | None, batch_size: int) -> Tensor: ...
    def step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None
    ) -> tuple[Tensor, Tensor]: ...
    def end_session(self, user_state: Tensor | None, final_state: Tensor) -> Tensor | None: ...


class StepModule(StepModel, Protocol):
    """A step-API ``torch.nn.Module``: what
    :class:`streamrec.serving.served_model.ServingModel` serves.

    Python has no intersection type, so the module methods serving calls are listed here.
    """

    def to(self, device: torch.device | str) -> Self: ...
    def eval(self) -> Self: ...
    def named_parameters(self) -> Iterator[tuple[str, Tensor]]: ...
    def named_buffers(self) -> Iterator[tuple[str, Tensor]]: ...


class RegisteredModel(StepModule, Protocol):
    """A model class of ``streamrec.model.MODEL_REGISTRY``: a step module with a JSON config,
    saved and loaded through its ``state_dict`` (see ``streamrec.model.checkpoint``)."""

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int | None = None) -> Self:
        """The model of a ``config_dict()``, initialised afresh (seeded by ``seed``)."""
        ...

    def config_dict(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


class ModelClass(Protocol):
    """A registered model class, seen through the constructor the registry calls."""

    def from_config(self, config: dict[str, Any], seed: int | None = None) -> RegisteredModel: ...


class SplitStepModel:
    """Mixin of session-only models whose step is ``advance`` followed by scoring.

    ``step(rows, state)`` must equal ``(advance(rows, state), state_scorer()(new_state))``.
    """

    def advance(self, item_rows: Tensor, state: Tensor) -> Tensor:
        """The new states only; ``item_rows[i] < 0`` keeps state i unchanged."""
        raise NotImplementedError

    def state_scorer(
        self, dtype: torch.dtype = torch.float32, *, copy: bool = False
    ) -> Callable[[Tensor], Tensor]:
        """A function from states ``[B, state_dim]`` to scores ``[B, n_items]`` for inference.

        ``copy=True`` (or a ``dtype`` other than the weights') freezes a contiguous copy of
        the output weights in ``dtype``: faster on CPU than a transposed view, and bf16 is
        several times faster where the hardware has bf16 dot products (scores then differ in
        the third significant digit, which can reorder near-ties). The copy does not follow
        later weight updates: build a new scorer after training.
        """
        raise NotImplementedError

    def state_topk(
        self, dtype: torch.dtype = torch.float32
    ) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
        """``(states, k) -> (values, rows)``: the top-k of ``state_scorer(dtype, copy=True)``
        without a full score matrix where the model can (default: through it)."""
        score = self.state_scorer(dtype, copy=True)
        return lambda state, k: torch.topk(score(state), k, dim=1)


class InnerProductScores:
    """Mixin of models whose scores are an inner product per item, so that the top items of
    a state can be found without scoring every item (``streamrec.model.retrieval``).

    The contract: the score of item ``i`` for a state is
    ``act(query_vectors(state, user)[b] . item_vectors()[i] + offset(b, i))`` where ``act`` is
    increasing (linear, tanh, ELU) and ``offset(b, i)`` is nonzero only for the rows
    ``offset_rows(user, state)[b]`` (HRNN's memory of a user's items, GRU4Rec's session
    memory). The output bias is folded into the vectors (its item column against a query
    column of ones), so ranking by the inner product ranks as the model does, except for the
    offset rows, which a retrieval must therefore always score exactly. ``state`` is a state
    after the step (what ``step`` scores), ``user`` the user state the step was given.
    """

    def item_vectors(self) -> Tensor:
        """``[n_items, D]`` float32: each item's output row(s) with its bias as the last column."""
        raise NotImplementedError

    def query_vectors(self, state: Tensor, user_state: Tensor | None) -> Tensor:
        """``[B, D]``: what each state multiplies the item vectors by (last column 1)."""
        raise NotImplementedError

    def offset_rows(self, user_state: Tensor | None, state: Tensor | None = None) -> Tensor | None:
        """``[B, K]`` item rows whose score the inner product does not give (-1: none), or None:
        from the user state (HRNN's memory) or the session state after the step (GRU4Rec's)."""
        return None

    def score_all(self, state: Tensor, user_state: Tensor | None) -> Tensor:
        """The model's scores ``[B, n_items]`` of every item (what ``step`` returns)."""
        raise NotImplementedError

    def final_activation(self, scores: Tensor) -> Tensor:
        """The increasing function applied to the inner products (identity by default)."""
        return scores

    def score_rows(self, state: Tensor, user_state: Tensor | None, rows: Tensor) -> Tensor:
        """Exact scores ``[B, C]`` of ``rows[b]`` (``[B, C]``, valid rows) for state ``b``: the
        model's own scores of those items, final activation and offsets included."""
        raise NotImplementedError


class TrainableStepModel:
    """Mixin of the models ``trainer.hier`` trains (HRNN, p-RNN).

    ``forward_step`` is the step without scoring and ``score_items`` scores chosen item rows
    (a target and sampled negatives) from its output; ``step`` must equal the two in turn
    (scoring every item), plus the session memory's offsets where the model has one
    (``session_memory``: not trained with the network, fitted apart by ``trainer.memory_head``
    on ``memory_head_inputs``). The other methods have defaults a model overrides where it has
    the part: ``train_step`` with row-sparse item tables (HRNN; default: ``forward_step`` then
    ``score_items``, every gradient dense), the parameter groups of a staged schedule
    (``param_groups``; default none: the model always trains as a whole), the session memory
    (default none).
    """

    def forward_step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``(new state, output)``: the step without scores; ``item_rows[i] < 0`` keeps state i."""
        raise NotImplementedError

    def score_items(
        self, output: Tensor, user_state: Tensor | None = None, item_rows: Tensor | None = None
    ) -> Tensor:
        """Scores ``[B, n]`` of every item, or of ``item_rows``, from ``forward_step``'s output."""
        raise NotImplementedError

    def train_step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None, out_rows: Tensor
    ) -> tuple[Tensor, Tensor, list[SparseLeaf]]:
        """One training step: ``(new state, scores of out_rows, sparse leaves)``; the leaves
        carry the gradients of the tables of :meth:`sparse_tables` (none by default)."""
        new, out = self.forward_step(item_rows, state, user_state)
        return new, self.score_items(out, user_state, out_rows), []

    def sparse_tables(self) -> list[nn.Parameter]:
        """The item tables :meth:`train_step` updates row-sparsely (their rows in its leaves)."""
        return []

    def param_groups(self) -> dict[str, list[Tensor]]:
        """Named parts a staged schedule trains in turn (none: the model trains as a whole)."""
        return {}

    def grad_masks(self, groups: Sequence[str]) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, 0/1 mask)`` of parameters that only ``groups`` train in part."""
        return []

    def set_active(self, names: Sequence[str] | None) -> None:
        """Only the parts ``names`` (None: all) take part in the step (no-op by default)."""

    def session_memory(self) -> SessionMemory | None:
        """The session memory's rule over the model's offsets (None: no session memory)."""
        return None

    def session_memory_parameters(self) -> list[Tensor]:
        """The session memory's offsets: fitted apart, never by the training optimiser."""
        memory = self.session_memory()
        return [] if memory is None else memory.parameters()

    def memory_head_inputs(
        self, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """What ``trainer.memory_head`` fits on (see its ``MemoryHeadModel``)."""
        raise NotImplementedError


class TrainableModule(StepModule, Protocol):
    """How the trainer types a :class:`TrainableStepModel` ``torch.nn.Module`` (Python has no
    intersection type, so the mixin's methods and the module's are listed here)."""

    training: bool

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...
    def train(self, mode: bool = True) -> Self: ...
    def forward_step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None
    ) -> tuple[Tensor, Tensor]: ...
    def score_items(
        self, output: Tensor, user_state: Tensor | None = None, item_rows: Tensor | None = None
    ) -> Tensor: ...
    def train_step(
        self, item_rows: Tensor, state: Tensor, user_state: Tensor | None, out_rows: Tensor
    ) -> tuple[Tensor, Tensor, list[SparseLeaf]]: ...
    def sparse_tables(self) -> list[nn.Parameter]: ...
    def param_groups(self) -> dict[str, list[Tensor]]: ...
    def grad_masks(self, groups: Sequence[str]) -> list[tuple[Tensor, Tensor]]: ...
    def set_active(self, names: Sequence[str] | None) -> None: ...
    def session_memory(self) -> SessionMemory | None: ...
    def session_memory_parameters(self) -> list[Tensor]: ...
    def memory_head_inputs(
        self, state: Tensor, user_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]: ...


def as_trainable(model: object) -> TrainableModule:
    """``model`` as the trainer types it; ``TypeError`` unless it is a ``torch.nn.Module`` that
    declares :class:`TrainableStepModel`."""
    if not isinstance(model, TrainableStepModel) or not isinstance(model, nn.Module):
        raise TypeError(f"{type(model).__name__} is not a trainable step model")
    return cast(TrainableModule, model)  # checked above: the declared mixin on a module
