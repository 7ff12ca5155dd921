"""The click archive's files: Parquet by event date and hour, written atomically, listed.

Layout: ``DIR/date=YYYY-MM-DD/hour=HH/p{P}-{FIRST:012d}-{LAST:012d}.parquet``. One file holds
the valid clicks of one contiguous offset range ``FIRST..LAST`` (inclusive) of partition ``P``
whose events fall in one event hour; records in the range that the worker dead-letters (or
``session_end`` markers) are skipped but their offsets still belong to the range. A file is
written under a temporary name, fsynced, renamed, and the directory fsynced
(:meth:`Storage.write_atomic`); temporary files are never listed. The archiver that fills it
(``streamrec.loop.archiver``) commits a range only after its rename; the trainer reads the
files through :func:`list_archive` and :class:`Storage`. No Kafka here.

Storage: a local directory, or an fsspec URL (``s3://``, ``gs://``, ``hdfs://``, ...) where
the matching fsspec implementation (s3fs, gcsfs, pyarrow's HDFS) is installed; ``memory://``
is always there (tests). On an object store the rename is a copy + delete (not atomic), but
the temporary name is never read.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from streamrec.errors import StreamrecError

SCHEMA = pa.schema(
    [
        ("SessionId", pa.string()),
        ("ItemId", pa.string()),
        ("Time", pa.float64()),
        ("UserId", pa.string()),
        ("event_id", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)
FILE_RE = re.compile(r"^p(\d+)-(\d+)-(\d+)\.parquet$")
TMP_PREFIX = ".tmp-"


class ArchiveError(StreamrecError, RuntimeError):
    """The archive directory cannot be used (bad URL, missing fsspec implementation, ...)."""


class Storage:
    """Where the files go: a local directory (fsync'd) or an fsspec filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = str(root)
        self.url = root
        self.fs: Any = None
        if "://" in root and not root.startswith("file://"):
            try:
                import fsspec

                self.fs, self.root = fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as exc:
                raise ArchiveError(
                    f"{root}: no fsspec implementation for this URL is installed ({exc})"
                ) from None
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self.root = root.removeprefix("file://")
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def list_files(self) -> list[str]:
        """Every path under the root (relative), temporary files included."""
        if self.fs is None:
            base = Path(self.root)
            return [str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()]
        base = self.root.rstrip("/") + "/"
        return [p.removeprefix(base) for p in self.fs.find(self.root)]

    def write_atomic(self, rel: str, table: pa.Table) -> int:
        """Temp name, fsync, rename, fsync of the directory; returns the bytes written."""
        final = self.join(rel)
        parent, name = final.rsplit("/", 1)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
        if self.fs is None:
            Path(parent).mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, final)
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return int(size)
        else:
            self.fs.makedirs(parent, exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(table, f)
                size = f.tell()
            self.fs.mv(tmp, final)
        return int(size)

    def remove(self, rel: str) -> None:
        if self.fs is None:
            Path(self.join(rel)).unlink(missing_ok=True)
        else:
            self.fs.rm(self.join(rel))

    def open(self, rel: str) -> Any:
        return open(self.join(rel), "rb") if self.fs is None else self.fs.open(self.join(rel))


@dataclass(frozen=True)
class ArchiveFile:
    path: str  # relative to the archive root
    partition: int
    first: int
    last: int
    hour: str  # "YYYY-MM-DD/HH"


def list_archive(storage: Storage) -> list[ArchiveFile]:
    """The archive's finished files (temporary ones left out), by (partition, first offset)."""
    out = []
    for rel in storage.list_files():
        name = rel.rsplit("/", 1)[-1]
        m = FILE_RE.match(name)
        if not m:
            continue
        parts = rel.split("/")
        date = next((p[5:] for p in parts if p.startswith("date=")), "")
        hour = next((p[5:] for p in parts if p.startswith("hour=")), "")
        out.append(ArchiveFile(rel, int(m[1]), int(m[2]), int(m[3]), f"{date}/{hour}"))
    return sorted(out, key=lambda f: (f.partition, f.first))


def archived_end(files: list[ArchiveFile]) -> dict[int, int]:
    """Per partition, the offset after the last archived range."""
    end: dict[int, int] = {}
    for f in files:
        end[f.partition] = max(end.get(f.partition, 0), f.last + 1)
    return end


def hour_of(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d/%H")


def file_name(partition: int, first: int, last: int, hour: str) -> str:
    date, hh = hour.split("/")
    return f"date={date}/hour={hh}/p{partition}-{first:012d}-{last:012d}.parquet"
