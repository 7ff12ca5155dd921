"""Training schedules over a model's parameter groups (``TrainableStepModel.param_groups``).

``joint``: every group at once. ``residual`` (staged): the first group alone for ``n_epochs``
(the others switched off, ``set_active``), then the other groups for ``n_epochs`` on top of it,
frozen. HRNN's groups are ``session`` (GRU4Rec's network) and ``user`` (the user path), so its
residual schedule trains GRU4Rec first, exactly as ``train_gru4rec``, then only what the user
path adds (bench/results/hrnn-staged-memory.md). p-RNN's groups are its subnets:
``alternating`` trains one subnet per epoch (the others frozen; ``n_epochs`` per subnet),
``interleaving`` one subnet per mini-batch, cycling (``n_epochs`` per subnet). A model with one
group or none (HRNN without a user path) always trains jointly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from streamrec.model.api import TrainableModule
from trainer.optim import IndexedAdagradM


@dataclass(frozen=True)
class Stage:
    """One epoch of a schedule: the groups trained (None: all), the groups taking part in the
    step (None: all), and whether the trained groups take turns by mini-batch."""

    train: list[str] | None
    active: list[str] | None
    interleave: bool
    #: what a progress line calls this epoch, e.g. ``stage 2/2 (user), epoch 1/2``
    label: str = field(default="", compare=False)


_JOINT = Stage(None, None, False)


def schedule_plan(model: TrainableModule, schedule: str, n_epochs: int) -> list[Stage]:
    """The stage of every epoch of ``schedule`` (see the module docstring), each labelled:
    a staged schedule runs ``n_epochs`` per stage, and the labels say so."""
    groups = list(model.param_groups())
    if schedule == "joint" or len(groups) <= 1:
        return [replace(_JOINT, label=f"epoch {e + 1}/{n_epochs}") for e in range(n_epochs)]
    if schedule == "residual":
        first, rest = groups[:1], groups[1:]
        return [
            Stage(first if s == 0 else rest, first if s == 0 else None, False,
                  f"stage {s + 1}/2 ({', '.join(first if s == 0 else rest)}), "
                  f"epoch {e + 1}/{n_epochs}")
            for s in range(2) for e in range(n_epochs)
        ]  # fmt: skip
    total = n_epochs * len(groups)
    if schedule == "alternating":
        return [
            Stage([groups[e % len(groups)]], None, False,
                  f"epoch {e + 1}/{total} (subnet {groups[e % len(groups)]}, its epoch "
                  f"{e // len(groups) + 1}/{n_epochs})")
            for e in range(total)
        ]  # fmt: skip
    if schedule == "interleaving":
        return [
            Stage(groups, None, True, f"epoch {e + 1}/{total} (subnets take turns by batch)")
            for e in range(total)
        ]
    raise ValueError(f"unknown schedule {schedule!r}")


def set_trainable(
    model: TrainableModule, names: Sequence[str] | None
) -> list[tuple[Tensor, Tensor]]:
    """Train only the parameter groups ``names`` (None: all); returns the gradient masks of
    parameters the model trains in part for them (``grad_masks``: HRNN-all's first layer)."""
    groups = model.param_groups()
    on = set(groups) if names is None else set(names)
    for k, ps in groups.items():
        for p in ps:
            p.requires_grad_(k in on)
    masks: list[tuple[Tensor, Tensor]] = []
    if names is not None:
        masks = model.grad_masks(list(names))
        for p, _ in masks:
            p.requires_grad_(True)
    return masks


def start_stage(
    model: TrainableModule, names: Sequence[str] | None, opt: IndexedAdagradM
) -> list[tuple[Tensor, Tensor]]:
    """Train only the groups ``names`` from now on; returns the gradient masks. The frozen
    entries of a partly trained parameter also lose their momentum, or it would move them."""
    masks = set_trainable(model, names)
    for q, mask in masks:
        if q in opt.mom:
            opt.mom[q].mul_(mask)
    return masks
