"""Training parameters with the official GRU4Rec names, ``key=value`` parsing and presets.

The presets are the published best parameter files of the official PyTorch implementation
(hidasib/GRU4Rec_PyTorch_Official, ``paramfiles/*.py``), copied value by value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trainer.losses import LOSSES


class ParamError(ValueError):
    """An unknown training parameter or an invalid value (the message names it)."""


@dataclass
class TrainParams:
    """GRU4Rec training parameters (official names, official class defaults)."""

    loss: str = "cross-entropy"
    layers: list[int] = field(default_factory=lambda: [100])
    batch_size: int = 64
    n_epochs: int = 10
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.0
    learning_rate: float = 0.05
    momentum: float = 0.0
    n_sample: int = 2048
    sample_alpha: float = 0.5
    bpreg: float = 1.0
    logq: float = 0.0
    constrained_embedding: bool = True
    embedding: int = 0
    elu_param: float = 0.5
    # not in the official files
    final_act: str = ""  # "" = as the official code: ELU(elu_param) for bpr-max if elu_param > 0
    nesterov: bool = False
    cuda_graph: bool = False  # capture the training step as a CUDA graph (CUDA only)
    seed: int = 42
    device: str = "auto"
    sample_cache_max_size: int = 10_000_000

    def validate(self) -> TrainParams:
        if self.loss not in LOSSES:
            raise ParamError(f"loss={self.loss!r}: must be one of {', '.join(LOSSES)}")
        if not self.layers or any(h < 1 for h in self.layers):
            raise ParamError(f"layers={self.layers}: need one or more positive sizes")
        for name in ("batch_size", "n_epochs"):
            if getattr(self, name) < 1:
                raise ParamError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("n_sample", "embedding", "sample_cache_max_size"):
            if getattr(self, name) < 0:
                raise ParamError(f"{name}={getattr(self, name)}: must be >= 0")
        for name in ("dropout_p_embed", "dropout_p_hidden"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ParamError(f"{name}={getattr(self, name)}: must be in [0, 1)")
        if self.learning_rate <= 0:
            raise ParamError(f"learning_rate={self.learning_rate}: must be > 0")
        for name in ("momentum", "bpreg", "logq", "elu_param", "sample_alpha"):
            if getattr(self, name) < 0:
                raise ParamError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.final_act not in ("", "linear", "tanh", "elu"):
            raise ParamError(f"final_act={self.final_act!r}: must be linear, tanh or elu")
        return self

    def resolved_final_act(self) -> str:
        if self.final_act:
            return self.final_act
        return "elu" if self.loss == "bpr-max" and self.elu_param > 0 else "linear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "yoochoose_xe_shared_best": dict(
        loss="cross-entropy", constrained_embedding=True, embedding=0, elu_param=0,
        layers=[480], n_epochs=10, batch_size=48, dropout_p_embed=0.0, dropout_p_hidden=0.2,
        learning_rate=0.07, momentum=0.0, n_sample=2048, sample_alpha=0.2, bpreg=0.0, logq=1.0,
    ),
    "rsc15_xe_shared_100_best": dict(
        loss="cross-entropy", constrained_embedding=True, embedding=0, elu_param=0,
        layers=[100], n_epochs=10, batch_size=32, dropout_p_embed=0.0, dropout_p_hidden=0.4,
        learning_rate=0.2, momentum=0.2, n_sample=2048, sample_alpha=0.5, bpreg=0.0, logq=1.0,
    ),
    "rees46_xe_shared_best": dict(
        loss="cross-entropy", constrained_embedding=True, embedding=0, elu_param=0,
        layers=[512], n_epochs=10, batch_size=240, dropout_p_embed=0.45, dropout_p_hidden=0.0,
        learning_rate=0.065, momentum=0.0, n_sample=2048, sample_alpha=0.5, bpreg=0.0, logq=1.0,
    ),
    "coveo_bprmax_shared_best": dict(
        loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=1,
        layers=[512], n_epochs=10, batch_size=144, dropout_p_embed=0.35, dropout_p_hidden=0.0,
        learning_rate=0.05, momentum=0.4, n_sample=2048, sample_alpha=0.2, bpreg=1.85, logq=0.0,
    ),
    "diginetica_bprmax_shared_best": dict(
        loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=1,
        layers=[512], n_epochs=10, batch_size=128, dropout_p_embed=0.5, dropout_p_hidden=0.3,
        learning_rate=0.05, momentum=0.15, n_sample=2048, sample_alpha=0.3, bpreg=0.9, logq=0.0,
    ),
    "retailrocket_bprmax_shared_best": dict(
        loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=0.5,
        layers=[224], n_epochs=10, batch_size=80, dropout_p_embed=0.5, dropout_p_hidden=0.05,
        learning_rate=0.05, momentum=0.4, n_sample=2048, sample_alpha=0.4, bpreg=1.95, logq=0.0,
    ),
}  # fmt: skip

_FIELDS = {f.name: f for f in fields(TrainParams)}
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(key: str, value: Any) -> Any:
    default = getattr(TrainParams(), key)
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            v = _BOOL.get(str(value).strip().lower())
            if v is None:
                raise ValueError("expected True/False/1/0")
            return v
        if isinstance(default, list):
            if isinstance(value, (list, tuple)):
                return [int(x) for x in value]
            # official syntax "100/100"; commas accepted too
            parts = str(value).replace(",", "/").strip("[] ").split("/")
            return [int(x) for x in parts if x.strip()]
        if isinstance(default, int):
            f = float(value)
            if f != int(f):
                raise ValueError("expected an integer")
            return int(f)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ParamError(f"invalid value for parameter {key!r}: {value!r} ({e})") from None


def make_params(
    preset: str | None = None,
    overrides: dict[str, Any] | list[str] | tuple[str, ...] | None = None,
) -> TrainParams:
    """Defaults <- preset <- overrides (``{"key": value}`` or ``["key=value", ...]``)."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ParamError(f"unknown preset {preset!r} (known: {', '.join(sorted(PRESETS))})")
        values.update(PRESETS[preset])
    if overrides:
        if isinstance(overrides, dict):
            items = list(overrides.items())
        else:
            items = [parse_kv(s) for s in overrides]
        for k, v in items:
            if k not in _FIELDS:
                raise ParamError(f"unknown parameter {k!r} (known: {', '.join(sorted(_FIELDS))})")
            values[k] = v
    converted = {k: _convert(k, v) for k, v in values.items()}
    return TrainParams(**converted).validate()


def parse_kv(text: str) -> tuple[str, str]:
    """``"key=value"`` -> ``(key, value)``."""
    if "=" not in text:
        raise ParamError(f"parameter {text!r} is not of the form key=value")
    k, v = text.split("=", 1)
    k = k.strip()
    if k not in _FIELDS:
        raise ParamError(f"unknown parameter {k!r} (known: {', '.join(sorted(_FIELDS))})")
    return k, v.strip()
