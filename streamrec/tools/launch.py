"""Starting and stopping worker processes: one launcher for the demo, the tests and the
benchmarks (``streamrec worker`` in a child process, configured through the environment)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from streamrec.kafka.embedded import stop_process


def settings_env(overrides: Mapping[str, object]) -> dict[str, str]:
    """``{"topics.clicks": "c", ...}`` -> ``{"STREAMREC_TOPICS__CLICKS": "c", ...}``."""
    return {
        "STREAMREC_" + key.upper().replace(".", "__"): str(value)
        for key, value in overrides.items()
    }


class WorkerProcess:
    """``streamrec worker --model MODEL`` in a child process, its output in ``log_path``.

    ``settings`` are Settings overrides by dotted name (see :func:`settings_env`);
    ``python_args`` go before ``entry`` (e.g. a profiler); ``entry`` is the worker command.
    """

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
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, *python_args, *entry, "--model", str(model)]
        cmd += ["--data-dir", str(data_dir), "--loglevel", loglevel, *args]
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **settings_env(settings)},
            stdout=self._log,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def kill9(self) -> None:
        """SIGKILL, as a crash would: no checkpoint, no goodbye to the group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL after 30 s; the exit code."""
        returncode = stop_process(self.proc)
        if not self._log.closed:
            self._log.close()
        return returncode
