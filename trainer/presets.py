"""Training parameters with the official GRU4Rec names, ``key=value`` parsing and presets.

The presets are the published best parameter files of the official PyTorch implementation
(hidasib/GRU4Rec_PyTorch_Official, ``paramfiles/*.py``), copied value by value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Self

from streamrec.errors import StreamrecError
from streamrec.model.session_memory import MAX_SESSION_MEMORY
from trainer.losses import LOSSES


class ParamError(StreamrecError, ValueError):
    """An unknown training parameter or an invalid value (the message names it)."""


_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_FINAL_ACTS = ("", "linear", "tanh", "elu")


@dataclass
class BaseParams:
    """Training parameters shared by GRU4Rec, HRNN and p-RNN (official GRU4Rec names).

    Per-model subclasses (:class:`TrainParams` here, ``HRNNParams`` / ``PRNNParams`` in
    ``trainer.hier.params``) only add fields or override defaults. One validation path
    (:meth:`validate`, which checks every field by its name) and one ``key=value`` parser
    (:meth:`make`) serve all of them.
    """

    loss: str = "cross-entropy"
    batch_size: int = 64
    n_epochs: int = 10
    learning_rate: float = 0.05
    momentum: float = 0.0
    n_sample: int = 2048
    sample_alpha: float = 0.5
    bpreg: float = 1.0
    logq: float = 0.0
    seed: int = 42
    device: str = "auto"
    elu_param: float = 0.5
    # not in the official files
    final_act: str = ""  # "" = as the official code: ELU(elu_param) for bpr-max if elu_param > 0

    #: field -> allowed values (subclasses extend it)
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {"loss": LOSSES, "final_act": _FINAL_ACTS}
    #: presets this class accepts (name -> values; keys the class lacks are skipped)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    MIN_EPOCHS: ClassVar[int] = 1

    def validate(self) -> Self:
        """Check every field by its name; raises ParamError naming the first bad one."""
        for f in fields(self):
            name, v = f.name, getattr(self, f.name)
            if name in self.CHOICES and v not in self.CHOICES[name]:
                allowed = ", ".join(repr(c) for c in self.CHOICES[name])
                raise ParamError(f"{name}={v!r}: must be one of {allowed}")
            if name == "batch_size" and v < 1:
                raise ParamError(f"{name}={v}: must be >= 1")
            if name == "n_epochs" and v < self.MIN_EPOCHS:
                raise ParamError(f"{name}={v}: must be >= {self.MIN_EPOCHS}")
            if name == "memory_holdout" and not 0.0 <= v < 1.0:
                raise ParamError(f"{name}={v}: must be in [0, 1)")
            if name == "session_memory" and v > MAX_SESSION_MEMORY:
                raise ParamError(f"{name}={v}: must be <= {MAX_SESSION_MEMORY}")
            if name == "learning_rate" and v <= 0:
                raise ParamError(f"learning_rate={v}: must be > 0")
            if name.startswith("dropout_p_") and not 0.0 <= v < 1.0:
                raise ParamError(f"{name}={v}: must be in [0, 1)")
            if name in ("layers", "user_layers") and (not v or any(h < 1 for h in v)):
                raise ParamError(f"{name}={v}: need one or more positive sizes")
            if isinstance(v, bool) or name == "seed":
                continue
            if isinstance(v, (int, float)) and v < 0:
                raise ParamError(f"{name}={v}: must be >= 0")
        return self

    def resolved_final_act(self) -> str:
        if self.final_act:
            return self.final_act
        return "elu" if self.loss == "bpr-max" and self.elu_param > 0 else "linear"

    def resolved_elu_param(self) -> float:
        return self.elu_param if self.elu_param > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def make(
        cls,
        preset: str | None = None,
        overrides: dict[str, Any] | list[str] | tuple[str, ...] | None = None,
    ) -> Self:
        """Defaults <- preset <- overrides (``{"key": value}`` or ``["key=value", ...]``)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        if preset:
            if preset not in cls.PRESETS:
                raise ParamError(
                    f"unknown preset {preset!r} (known: {', '.join(sorted(cls.PRESETS))})"
                )
            values.update({k: v for k, v in cls.PRESETS[preset].items() if k in known})
        if overrides:
            if isinstance(overrides, dict):
                items = list(overrides.items())
            else:
                items = [parse_kv(s, known) for s in overrides]
            for k, v in items:
                if k not in known:
                    raise ParamError(f"unknown parameter {k!r} (known: {', '.join(sorted(known))})")
                values[k] = v
        converted = {k: _convert(k, v, str(known[k].type)) for k, v in values.items()}
        return cls(**converted).validate()


@dataclass
class TrainParams(BaseParams):
    """GRU4Rec training parameters (official names, official class defaults)."""

    layers: list[int] = field(default_factory=lambda: [100])
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.0
    constrained_embedding: bool = True
    embedding: int = 0
    # not in the official files
    nesterov: bool = False
    cuda_graph: bool = False  # capture the training step as a CUDA graph (CUDA only)
    sample_cache_max_size: int = 10_000_000
    # the session-memory head (streamrec.model.session_memory, trainer.memory_head);
    # session_memory=0 is the paper's model (the ``*_paper`` presets)
    session_memory: int = 64  # the session's last K distinct items get a fitted score offset
    memory_gate: bool = True  # the offsets are also a linear function of the hidden state
    memory_holdout: float = 0.1  # share of sessions held out of all but the last epoch (the fit)


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
#: the authors' model with each published file, without the session memory (the parity check)
PRESETS.update({f"{name}_paper": {**v, "session_memory": 0} for name, v in list(PRESETS.items())})

TrainParams.PRESETS = PRESETS


def _convert(key: str, value: Any, typ: str) -> Any:
    """``value`` (a string from the command line, or already typed) as the field's type."""
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            v = _BOOL.get(str(value).strip().lower())
            if v is None:
                raise ValueError("expected True/False/1/0")
            return v
        if typ.startswith("list["):
            elem = {"list[int]": int, "list[float]": float}.get(typ, str)
            if isinstance(value, (list, tuple)):
                parts = list(value)
            else:  # official syntax "100/100"; commas accepted too
                parts = [x for x in str(value).replace(",", "/").strip("[] ").split("/")]
            parts = [x.strip() if isinstance(x, str) else x for x in parts]
            parts = [x for x in parts if x != ""]
            if elem is int:
                return [_as_int(x) for x in parts]
            return [elem(x) for x in parts]
        if typ == "int":
            return _as_int(value)
        if typ == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ParamError(f"invalid value for parameter {key!r}: {value!r} ({e})") from None


def _as_int(value: Any) -> int:
    f = float(value)
    if f != int(f):
        raise ValueError("expected an integer")
    return int(f)


def make_params(
    preset: str | None = None,
    overrides: dict[str, Any] | list[str] | tuple[str, ...] | None = None,
) -> TrainParams:
    """GRU4Rec parameters: defaults <- preset <- overrides (see :meth:`BaseParams.make`)."""
    return TrainParams.make(preset, overrides)


def parse_kv(text: str, known: Any = None) -> tuple[str, str]:
    """``"key=value"`` -> ``(key, value)`` (``known``: the accepted keys, default GRU4Rec's)."""
    known = TrainParams.field_names() if known is None else known
    if "=" not in text:
        raise ParamError(f"parameter {text!r} is not of the form key=value")
    k, v = text.split("=", 1)
    k = k.strip()
    if k not in known:
        raise ParamError(f"unknown parameter {k!r} (known: {', '.join(sorted(known))})")
    return k, v.strip()
