"""The steps of an atomic file write, one method each: the seam where tests make a step fail.

An atomic write (:meth:`Files.write_atomic`) is: create a temporary file beside the target,
write the bytes, fsync it, rename it over the target, fsync the directory. A reader sees the
old file or the new one, never a part; a crash at any step leaves the old file (and at most a
temporary one). The archive's files (:mod:`streamrec.loop.archive`) and the registry's
pointer (:mod:`streamrec.loop.registry`) are written so.

Every step is a method, so a test can hand the archive a ``Files`` whose ``sync`` fails, or
set the registry's to one that reads the pointer in the middle of a write, and see what the
promise holds on that failure, on demand, instead of racing a kill against a timer.
:class:`FsspecFiles` runs the same steps on an fsspec filesystem (object stores: no fsync, and
the rename is a copy + delete).
"""

from __future__ import annotations

import os
from typing import IO, Any


class Files:
    """A local filesystem's steps (fsync'd)."""

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_new(self, path: str) -> IO[bytes]:
        """A new file to write (the temporary one)."""
        return open(path, "wb")

    def write(self, f: IO[bytes], data: bytes) -> None:
        f.write(data)

    def sync(self, f: IO[bytes]) -> None:
        """Its bytes on the disk before the rename makes them visible."""
        f.flush()
        os.fsync(f.fileno())

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)  # atomic on one filesystem: readers see src's bytes or dst's

    def sync_dir(self, path: str) -> None:
        """The rename on the disk (the directory's entry)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)

    def write_atomic(self, path: str, data: bytes, tmp: str) -> None:
        """``data`` at ``path`` through the temporary file ``tmp`` (same directory): write,
        fsync, rename, fsync of the directory. A failed step removes nothing: the temporary
        file is left for the writer's cleanup (readers never read it)."""
        parent = os.path.dirname(path) or "."
        self.makedirs(parent)
        with self.open_new(tmp) as f:
            self.write(f, data)
            self.sync(f)
        self.rename(tmp, path)
        self.sync_dir(parent)


class FsspecFiles(Files):
    """The same steps on an fsspec filesystem: a file is durable once closed (no fsync), the
    rename is the filesystem's move (on object stores a copy + delete, not atomic)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def open_new(self, path: str) -> IO[bytes]:
        f: IO[bytes] = self.fs.open(path, "wb")
        return f

    def sync(self, f: IO[bytes]) -> None:
        pass

    def rename(self, src: str, dst: str) -> None:
        self.fs.mv(src, dst)

    def sync_dir(self, path: str) -> None:
        pass

    def remove(self, path: str) -> None:
        self.fs.rm(path)
