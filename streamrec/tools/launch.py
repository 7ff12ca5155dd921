"""Worker processes for the demo, the backtest, the tests and the benchmarks: ``streamrec
worker`` in a child process (:class:`streamrec.processes.ChildProcess`), configured through
the environment."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from streamrec.processes import ChildProcess


def settings_env(overrides: Mapping[str, object]) -> dict[str, str]:
    """``{"topics.clicks": "c", ...}`` -> ``{"STREAMREC_TOPICS__CLICKS": "c", ...}``."""
    return {
        "STREAMREC_" + key.upper().replace(".", "__"): str(value)
        for key, value in overrides.items()
    }


class WorkerProcess(ChildProcess):
    """``streamrec worker --model MODEL`` in a child process, its output in ``log_path``.

    ``settings`` are Settings overrides by dotted name (see :func:`settings_env`);
    ``python_args`` go before ``entry`` (e.g. a profiler); ``entry`` is the worker command.
    """

    log_path: Path

    def __init__(
        self,
        model: Path,
        *,
        settings: Mapping[str, object],
        data_dir: Path,
        log_path: Path,
        args: Sequence[str] = (),
        python_args: Sequence[str] = (),
        entry: Sequence[str] = ("-m", "streamrec", "worker"),
        loglevel: str = "WARNING",
    ) -> None:
        cmd = [sys.executable, *python_args, *entry, "--model", str(model)]
        cmd += ["--data-dir", str(data_dir), "--loglevel", loglevel, *args]
        super().__init__(cmd, env=settings_env(settings), log=log_path)

    def kill9(self) -> None:
        """SIGKILL, as a crash would: no checkpoint, no goodbye to the group."""
        self.kill()
