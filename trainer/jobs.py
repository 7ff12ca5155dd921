"""What ``trainer train`` hands a model's trainer, and what it gets back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from streamrec.model.api import RegisteredModel

#: an evaluator: (model, test_df, item_index, ks, ties, device, train_df) -> metrics
Evaluator = Callable[..., dict[str, float]]


@dataclass
class TrainJob:
    """Everything ``trainer train`` knows; a model's trainer takes what it needs."""

    train_df: pd.DataFrame
    preset: str | None
    params: list[str]
    options: dict[str, Any] = field(default_factory=dict)  # --variant, --features, ...
    progress: bool = True


@dataclass
class TrainOutcome:
    model: RegisteredModel
    model_name: str
    item_ids: list[str]
    stats: dict[str, Any]
    train_params: dict[str, Any]
