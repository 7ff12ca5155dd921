"""The item index: row <-> item id, shared by training, checkpoints and serving."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd


def build_item_index(item_ids: Iterable[object]) -> tuple[list[str], dict[str, int]]:
    """Rows in order of first appearance in ``item_ids`` (ids as strings).

    Returns ``(ids, rows)``: ``ids[row]`` is the item id of a row, ``rows[id]`` its row. Pass a
    training frame's ``ItemId`` column in training order to number items as the trainers do,
    or a sorted sequence for a deterministic, order-free numbering (the baselines).
    """
    ids = [str(i) for i in pd.unique(pd.Series(list(item_ids), dtype=object).astype(str))]
    return ids, {iid: r for r, iid in enumerate(ids)}
