"""Device choice, one rule for the trainer and the workers."""

from __future__ import annotations

import torch

from streamrec.errors import StreamrecError


class DeviceError(StreamrecError, RuntimeError):
    """A device was asked for that this machine does not have."""


def resolve_device(pref: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when present, else CPU. ``cuda`` without CUDA raises
    :class:`DeviceError` instead of failing later inside torch."""
    name = "auto" if pref is None else str(pref)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={name} requested but CUDA is not available")
    return dev
