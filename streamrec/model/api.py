"""The step API every served model implements (see docs/architecture.md, "The step API").

``StepModel`` is the contract the workers and the evaluators program against.
``SplitStepModel`` is the finer split of models whose step is "advance the state, then score
all items from it" (GRU4Rec): a worker can then advance states click by click and score a
whole batch in one matmul. A model declares the split by subclassing it; nothing probes for
attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, Self

import torch
from torch import Tensor


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

    def config_dict(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


class ModelClass(Protocol):
    """A registered model class, seen through the constructor the registry calls."""

    def from_config(self, config: dict[str, Any]) -> RegisteredModel: ...


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
