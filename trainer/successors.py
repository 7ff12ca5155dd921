"""The successor table of a training frame, published beside a checkpoint
(:mod:`streamrec.model.successors`; ``model.ann_index=head+successors``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from streamrec.model.api import InnerProductScores
from streamrec.model.successors import DEFAULT_WIDTH, SuccessorTable, publish_table
from trainer.batching import session_arrays


def publish_successors(
    ckpt_dir: str | Path,
    model: InnerProductScores,
    items: Mapping[str, int] | Sequence[object],
    train_df: pd.DataFrame,
    width: int = DEFAULT_WIDTH,
) -> SuccessorTable:
    """The table of ``model``'s weights beside ``ckpt_dir``: the saved one when it matches,
    else built from the sessions of ``train_df`` (events of items the model does not know are
    left out) and saved. ``items``: item id -> row, or the item ids in row order."""
    index = items if isinstance(items, Mapping) else {str(i): r for r, i in enumerate(items)}
    known = train_df[train_df["ItemId"].astype(str).isin(index)]
    rows, offsets, _ = session_arrays(known, index)
    with torch.inference_mode():
        return publish_table(ckpt_dir, model.item_vectors(), rows, offsets, width)
