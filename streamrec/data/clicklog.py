"""Click-log loading: GRU4Rec TSV, yoochoose-clicks.dat, CSV/TSV/Parquet with a column map;
sessions of a per-user log by an inactivity gap (:func:`sessionize`).

Shared by the trainer and the serving tools (produce, replay, backtest): pure pandas/numpy,
vectorised.

Frames have the columns ``SessionId`` (str), ``ItemId`` (str), ``Time`` (float64 seconds, or an
ordinal that only orders events) and optionally ``UserId`` (str); see docs/architecture.md.
Functions here never reorder rows: filters keep the input order.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from streamrec.errors import StreamrecError

SESSION, ITEM, TIME, USER = "SessionId", "ItemId", "Time", "UserId"
REQUIRED = (SESSION, ITEM, TIME)
FORMATS = ("gru4rec", "yoochoose", "csv", "tsv", "parquet")
DAY = 86400.0
#: A log whose times start before 1980-01-01 is taken to hold ordinals that only order its
#: events (yoochoose-1_64's ``Time`` counts from 1), not epoch seconds; the oldest public
#: click and rating logs are from the 1990s (MovieLens-100k: 1997). Workers accept any
#: non-negative time: this only decides whether a replay sends the log's times.
EPOCH_TIMES_FROM = 315_532_800.0


def has_epoch_times(times: pd.Series) -> bool:
    """Whether a log's ``Time`` reads as epoch seconds (see :data:`EPOCH_TIMES_FROM`)."""
    return bool(len(times)) and float(times.min()) >= EPOCH_TIMES_FROM


class DataError(StreamrecError, ValueError):
    """A click log that cannot be loaded or processed (the message says what and where)."""


# ----------------------------------------------------------------------------- loading


def _is_gzip(path: Path) -> bool:
    """Whether the file's bytes are gzip data; a file named ``*.gz`` must be."""
    with open(path, "rb") as f:
        magic = f.read(2) == b"\x1f\x8b"
    if not magic and path.name.lower().endswith(".gz"):
        raise DataError(
            f"{path}: the name ends in .gz but the file is not gzip-compressed "
            "(a partial download? plain text: rename it without .gz)"
        )
    return magic


#: what reading damaged gzip data raises (a truncated file: EOFError)
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _first_line(path: Path) -> str:
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\r\n")
    except _GZIP_ERRORS as e:
        raise DataError(f"{path}: damaged or truncated gzip data ({e})") from None


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


def _parser_error(message: str) -> str:
    """pandas' tokenizer error as ``line N: what`` (N 1-based, the header line counted)."""
    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if m:
        return f"line {m.group(2)}: expected {m.group(1)} fields, found {m.group(3)}"
    m = re.search(r"EOF inside string starting at row (\d+)", message)
    if m:  # rows count every physical line from 0
        return (
            f'line {int(m.group(1)) + 1}: a field opens a quote (") that never closes '
            "(quote the whole field and double inner quotes, or remove the quote)"
        )
    return f"unparseable input: {message}"


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
        raise DataError(f"{path}: {_parser_error(str(e))}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    except _GZIP_ERRORS as e:
        raise DataError(f"{path}: damaged or truncated gzip data ({e})") from None
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
    required: tuple[str, ...] = REQUIRED
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


# ----------------------------------------------------------------------------- sessions


def sessionize(df: pd.DataFrame, gap_seconds: float) -> pd.DataFrame:
    """Split each user's events into sessions: a new session starts when the time since the
    user's previous event exceeds ``gap_seconds``. Sets ``SessionId`` to ``"<user>:<n>"``
    (n = 0, 1, ... per user in time order; a per-user count, so a session keeps its id when
    other users' events come or go); row order is kept. The one sessionisation of the
    project: ``trainer train --session-gap`` and ``streamrec backtest --session-gap``."""
    missing = [c for c in (USER, TIME) if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s): {', '.join(missing)}; found {list(df.columns)}")
    user, _ = pd.factorize(df[USER], sort=False)
    time = df[TIME].to_numpy(dtype=np.float64)
    order = np.lexsort((np.arange(len(df)), time, user))  # by user, then time (stable)
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
