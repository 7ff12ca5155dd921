"""Click-log preprocessing and train/test splits (pure pandas/numpy, vectorised).

Frames have the columns ``SessionId`` (str), ``ItemId`` (str), ``Time`` (float64 seconds, or an
ordinal that only orders events) and optionally ``UserId`` (str); see docs/architecture.md.
Functions here never reorder rows: filters keep the input order. Loading and sessionisation
by a gap are :mod:`streamrec.data.clicklog`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from streamrec.data.clicklog import DAY, ITEM, REQUIRED, SESSION, TIME, USER, DataError

# ----------------------------------------------------------------------------- preprocessing


def _check_columns(df: pd.DataFrame, cols: tuple[str, ...]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s): {', '.join(missing)}; found {list(df.columns)}")


def _codes(s: pd.Series) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(s, sort=False)
    return codes.astype(np.int64), len(uniques)


def _session_order(sess: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Row order sorting by (session code, time), stable so equal times keep the input order."""
    return np.lexsort((np.arange(len(sess)), time, sess))


def _consecutive_repeat_mask(sess: np.ndarray, item: np.ndarray, time: np.ndarray) -> np.ndarray:
    """True for rows repeating the previous item of the same session (in time order)."""
    order = _session_order(sess, time)
    s, i = sess[order], item[order]
    rep_sorted = np.zeros(len(order), dtype=bool)
    rep_sorted[1:] = (s[1:] == s[:-1]) & (i[1:] == i[:-1])
    rep = np.empty_like(rep_sorted)
    rep[order] = rep_sorted
    return rep


def preprocess(
    df: pd.DataFrame,
    min_item_support: int = 5,
    min_session_length: int = 2,
    known: Iterable[str] = (),
) -> pd.DataFrame:
    """Remove consecutive repeats of an item within a session, drop sessions shorter than
    ``min_session_length`` and items with fewer than ``min_item_support`` events (but the
    ``known`` ones, compared as strings); repeat until nothing changes. Row order is kept."""
    _check_columns(df, REQUIRED)
    sess, _ = _codes(df[SESSION])
    item, n_items = _codes(df[ITEM])
    # per item code: exempt from the support rule
    exempt = np.zeros(n_items, dtype=bool)
    exempt[item[df[ITEM].astype(str).isin(set(known)).to_numpy()]] = True
    time = df[TIME].to_numpy(dtype=np.float64)
    keep = np.ones(len(df), dtype=bool)
    while True:
        idx = np.flatnonzero(keep)
        s, i, t = sess[idx], item[idx], time[idx]
        drop = _consecutive_repeat_mask(s, i, t)
        s_len = np.bincount(s[~drop], minlength=sess.max() + 1 if len(sess) else 0)
        drop |= s_len[s] < min_session_length
        i_sup = np.bincount(i[~drop], minlength=n_items)
        drop |= (i_sup[i] < min_item_support) & ~exempt[i]
        if not drop.any():
            break
        keep[idx[drop]] = False
    return df[keep].reset_index(drop=True)


#: examples of left-out items a retrain cycle records
LEFT_OUT_EXAMPLES = 10


