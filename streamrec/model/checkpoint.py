"""Atomic, pickle-free checkpoint directories: ``model.safetensors`` + ``checkpoint.json``.

``checkpoint.json`` is one self-describing record, :class:`CheckpointRecord`: written and
returned by :func:`save_checkpoint`, read by :func:`read_checkpoint_record`, carried by a loaded
:class:`Checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from streamrec.errors import StreamrecError
from streamrec.model import build_model
from streamrec.model.api import RegisteredModel
from streamrec.model.gate import HOLDOUT_KEY, HOLDOUT_METRIC

FORMAT = "streamrec-checkpoint"
FORMAT_VERSION = 1
TENSORS = "model.safetensors"
META = "checkpoint.json"
_REQUIRED = ("format", "version", "model_name", "model_config", "item_ids", "tensor_sha256")


class CheckpointError(StreamrecError):
    """A checkpoint directory is missing, corrupted or does not match its model."""


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint's ``checkpoint.json``: everything it says about itself but the tensors,
    read or written once. :func:`save_checkpoint` returns it, :func:`read_checkpoint_record`
    reads it back, :func:`load_checkpoint` loads the model it describes; the model registry
    and the workers take it as it is instead of reading the file again."""

    path: Path  # the checkpoint directory (not in the JSON)
    version: str  # <created UTC>-<first 12 hex digits of tensor_sha256>
    model_name: str  # a name of streamrec.model.MODEL_REGISTRY
    model_config: Mapping[str, Any]
    item_ids: tuple[str, ...]  # item_ids[row]: the item id of model row ``row``
    tensor_sha256: str
    created_at: str = ""
    train_params: Mapping[str, Any] = field(default_factory=dict)
    data_stats: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def holdout_sessions(self) -> list[list[str]] | None:
        """The held-out slice a worker's gate checks the model on (``trainer.holdout``)."""
        sessions = self.data_stats.get(HOLDOUT_KEY)
        return list(sessions) if sessions else None

    @property
    def holdout_recall(self) -> float | None:
        """The trainer's Recall@20 on that slice: what the worker's figure is gated against."""
        value = self.metrics.get(HOLDOUT_METRIC)
        return None if value is None else float(value)

    def same_model(self, other: CheckpointRecord) -> bool:
        """Whether ``other`` describes the same model: class, config, item index and
        tensors (the version name, times, metrics and statistics aside)."""
        return (
            self.tensor_sha256 == other.tensor_sha256
            and self.model_name == other.model_name
            and dict(self.model_config) == dict(other.model_config)
            and self.item_ids == other.item_ids
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``checkpoint.json`` (the same keys and order as ever)."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "version": self.version,
            "model_name": self.model_name,
            "model_config": dict(self.model_config),
            "train_params": dict(self.train_params),
            "item_ids": list(self.item_ids),
            "data_stats": dict(self.data_stats),
            "metrics": dict(self.metrics),
            "created_at": self.created_at,
            "tensor_sha256": self.tensor_sha256,
        }

    @classmethod
    def from_json(cls, meta: object, path: Path) -> CheckpointRecord:
        """Validate a parsed ``checkpoint.json`` of the directory ``path``."""
        where = path / META
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where} is not a JSON object")
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise CheckpointError(f"{where} lacks fields: {', '.join(missing)}")
        if meta["format"] != FORMAT:
            raise CheckpointError(f"{where}: unknown format {meta['format']!r}")
        if not isinstance(meta["item_ids"], list) or not isinstance(meta["model_config"], dict):
            raise CheckpointError(f"{where}: item_ids must be a list, model_config an object")
        try:
            format_version = int(meta.get("format_version", FORMAT_VERSION))
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: format_version is not a number") from None
        return cls(
            path=path,
            version=str(meta["version"]),
            model_name=str(meta["model_name"]),
            model_config=meta["model_config"],
            item_ids=tuple(str(i) for i in meta["item_ids"]),
            tensor_sha256=str(meta["tensor_sha256"]),
            created_at=str(meta.get("created_at", "")),
            train_params=meta.get("train_params") or {},
            data_stats=meta.get("data_stats") or {},
            metrics=meta.get("metrics") or {},
            format_version=format_version,
        )


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on the requested device) and its record."""

    model: RegisteredModel
    record: CheckpointRecord
    item_ids: list[str]
    item_index: dict[str, int]  # item id -> row

    @property
    def model_name(self) -> str:
        return self.record.model_name

    @property
    def version(self) -> str:
        return self.record.version

    @property
    def model_config(self) -> Mapping[str, Any]:
        return self.record.model_config

    @property
    def train_params(self) -> Mapping[str, Any]:
        return self.record.train_params

    @property
    def data_stats(self) -> Mapping[str, Any]:
        return self.record.data_stats

    @property
    def metrics(self) -> Mapping[str, Any]:
        return self.record.metrics

    @property
    def created_at(self) -> str:
        return self.record.created_at

    @property
    def tensor_sha256(self) -> str:
        return self.record.tensor_sha256

    @property
    def path(self) -> Path:
        return self.record.path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    model: RegisteredModel,
    model_name: str,
    item_ids: Sequence[str],
    train_params: Mapping[str, Any] | None = None,
    data_stats: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> CheckpointRecord:
    """Write a checkpoint directory atomically (temp dir beside ``path``, then rename).

    Returns its record (``record.path`` is the final path), equal to what
    :func:`read_checkpoint_record` reads back. ``item_ids[row]`` is the item id of model row
    ``row``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if model.n_items != len(item_ids):
        raise CheckpointError(
            f"model has {model.n_items} item rows but {len(item_ids)} item ids given"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tensors = {
            k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
        }
        save_file(tensors, str(tmp / TENSORS))
        with open(tmp / TENSORS, "rb") as f:
            os.fsync(f.fileno())
        digest = _sha256(tmp / TENSORS)
        created = datetime.now(UTC)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": f"{created.strftime('%Y%m%dT%H%M%SZ')}-{digest[:12]}",
            "model_name": model_name,
            "model_config": model.config_dict(),
            "train_params": train_params or {},
            "item_ids": [str(i) for i in item_ids],
            "data_stats": data_stats or {},
            "metrics": metrics or {},
            "created_at": created.isoformat(),
            "tensor_sha256": digest,
        }
        text = json.dumps(meta, indent=1, default=_json_default)
        with open(tmp / META, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            if not overwrite:
                raise CheckpointError(f"{target} exists")
            # Swap: move the old one aside first so the target name is never half-written.
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the record of what was written (numbers as JSON has them), not of the arguments
    return CheckpointRecord.from_json(json.loads(text), target)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.generic, np.ndarray, torch.Tensor)):  # numpy / torch scalars
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_checkpoint_record(path: str | os.PathLike[str]) -> CheckpointRecord:
    """Read and validate ``checkpoint.json`` only (no tensors)."""
    p = Path(path)
    meta_path = p / META
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {p}")
    if not meta_path.is_file():
        raise CheckpointError(f"missing {META} in {p}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable {meta_path}: {e}") from e
    return CheckpointRecord.from_json(meta, p)


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    record: CheckpointRecord | None = None,
) -> Checkpoint:
    """Load and verify a checkpoint; raises :class:`CheckpointError` on any mismatch.

    ``record``: the directory's record, read already (a worker compares its version before it
    loads); the tensors are checked against its hash, so a checkpoint replaced since is
    refused, never mixed."""
    p = Path(path)
    rec = record if record is not None else read_checkpoint_record(p)
    tpath = p / TENSORS
    if not tpath.is_file():
        raise CheckpointError(f"missing {TENSORS} in {p}")
    # One read: the bytes hashed are the bytes loaded. Hashing the file and then loading it
    # by name again let a checkpoint replaced in between load the new weights under the old
    # metadata (tests/streamrec/test_checkpoint.py::test_reader_sees_old_or_new_never_a_mix).
    try:
        data = tpath.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{tpath}: unreadable tensor file: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec.tensor_sha256:
        raise CheckpointError(
            f"{tpath}: sha256 mismatch (file {digest[:12]}…, recorded "
            f"{rec.tensor_sha256[:12]}…): corrupted or truncated"
        )
    # the model the record describes, checked against the file's header (names, shapes,
    # dtypes) before any tensor is loaded, built within a budget set by the file's size
    model = _model_for(rec, _tensor_header(data, tpath), len(data))
    try:
        tensors = load_tensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tpath}: unreadable tensor file: {e}") from e
    model.load_state_dict(tensors, strict=True)
    model.to(device)
    model.eval()
    item_ids = list(rec.item_ids)
    index = {iid: row for row, iid in enumerate(item_ids)}
    if len(index) != len(item_ids):
        raise CheckpointError(f"{p}: duplicate item ids in the item index")
    return Checkpoint(model=model, record=rec, item_ids=item_ids, item_index=index)


