"""Click-log loading, preprocessing and train/test splits (pure pandas/numpy, vectorised).

Frames have the columns ``SessionId`` (str), ``ItemId`` (str), ``Time`` (float64 seconds, or an
ordinal that only orders events) and optionally ``UserId`` (str); see docs/architecture.md.
Functions here never reorder rows: filters keep the input order.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

SESSION, ITEM, TIME, USER = "SessionId", "ItemId", "Time", "UserId"
REQUIRED = (SESSION, ITEM, TIME)
FORMATS = ("gru4rec", "yoochoose", "csv", "tsv", "parquet")
DAY = 86400.0


class DataError(ValueError):
    """A click log that cannot be loaded or processed (the message says what and where)."""


# ----------------------------------------------------------------------------- loading


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _first_line(path: Path) -> str:
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.readline().rstrip("\r\n")


_YOOCHOOSE_LINE = re.compile(r"^[^,]+,\d{4}-\d{2}-\d{2}T[^,]+,[^,]+(,.*)?$")


def _detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".dat"):
        return "yoochoose"
    line = _first_line(path)
    if name.endswith(".csv"):
        return "yoochoose" if _YOOCHOOSE_LINE.match(line) else "csv"
    if "\t" in line:
        return "tsv"
    if _YOOCHOOSE_LINE.match(line):
        return "yoochoose"
    if "," in line:
        return "csv"
    return "tsv"


def _read_text(path: Path, sep: str, header: bool, names: list[str] | None) -> pd.DataFrame:
    """Read every field as a string, one row per physical line (blank lines kept, then dropped)."""
    try:
        df = pd.read_csv(
            path,
            sep=sep,
            header=0 if header else None,
            names=names,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            compression="gzip" if _is_gzip(path) else None,
            engine="c",
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty input (no header and no rows)") from None
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m:
            raise DataError(
                f"{path}: line {m.group(2)}: expected {m.group(1)} fields, found {m.group(3)}"
            ) from None
        raise DataError(f"{path}: unparseable input: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    # the frame index is the 0-based physical data line; line numbers are 1-based and count
    # the header line
    df.index = pd.RangeIndex(len(df)) + (2 if header else 1)
    blank = np.ones(len(df), dtype=bool)
    for c in df.columns:
        blank &= (df[c].fillna("").to_numpy(dtype=object) == "").astype(bool)
    return df[~blank]


def _resolve_columns(
    df: pd.DataFrame, column_map: Mapping[str, str] | None, path: Path
) -> pd.DataFrame:
    cmap = dict(column_map or {})
    unknown = set(cmap) - {*REQUIRED, USER}
    if unknown:
        raise DataError(
            f"column_map keys must be among {[*REQUIRED, USER]}; got unknown {sorted(unknown)}"
        )
    src = {c: cmap.get(c, c) for c in (*REQUIRED, USER)}
    # a per-user log without sessions (to be split by sessionize) may lack SessionId
    required = REQUIRED
    if src[USER] in df.columns and SESSION not in cmap and src[SESSION] not in df.columns:
        required = (ITEM, TIME)
    missing = [
        c + (f" (mapped from {src[c]!r})" if src[c] != c else "")
        for c in required
        if src[c] not in df.columns
    ]
    if USER in cmap and src[USER] not in df.columns:
        missing.append(f"{USER} (mapped from {src[USER]!r})")
    if missing:
        raise DataError(
            f"{path}: missing column(s): {', '.join(missing)}; found {list(map(str, df.columns))}"
        )
    cols = [c for c in (*REQUIRED, USER) if src[c] in df.columns]
    out = pd.DataFrame({c: df[src[c]] for c in cols}, index=df.index)
    return out


def _where(idx: object, line_based: bool) -> str:
    return f"line {idx}" if line_based else f"row {idx}"


def _ids_to_str(s: pd.Series, name: str, path: Path, line_based: bool) -> pd.Series:
    if pd.api.types.is_float_dtype(s.dtype):
        vals = s.to_numpy()
        bad = ~np.isfinite(vals)
        if bad.any():
            raise DataError(
                f"{path}: {_where(s.index[bad.argmax()], line_based)}: missing value for {name}"
            )
        if np.all(vals == np.round(vals)):
            s = s.astype(np.int64)
    elif not (pd.api.types.is_string_dtype(s.dtype) or pd.api.types.is_object_dtype(s.dtype)):
        s = s.astype(str)
    else:
        isna = s.isna().to_numpy()
        if isna.any():
            raise DataError(
                f"{path}: {_where(s.index[isna.argmax()], line_based)}: missing value for {name}"
            )
    out = s.astype(str)
    empty = (out.str.len() == 0).to_numpy()
    if empty.any():
        raise DataError(
            f"{path}: {_where(out.index[empty.argmax()], line_based)}: missing value for {name}"
        )
    return out


def _datetime_to_seconds(dt: pd.Series) -> pd.Series:
    if dt.dt.tz is None:
        dt = dt.dt.tz_localize("UTC")
    return (dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)


def _time_to_seconds(s: pd.Series, path: Path, line_based: bool) -> pd.Series:
    """Numeric times as float64; ISO/datetime strings or datetime columns as epoch seconds."""
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        out = _datetime_to_seconds(s)
    elif pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        out = s.astype(np.float64)
    else:
        text = s.astype(str).str.strip()
        num = pd.to_numeric(text, errors="coerce")
        first_ok = text[text.str.len() > 0]
        numeric_mode = len(first_ok) == 0 or not np.isnan(
            pd.to_numeric(first_ok.iloc[:1], errors="coerce").iloc[0]
        )
        if numeric_mode:
            out = num.astype(np.float64)
        else:
            dt = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
            out = _datetime_to_seconds(dt)
    vals = out.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(vals)
    if bad.any():
        idx = out.index[bad.argmax()]
        if pd.isna(s.loc[idx]) or str(s.loc[idx]).strip() == "":
            raise DataError(f"{path}: {_where(idx, line_based)}: missing value for {TIME}")
        raise DataError(
            f"{path}: {_where(idx, line_based)}: cannot parse Time value {s.loc[idx]!r} "
            "(expected a number or an ISO 8601 timestamp)"
        )
    return pd.Series(vals, index=s.index, name=TIME)


def load_clicks(
    path: str | Path,
    *,
    column_map: dict[str, str] | None = None,
    fmt: str | None = None,
) -> pd.DataFrame:
    """Load a click log as a ``SessionId, ItemId, Time[, UserId]`` frame (input row order kept).

    ``fmt``: ``gru4rec``/``tsv`` (tab-separated with a header), ``csv`` (comma, header),
    ``yoochoose`` (raw RecSys Challenge 2015 ``yoochoose-clicks.dat``: no header,
    ``session,ISO time,item,category``) or ``parquet``; inferred from the name and first line
    when None. Gzip is detected from the file's bytes. ``column_map`` maps our column names to
    the file's, e.g. ``{"SessionId": "sess", "ItemId": "product", "Time": "ts"}``.
    Raises DataError for a missing file or column, an unparseable row (with its 1-based line
    number) and an empty input.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty input (0 bytes)")
    fmt = (fmt or _detect_format(path)).lower()
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    line_based = fmt != "parquet"
    if fmt == "parquet":
        try:
            raw = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet: {e}") from None
        raw.index = pd.RangeIndex(len(raw)) + 1
    elif fmt == "yoochoose":
        raw = _read_text(path, ",", header=False, names=None)
        if raw.shape[1] < 3:
            raise DataError(
                f"{path}: yoochoose clicks need at least 3 comma-separated fields "
                "(session, timestamp, item); found "
                f"{raw.shape[1]}"
            )
        raw = raw.iloc[:, :3]
        raw.columns = [SESSION, TIME, ITEM]
        if column_map:
            raise DataError("column_map does not apply to the yoochoose format (it has no header)")
    else:
        raw = _read_text(path, "," if fmt == "csv" else "\t", header=True, names=None)
    if len(raw) == 0:
        raise DataError(f"{path}: empty input (no rows)")
    df = _resolve_columns(raw, column_map, path)
    for c in (SESSION, ITEM, USER):
        if c in df.columns:
            df[c] = _ids_to_str(df[c], c, path, line_based)
    df[TIME] = _time_to_seconds(df[TIME], path, line_based)
    return df.reset_index(drop=True)[[c for c in (*REQUIRED, USER) if c in df.columns]]


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
    df: pd.DataFrame, min_item_support: int = 5, min_session_length: int = 2
) -> pd.DataFrame:
    """Remove consecutive repeats of an item within a session, drop sessions shorter than
    ``min_session_length`` and items with fewer than ``min_item_support`` events; repeat until
    nothing changes. Row order is kept."""
    _check_columns(df, REQUIRED)
    sess, _ = _codes(df[SESSION])
    item, n_items = _codes(df[ITEM])
    time = df[TIME].to_numpy(dtype=np.float64)
    keep = np.ones(len(df), dtype=bool)
    while True:
        idx = np.flatnonzero(keep)
        s, i, t = sess[idx], item[idx], time[idx]
        drop = _consecutive_repeat_mask(s, i, t)
        s_len = np.bincount(s[~drop], minlength=sess.max() + 1 if len(sess) else 0)
        drop |= s_len[s] < min_session_length
        i_sup = np.bincount(i[~drop], minlength=n_items)
        drop |= i_sup[i] < min_item_support
        if not drop.any():
            break
        keep[idx[drop]] = False
    return df[keep].reset_index(drop=True)


