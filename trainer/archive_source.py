"""The click archive (``streamrec archive``) as a training source: ``archive:DIR``.

Windows are measured in event time back from the newest archived event, never from the wall
clock, so a replayed or years-old log retrains exactly as a live one would. Hour directories
outside the window are not read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from streamrec.data.clicklog import DataError
from streamrec.loop.archive import ArchiveFile, Storage, list_archive

PREFIX = "archive:"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 86400.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str | float | None) -> float | None:
    """``14d``, ``36h``, ``90m``, ``2w``, ``3600s`` or a bare number of days -> seconds."""
    if text is None or text == "":
        return None
    if isinstance(text, int | float):
        return float(text) * 86400.0
    m = _DURATION.match(str(text))
    if not m:
        raise DataError(f"bad duration {text!r}: use e.g. 14d, 36h, 90m, 2w")
    return float(m[1]) * _UNIT[m[2]]


def parse_time(text: str | float | None) -> float | None:
    """Epoch seconds or an ISO 8601 date/time (UTC when naive) -> epoch seconds."""
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"bad time {text!r}: epoch seconds or ISO 8601") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


@dataclass
class ArchiveSlice:
    """What was read: the clicks and where they came from."""

    df: pd.DataFrame
    since: float | None
    until: float | None
    newest: float | None  # the newest archived event time
    files: int = 0
    offsets: dict[str, list[int]] = field(default_factory=dict)  # partition -> [first, last]

    def summary(self) -> dict[str, Any]:
        t = self.df["Time"] if len(self.df) else pd.Series([], dtype=float)
        return {
            "since": self.since,
            "until": self.until,
            "newest_event": self.newest,
            "first_event": float(t.min()) if len(t) else None,
            "last_event": float(t.max()) if len(t) else None,
            "events": len(self.df),
            "files": self.files,
            "offsets": self.offsets,
        }


def _hour_start(hour: str) -> float:
    return datetime.strptime(hour, "%Y-%m-%d/%H").replace(tzinfo=UTC).timestamp()


def _read(
    storage: Storage, files: list[ArchiveFile], advance: Callable[[int], None] | None = None
) -> pd.DataFrame:
    tables = []
    for f in files:
        try:
            with storage.open(f.path) as fh:
                tables.append(pq.read_table(fh))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{storage.url}/{f.path}: unreadable archive file: {e}") from None
        if advance is not None:
            advance(1)
    if not tables:
        return pd.DataFrame(
            {
                "SessionId": pd.Series([], dtype=object),
                "ItemId": pd.Series([], dtype=object),
                "Time": pd.Series([], dtype=np.float64),
            }
        )
    return pa.concat_tables(tables).to_pandas()


def newest_event(directory: str) -> float | None:
    storage = Storage(directory)
    files = list_archive(storage)
    if not files:
        return None
    last_hour = max(f.hour for f in files)
    df = _read(storage, [f for f in files if f.hour == last_hour])
    return float(df["Time"].max()) if len(df) else None


def read_archive(
    directory: str,
    *,
    since: float | None = None,
    until: float | None = None,
    window: float | None = None,
    with_meta: bool = False,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> ArchiveSlice:
    """Clicks with ``since <= Time < until`` (``until`` defaults to just after the newest
    event); ``window`` seconds back from ``until`` (or the newest event) sets ``since``.

    Rows are in event-time order (ties by partition, offset), deduplicated by (partition,
    offset). ``UserId`` is kept when any row has one. ``with_meta`` keeps ``event_id``,
    ``partition``, ``offset``. ``progress(n_files)`` returns a function called with 1 after
    every file read (a progress bar).
    """
    storage = Storage(directory)
    files = list_archive(storage)
    if not files:
        raise DataError(f"{directory}: the archive holds no files")
    newest = newest_event(directory)
    end = until if until is not None else (newest + 1e-6 if newest is not None else None)
    if window is not None and end is not None:
        since = end - window if since is None else max(since, end - window)
    chosen = [
        f
        for f in files
        if (since is None or _hour_start(f.hour) + 3600 > since)
        and (end is None or _hour_start(f.hour) < end)
    ]
    df = _read(storage, chosen, progress(len(chosen)) if progress is not None else None)
    if len(df):
        keep = np.ones(len(df), dtype=bool)
        if since is not None:
            keep &= df["Time"].to_numpy() >= since
        if end is not None:
            keep &= df["Time"].to_numpy() < end
        df = df[keep]
        df = df.drop_duplicates(["partition", "offset"])
        df = df.sort_values(["Time", "partition", "offset"], kind="stable")
    offsets: dict[str, list[int]] = {}
    for f in chosen:
        lo, hi = offsets.get(str(f.partition), [f.first, f.last])
        offsets[str(f.partition)] = [min(lo, f.first), max(hi, f.last)]
    cols = ["SessionId", "ItemId", "Time"]
    if "UserId" in df.columns and df["UserId"].notna().any():
        cols.append("UserId")
    if with_meta:
        cols += [c for c in ("event_id", "partition", "offset") if c in df.columns]
    out = df[cols].reset_index(drop=True)
    for c in ("SessionId", "ItemId", "UserId"):
        if c in out.columns:
            out[c] = out[c].astype(str) if c != "UserId" else out[c]
    return ArchiveSlice(out, since, end, newest, len(chosen), offsets)


def load_archive(
    spec: str,
    *,
    since: str | float | None = None,
    until: str | float | None = None,
    window: str | float | None = None,
) -> pd.DataFrame:
    """``archive:DIR`` -> a click frame, as :func:`streamrec.data.clicklog.load_clicks` gives."""
    directory = spec.removeprefix(PREFIX)
    sl = read_archive(
        directory,
        since=parse_time(since),
        until=parse_time(until),
        window=parse_duration(window),
    )
    if len(sl.df) == 0:
        raise DataError(f"{spec}: no archived clicks in the window")
    return sl.df