def admit_new_items(
    train: pd.DataFrame,
    known: Iterable[str],
    min_support: int,
    min_session_length: int = 2,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A retrain cycle's training events: :func:`preprocess` with the support rule applied
    to new items only. An item of ``known`` (the published catalogue, which keeps every one
    of its rows) is trained on with any number of events; an item it lacks enters the
    catalogue only with ``min_support`` events after cleaning (repeats, short sessions), so
    ids that never repeat (junk, typos, a flood of made-up ids) do not grow the model.

    Returns the frame and what the rule left out: the threshold, the new items not admitted
    and their events, the training events dropped in all (sessions that became too short
    included), and up to :data:`LEFT_OUT_EXAMPLES` of those items, most events first."""
    known = set(map(str, known))
    cleaned = preprocess(train, min_item_support=1, min_session_length=min_session_length)
    out = cleaned
    if min_support > 1:
        out = preprocess(cleaned, min_support, min_session_length, known=known)
    items = cleaned[ITEM].astype(str)
    left = items[~items.isin(known) & ~items.isin(out[ITEM].astype(str))]
    counts = left.value_counts()
    return out, {
        "min_support": min_support,
        "items": len(counts),
        "item_events": int(counts.sum()),
        "events_dropped": len(cleaned) - len(out),
        "examples": [str(i) for i in counts.index[:LEFT_OUT_EXAMPLES]],
    }


def restrict_to_items(
    test: pd.DataFrame, *known: Iterable[str], min_session_length: int = 2
) -> pd.DataFrame:
    """The test events whose item is in every one of ``known`` (item ids, or an item index:
    its keys), then the sessions that still have ``min_session_length`` events. Items are
    compared as strings; row order is kept. The one copy of the rule: the time and
    last-session-out splits, the evaluators and the retrain gate use it."""
    items = test[ITEM].astype(str)
    keep = np.ones(len(test), dtype=bool)
    for ids in known:
        keep &= items.isin(ids).to_numpy()
    test = test[keep]
    lens = test.groupby(SESSION, sort=False)[SESSION].transform("size")
    return test[lens >= min_session_length].reset_index(drop=True)


def _restrict_test(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    return restrict_to_items(test, pd.unique(train[ITEM].astype(str)))


def split_by_time(df: pd.DataFrame, days: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test = sessions whose first event is in the last ``days`` days of the log (start time >=
    max time - days * 86400), restricted to items seen in train, then sessions with fewer than
    2 events dropped. Train = all other sessions. Call again on train for a validation split."""
    _check_columns(df, REQUIRED)
    if len(df) == 0:
        raise DataError("cannot split an empty click log")
    time = df[TIME].astype(np.float64)
    start = time.groupby(df[SESSION], sort=False).transform("min")
    is_test = (start >= time.max() - days * DAY).to_numpy()
    train = df[~is_test].reset_index(drop=True)
    test = _restrict_test(train, df[is_test])
    return train, test


def filter_users(
    df: pd.DataFrame,
    min_sessions: int = 5,
    min_session_length: int = 2,
    min_item_support: int = 5,
) -> pd.DataFrame:
    """Drop items with fewer than ``min_item_support`` events, sessions shorter than
    ``min_session_length`` and users with fewer than ``min_sessions`` sessions, repeated until
    nothing changes (the HRNN protocol). Row order is kept."""
    _check_columns(df, (*REQUIRED, USER))
    sess, n_sess = _codes(df[SESSION])
    item, n_items = _codes(df[ITEM])
    user, n_users = _codes(df[USER])
    keep = np.ones(len(df), dtype=bool)
    while True:
        idx = np.flatnonzero(keep)
        s, i, u = sess[idx], item[idx], user[idx]
        drop = np.bincount(i, minlength=n_items)[i] < min_item_support
        drop |= np.bincount(s[~drop], minlength=n_sess)[s] < min_session_length
        alive = np.zeros(n_sess, dtype=bool)
        alive[s[~drop]] = True
        # a session belongs to one user; count each user's surviving sessions
        sess_user = np.full(n_sess, -1, dtype=np.int64)
        sess_user[s] = u
        n_user_sess = np.bincount(sess_user[alive], minlength=n_users)
        drop |= n_user_sess[u] < min_sessions
        if not drop.any():
            break
        keep[idx[drop]] = False
    return df[keep].reset_index(drop=True)


def split_last_session_out(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's last session (latest first event; ties by SessionId) is test, the rest train.
    Test is restricted to items seen in train, then sessions with fewer than 2 events dropped."""
    _check_columns(df, (*REQUIRED, USER))
    starts = (
        df.groupby(SESSION, sort=False)
        .agg(start=(TIME, "min"), user=(USER, "first"))
        .reset_index()
        .sort_values(["user", "start", SESSION], kind="stable")
    )
    last = starts.drop_duplicates("user", keep="last")[SESSION]
    is_test = df[SESSION].isin(last).to_numpy()
    train = df[~is_test].reset_index(drop=True)
    test = _restrict_test(train, df[is_test])
    return train, test