#: a model's build may ask tensor factories for at most this multiple of its tensor file's
#: size, plus :data:`BUILD_SLACK_BYTES`: its parameters and buffers (the file's tensors) and
#: the initialisation's temporaries (GRU4Rec's init asks for about 3x its parameters)
BUILD_BUDGET_FACTOR = 4
BUILD_SLACK_BYTES = 64 << 20
#: safetensors' dtype names
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
#: the factories a model's constructor allocates its tensors with, whose sizes the build
#: budget counts (their size is their arguments: ``f(*size)``, ``f(size)``, ``full(size, x)``)
_SIZED_FACTORIES = frozenset(
    {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full}
)


def _tensor_header(data: bytes, tpath: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype name, shape) from a safetensors file's header, nothing loaded."""
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError(f"header of {size} bytes in a file of {len(data)}")
        header = json.loads(data[8 : 8 + size])
        return {
            name: (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{tpath}: unreadable tensor file header: {e}") from e


class _BuildBudget(TorchFunctionMode):
    """While a model is built: refuses, before it is allocated, a tensor that would take the
    bytes its factories were asked for past ``limit``. The JSON of a checkpoint decides what
    is built; the tensor file's size decides how much that may be."""

    def __init__(self, limit: int, where: Path) -> None:
        super().__init__()
        self.limit, self.where, self.requested = limit, where, 0

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _SIZED_FACTORIES:
            size = kwargs.get("size", args[0] if args else ())
            if not isinstance(size, (tuple, list, torch.Size)):  # f(n, m) for f((n, m))
                size = [a for a in args if isinstance(a, (int, np.integer))]
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            self.requested += math.prod(int(d) for d in size) * dtype.itemsize
            if self.requested > self.limit:
                raise CheckpointError(
                    f"{self.where}: the model its {META} describes asks for more than "
                    f"{self.limit >> 20} MB ({tuple(size)} {dtype} at "
                    f"{self.requested >> 20} MB), far more than its tensor file holds: "
                    "the config does not match the tensors"
                )
        return func(*args, **kwargs)


def _model_for(
    rec: CheckpointRecord, header: Mapping[str, tuple[str, tuple[int, ...]]], file_bytes: int
) -> RegisteredModel:
    """The model of the record's config, checked against the tensor file's header (names,
    shapes, dtypes); built within :data:`BUILD_BUDGET_FACTOR` x the file's size."""
    p = rec.path
    try:
        with _BuildBudget(BUILD_BUDGET_FACTOR * file_bytes + BUILD_SLACK_BYTES, p):
            model = build_model(rec.model_name, dict(rec.model_config))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{p}: cannot build model from its config: {e}") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{p}: tensor names do not match the model (missing {missing}, unexpected {extra})"
        )
    for k, v in expected.items():
        dtype, shape = header[k]
        if shape != tuple(v.shape) or dtype != _DTYPE_NAMES.get(v.dtype, str(v.dtype)):
            raise CheckpointError(
                f"{p}: tensor {k!r} has shape {shape} {dtype}, "
                f"the config implies {tuple(v.shape)} {v.dtype}"
            )
    if model.n_items != rec.n_items:
        raise CheckpointError(
            f"{p}: model has {model.n_items} item rows but the item index has {rec.n_items}"
        )
    return model
