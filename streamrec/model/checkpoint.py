"""Atomic, pickle-free checkpoint directories: ``model.safetensors`` + ``checkpoint.json``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

from streamrec.errors import StreamrecError
from streamrec.model import build_model
from streamrec.model.api import RegisteredModel

FORMAT = "streamrec-checkpoint"
FORMAT_VERSION = 1
TENSORS = "model.safetensors"
META = "checkpoint.json"
_REQUIRED = ("format", "version", "model_name", "model_config", "item_ids", "tensor_sha256")


class CheckpointError(StreamrecError):
    """A checkpoint directory is missing, corrupted or does not match its model."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on the requested device) and its metadata."""

    model: RegisteredModel
    model_name: str
    version: str
    item_ids: list[str]
    item_index: dict[str, int]
    model_config: dict[str, Any]
    train_params: dict[str, Any] = field(default_factory=dict)
    data_stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    tensor_sha256: str = ""
    path: Path | None = None


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
    item_ids: list[str],
    train_params: dict[str, Any] | None = None,
    data_stats: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a checkpoint directory atomically (temp dir beside ``path``, then rename).

    Returns the final path.  ``item_ids[row]`` is the item id of model row ``row``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    n_items = getattr(model, "n_items", None)
    if n_items is not None and n_items != len(item_ids):
        raise CheckpointError(f"model has {n_items} item rows but {len(item_ids)} item ids given")
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
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=1, default=_json_default)
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
    return target


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is not a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks fields: {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {meta['format']!r}")
    if not isinstance(meta["item_ids"], list) or not isinstance(meta["model_config"], dict):
        raise CheckpointError(f"{meta_path}: item_ids must be a list, model_config an object")
    return meta


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; raises :class:`CheckpointError` on any mismatch."""
    p = Path(path)
    meta = read_metadata(p)
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
    if digest != meta["tensor_sha256"]:
        raise CheckpointError(
            f"{tpath}: sha256 mismatch (file {digest[:12]}…, recorded "
            f"{str(meta['tensor_sha256'])[:12]}…): corrupted or truncated"
        )
    try:
        tensors = load_tensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tpath}: unreadable tensor file: {e}") from e
    try:
        model = build_model(meta["model_name"], meta["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{p}: cannot build model from its config: {e}") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{p}: tensor names do not match the model (missing {missing}, unexpected {extra})"
        )
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape) or tensors[k].dtype != v.dtype:
            raise CheckpointError(
                f"{p}: tensor {k!r} has shape {tuple(tensors[k].shape)} {tensors[k].dtype}, "
                f"the config implies {tuple(v.shape)} {v.dtype}"
            )
    n_items = getattr(model, "n_items", None)
    if n_items is not None and n_items != len(meta["item_ids"]):
        raise CheckpointError(
            f"{p}: model has {n_items} item rows but the item index has {len(meta['item_ids'])}"
        )
    model.load_state_dict(tensors, strict=True)
    model.to(device)
    model.eval()
    item_ids = [str(i) for i in meta["item_ids"]]
    index = {iid: row for row, iid in enumerate(item_ids)}
    if len(index) != len(item_ids):
        raise CheckpointError(f"{p}: duplicate item ids in the item index")
    return Checkpoint(
        model=model,
        model_name=meta["model_name"],
        version=str(meta["version"]),
        item_ids=item_ids,
        item_index=index,
        model_config=meta["model_config"],
        train_params=meta.get("train_params", {}),
        data_stats=meta.get("data_stats", {}),
        metrics=meta.get("metrics", {}),
        created_at=meta.get("created_at", ""),
        tensor_sha256=digest,
        path=p,
    )