def _restrict_test(train: pd.DataFrame, test: pd.DataFrame, min_len: int = 2) -> pd.DataFrame:
    test = test[test[ITEM].isin(pd.unique(train[ITEM]))]
    lens = test.groupby(SESSION, sort=False)[SESSION].transform("size")
    return test[lens >= min_len].reset_index(drop=True)


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


def sessionize(df: pd.DataFrame, gap_seconds: float) -> pd.DataFrame:
    """Split each user's events into sessions: a new session starts when the time since the
    user's previous event exceeds ``gap_seconds``. Sets ``SessionId`` to ``"<user>:<n>"``
    (n = 0, 1, ... per user in time order); row order is kept."""
    _check_columns(df, (USER, TIME))
    user, _ = _codes(df[USER])
    time = df[TIME].to_numpy(dtype=np.float64)
    order = _session_order(user, time)
    u, t = user[order], time[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | (t[1:] - t[:-1] > gap_seconds)
    sess_global = np.cumsum(new) - 1  # running session counter over all users
    first_of_user = np.ones(len(order), dtype=bool)
    first_of_user[1:] = u[1:] != u[:-1]
    user_base = np.maximum.accumulate(np.where(first_of_user, sess_global, 0))
    n_sorted = sess_global - user_base
    n = np.empty_like(n_sorted)
    n[order] = n_sorted
    out = df.copy()
    out[SESSION] = df[USER].astype(str).to_numpy(dtype=object) + ":" + n.astype(str).astype(object)
    out[SESSION] = out[SESSION].astype(str)
    cols = [SESSION, ITEM, TIME, USER]
    return out[[c for c in cols if c in out.columns] + [c for c in out.columns if c not in cols]]


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
