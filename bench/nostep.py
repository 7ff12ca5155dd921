"""Benchmark reference: the serving pipeline with the model step removed.

``NoStepServingModel`` passes states through and answers the first k items with zero scores,
so what a run with it costs is everything but the model. ``python bench/nostep.py ARGS`` is
``streamrec worker ARGS`` serving such a model (the serve bench's "nostep" phase).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamrec.serving.served_model import ModelHolder, ServingModel, StepOutput


class NoStepServingModel(ServingModel):
    """Benchmark reference: the same pipeline with the model step removed (states pass
    through, the top-k is the first k items with zero scores)."""

    def step(
        self, rows: np.ndarray, states: np.ndarray, users: np.ndarray | None, k: int | None = None
    ) -> StepOutput:
        k = self.top_k if k is None else min(k, self.n_items)
        b = len(rows)
        top = np.broadcast_to(np.arange(k, dtype=np.int64), (b, k))
        return StepOutput(states, top, np.zeros((b, k), dtype=np.float32))

    @classmethod
    def wrap(cls, model: ServingModel) -> NoStepServingModel:
        out = cls.__new__(cls)
        out.__dict__.update(model.__dict__)
        out.version = f"{model.version}-nostep"
        out.split = False
        return out


def main() -> None:
    import streamrec.cli.commands as commands

    load = commands.load_model_holder

    def load_without_step(*args: Any, **kwargs: Any) -> ModelHolder:
        return ModelHolder(NoStepServingModel.wrap(load(*args, **kwargs).current))

    commands.load_model_holder = load_without_step  # the worker command, with this model
    commands.worker.main(prog_name="nostep-worker")


if __name__ == "__main__":
    main()
