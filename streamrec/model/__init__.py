"""Model registry: checkpoints name their model class here and are rebuilt through it."""

from __future__ import annotations

from typing import Any

from streamrec.model.api import ModelClass, RegisteredModel
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.model.hrnn import HRNN
from streamrec.model.prnn import PRNN

MODEL_REGISTRY: dict[str, ModelClass] = {
    "gru4rec": GRU4Rec,
    "hrnn": HRNN,
    "prnn": PRNN,
}


def build_model(name: str, config: dict[str, Any]) -> RegisteredModel:
    """Instantiate a registered model from its ``config_dict()``."""
    try:
        cls = MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unknown model {name!r} (known: {known})") from None
    return cls.from_config(dict(config))


__all__ = ["HRNN", "MODEL_REGISTRY", "PRNN", "GRU4Rec", "GRU4RecConfig", "build_model"]
