"""The click archive's files: Parquet by event date and hour, written atomically, listed.

Layout: ``DIR/date=YYYY-MM-DD/hour=HH/p{P}-{FIRST:012d}-{LAST:012d}[-of{N}].parquet``. A
*range* is one contiguous offset range ``FIRST..LAST`` (inclusive) of partition ``P``; its
valid clicks are written as one file per event hour they fall in, each in its hour's
directory, all named by the range and, when there are several (N > 1), by their number
(``-ofN``). Records in the range that the worker dead-letters (or ``session_end`` markers)
are skipped but their offsets still belong to the range. A range is archived when all N of
its files are there: :func:`list_archive` (the trainer, the archiver's resume) lists complete
ranges only, and the archiver removes an incomplete one (a crash between two of its renames)
before it archives that partition again. A file is written under a temporary name, fsynced,
renamed, and the directory fsynced (:meth:`Storage.write_atomic`, each step a method of
:mod:`streamrec.loop.files`, which tests make fail); temporary files are never listed. The
archiver that fills it (``streamrec.loop.archiver``) commits a range only after its last
rename; the trainer reads the files through :func:`list_archive` and :class:`Storage`. No
Kafka here.

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
from streamrec.loop.files import Files, FsspecFiles

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
FILE_RE = re.compile(r"^p(\d+)-(\d+)-(\d+)(?:-of(\d+))?\.parquet$")
TMP_PREFIX = ".tmp-"


class ArchiveError(StreamrecError, RuntimeError):
    """The archive directory cannot be used (bad URL, missing fsspec implementation, ...)."""


class Storage:
    """Where the files go: a local directory (fsync'd) or an fsspec filesystem.

    ``files``: the steps of a write (:class:`streamrec.loop.files.Files`; by default the
    local filesystem's or the fsspec filesystem's); tests hand in one whose steps fail.
    """

    def __init__(self, root: str | os.PathLike[str], files: Files | None = None) -> None:
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
        self.files = files or (Files() if self.fs is None else FsspecFiles(self.fs))

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
        """Temp name, fsync, rename, fsync of the directory (:meth:`Files.write_atomic`);
        returns the bytes written."""
        final = self.join(rel)
        parent, name = final.rsplit("/", 1)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
        data = sink.getvalue().to_pybytes()
        self.files.write_atomic(final, data, tmp)
        return len(data)

    def remove(self, rel: str) -> None:
        self.files.remove(self.join(rel))

    def open(self, rel: str) -> Any:
        return open(self.join(rel), "rb") if self.fs is None else self.fs.open(self.join(rel))


@dataclass(frozen=True)
class ArchiveFile:
    path: str  # relative to the archive root
    partition: int
    first: int
    last: int
    hour: str  # "YYYY-MM-DD/HH"
    parts: int = 1  # files of its range (one per event hour)

    @property
    def range(self) -> tuple[int, int, int]:
        return (self.partition, self.first, self.last)


def _finished_files(storage: Storage) -> list[ArchiveFile]:
    out = []
    for rel in storage.list_files():
        name = rel.rsplit("/", 1)[-1]
        m = FILE_RE.match(name)
        if not m:
            continue
        dirs = rel.split("/")
        date = next((p[5:] for p in dirs if p.startswith("date=")), "")
        hour = next((p[5:] for p in dirs if p.startswith("hour=")), "")
        parts = int(m[4]) if m[4] else 1
        out.append(ArchiveFile(rel, int(m[1]), int(m[2]), int(m[3]), f"{date}/{hour}", parts))
    return sorted(out, key=lambda f: (f.partition, f.first, f.hour))


def _by_range(files: list[ArchiveFile]) -> dict[tuple[int, int, int], list[ArchiveFile]]:
    ranges: dict[tuple[int, int, int], list[ArchiveFile]] = {}
    for f in files:
        ranges.setdefault(f.range, []).append(f)
    return ranges


def _complete(files: list[ArchiveFile]) -> bool:
    return all(f.parts == len(files) for f in files)


def list_archive(storage: Storage) -> list[ArchiveFile]:
    """The files of the archive's complete ranges (temporary files and the files of a range
    whose other files are missing left out), by (partition, first offset, hour)."""
    ranges = _by_range(_finished_files(storage))
    return [f for files in ranges.values() if _complete(files) for f in files]


def incomplete_ranges(storage: Storage) -> list[ArchiveFile]:
    """The files of ranges that lack some of their files: what a crash between the renames
    of one range leaves. Never read; the archiver removes them before it archives their
    partition again."""
    ranges = _by_range(_finished_files(storage))
    return [f for files in ranges.values() if not _complete(files) for f in files]


def archived_end(files: list[ArchiveFile]) -> dict[int, int]:
    """Per partition, the offset after the last archived range."""
    end: dict[int, int] = {}
    for f in files:
        end[f.partition] = max(end.get(f.partition, 0), f.last + 1)
    return end


def hour_of(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d/%H")


def file_name(partition: int, first: int, last: int, hour: str, parts: int = 1) -> str:
    """The file of range ``first..last`` of ``partition`` for event hour ``hour``, one of
    ``parts`` files of that range."""
    date, hh = hour.split("/")
    suffix = f"-of{parts}" if parts > 1 else ""
    return f"date={date}/hour={hh}/p{partition}-{first:012d}-{last:012d}{suffix}.parquet"
