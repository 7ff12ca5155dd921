"""A :class:`streamrec.loop.files.Files` that fails one step on demand and records every step:
the archive's and the registry's crash tests drive it instead of racing a kill against a timer.

Not a test module: ``tests/streamrec`` is on ``sys.path`` when its tests run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from streamrec.loop.files import Files

STEPS = ("open_new", "write", "sync", "rename", "sync_dir")


class InjectedFault(OSError):
    """The failure a test asked for (an OSError, as a full disk or a failed fsync raises)."""


class FaultyFiles(Files):
    """Fails the ``nth`` call of ``step`` (one of :data:`STEPS`), before doing it, or after it
    with ``after=True`` (a crash right after the step: ``sync_dir`` after = between the rename
    and whatever the writer does next). A failing ``write`` writes half of its bytes first,
    as a full disk does. ``step=None`` fails nothing. ``calls`` records every step with its
    path (the temporary file's for ``write`` and ``sync``)."""

    def __init__(self, step: str | None = None, nth: int = 1, *, after: bool = False) -> None:
        assert step is None or step in STEPS, step
        self.step, self.nth, self.after = step, nth, after
        self.calls: list[tuple[str, str]] = []
        self.failed = False
        self._count = 0
        self._names: dict[int, str] = {}  # id(file) -> its path

    def _run(self, step: str, path: str, action: Callable[[], Any]) -> Any:
        self.calls.append((step, path))
        hit = False
        if step == self.step and not self.failed:
            self._count += 1
            hit = self._count == self.nth
        if hit and not self.after:
            self.failed = True
            raise InjectedFault(f"injected: {step} {path}")
        out = action()
        if hit:
            self.failed = True
            raise InjectedFault(f"injected after: {step} {path}")
        return out

    def open_new(self, path: str) -> IO[bytes]:
        f: IO[bytes] = self._run("open_new", path, lambda: super(FaultyFiles, self).open_new(path))
        self._names[id(f)] = path
        return f

    def write(self, f: IO[bytes], data: bytes) -> None:
        path = self._names.get(id(f), "?")
        failing = self.step == "write" and not self.after and not self.failed
        if failing and self._count + 1 == self.nth:
            f.write(data[: len(data) // 2])  # a full disk: part of the bytes got there
        self._run("write", path, lambda: super(FaultyFiles, self).write(f, data))

    def sync(self, f: IO[bytes]) -> None:
        path = self._names.get(id(f), "?")
        self._run("sync", path, lambda: super(FaultyFiles, self).sync(f))

    def rename(self, src: str, dst: str) -> None:
        self._run("rename", f"{src} -> {dst}", lambda: super(FaultyFiles, self).rename(src, dst))

    def sync_dir(self, path: str) -> None:
        self._run("sync_dir", path, lambda: super(FaultyFiles, self).sync_dir(path))

    def steps(self) -> list[str]:
        return [s for s, _ in self.calls]
