"""The models the trainer knows: ``--model NAME`` -> its trainer, a checkpoint's model name ->
its evaluator. ``trainer train|evaluate`` (``trainer.cli``) and ``trainer retrain``
(``trainer.retrain``) both look models up here.

A trainer takes a :class:`~trainer.jobs.TrainJob` and returns a
:class:`~trainer.jobs.TrainOutcome`; it refuses an option or data it cannot use with a click
error (``click.UsageError``, ``click.BadParameter``, ``click.ClickException``), which the
command shows and ``trainer retrain`` turns into a ``RetrainError``. An evaluator is an
:data:`~trainer.jobs.Evaluator`; a model without one of its own is evaluated next-item through
the step API.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import click
import pandas as pd
import torch

from streamrec.model.api import StepModel
from streamrec.model.retrieval import Retriever
from trainer import hier
from trainer.data import restrict_to_items
from trainer.jobs import Evaluator, TrainJob, TrainOutcome


def train_gru4rec_job(job: TrainJob) -> TrainOutcome:
    """``trainer train --model gru4rec``."""
    from trainer.presets import ParamError, make_params
    from trainer.train import train_gru4rec

    unused = [k for k, v in job.options.items() if v not in (None, (), [])]
    if unused:
        raise click.UsageError(f"--model gru4rec does not take {', '.join(unused)}")
    try:
        params = make_params(job.preset, job.params)
    except ParamError as e:
        raise click.BadParameter(str(e), param_hint="--param/--preset") from None
    try:
        model, item_ids, stats = train_gru4rec(job.train_df, params, progress=job.progress)
    except ValueError as e:
        raise click.ClickException(f"training failed: {e}") from None
    return TrainOutcome(model, "gru4rec", item_ids, stats, params.to_dict())


def known_items_test(test: pd.DataFrame, item_index: Mapping[str, int]) -> pd.DataFrame:
    """``test`` restricted to the items of ``item_index`` (``trainer.data.restrict_to_items``),
    saying on stderr what that dropped; ValueError when nothing is left."""
    kept = restrict_to_items(test, item_index)
    if len(kept) < len(test):
        dropped = "known items, sessions >= 2 events"
        print(f"test: kept {len(kept):,} of {len(test):,} events ({dropped})", file=sys.stderr)
    if len(kept) == 0:
        raise ValueError("no test events left after restricting to training items")
    return kept


def evaluate_next_item_job(
    model: StepModel,
    test_df: pd.DataFrame,
    item_index: Mapping[str, int],
    ks: Sequence[int],
    ties: str,
    device: torch.device | str | None = None,
    train_df: pd.DataFrame | None = None,
    retriever: Retriever | None = None,
) -> dict[str, float]:
    """The default evaluator: next-item through the step API, on the test events of items the
    model knows (``train_df`` is not used: sessions start from the initial state).
    ``retriever``: rank within its top-k (``trainer evaluate --retrieval``)."""
    from trainer.evaluate import evaluate_next_item

    test_df = known_items_test(test_df, item_index)
    return evaluate_next_item(
        model, test_df, item_index, ks=ks, ties=ties, device=device, retriever=retriever
    )


#: ``--model NAME`` -> its trainer
TRAINERS: dict[str, Callable[[TrainJob], TrainOutcome]] = {
    "gru4rec": train_gru4rec_job,
    "hrnn": hier.train_hrnn_job,
    "prnn": hier.train_prnn_job,
}
#: checkpoint ``model_name`` -> evaluator (default: next-item through the step API)
EVALUATORS: dict[str, Evaluator] = {
    "gru4rec": evaluate_next_item_job,
    "hrnn": hier.evaluate_users_job,
    "prnn": hier.evaluate_users_job,
}


def evaluator_for(model_name: str) -> Evaluator:
    return EVALUATORS.get(model_name, evaluate_next_item_job)
