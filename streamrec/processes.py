"""Child processes and stop signals: the one way the project starts a child process, stops
it, and stops itself on SIGINT or SIGTERM.

The children are the embedded broker, workers, the archiver and the ``trainer`` commands that
the demo and the backtest run (the serving package never imports training code). A child's
output goes to a log file, never to a pipe nobody reads; stopping one is SIGTERM (after
SIGCONT: a paused process cannot handle it), a wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from streamrec.errors import StreamrecError

#: the signals that ask a process to stop cleanly (Ctrl-C, and what a supervisor sends)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

SignalHandler = Callable[[int, FrameType | None], Any]


class ChildFailed(StreamrecError):
    """A child process run to its end exited with a non-zero status."""


def stop_process(process: subprocess.Popen[Any], timeout: float = 30.0) -> int | None:
    """SIGTERM a child process, wait up to ``timeout`` seconds, then SIGKILL; its exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) process cannot handle SIGTERM
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when its parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class ChildProcess:
    """``cmd`` in a child process, stdout and stderr appended to ``log`` (discarded without).

    ``env`` is added to this process's environment. ``die_with_parent``: the child gets
    SIGTERM if this process dies first, even by SIGKILL (Linux), for children that must never
    outlive it (the embedded broker).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.cmd = list(cmd)
        self.log_path = log
        self._log: IO[bytes] | None = None
        if log is not None:
            self._log = open(log, "ab")  # noqa: SIM115 - closed in stop() / kill()
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent if die_with_parent else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, signum: int) -> None:
        """``signum`` to a running child (nothing once it has exited)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def log_tail(self, n: int = 3000) -> str:
        """The last ``n`` characters of the child's output ("" without a log)."""
        if self.log_path is None:
            return ""
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def wait(self, timeout: float | None = None) -> int:
        """The exit status, once the child has exited (``subprocess.TimeoutExpired`` after
        ``timeout`` seconds)."""
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout`` seconds; the exit status."""
        returncode = stop_process(self.proc, timeout)
        self._close_log()
        return returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean-up in the child."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()


def run_child(
    cmd: Sequence[str],
    *,
    what: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run ``cmd`` to its end and return its stdout; stderr (and then stdout) are appended to
    ``log`` after a ``$ cmd`` line. A non-zero exit raises :class:`ChildFailed` with the
    log's tail; Ctrl-C or ``timeout`` kills the child first (nothing is left running)."""
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=f,
            env={**os.environ, **(env or {})},
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except BaseException:  # Ctrl-C or timeout: leave nothing running
            proc.kill()
            proc.wait()
            raise
        f.write(out)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ChildFailed(f"{what} failed (exit {proc.returncode}); its log:\n{tail}")
    return out.decode(errors="replace")


def on_stop_signal(handler: SignalHandler) -> Callable[[], None]:
    """Call ``handler`` on SIGINT and SIGTERM (from the main thread); returns a function that
    puts the previous handlers back."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


@contextlib.contextmanager
def stop_signals(*, interrupt: bool = False) -> Iterator[threading.Event]:
    """While inside, SIGINT and SIGTERM set the event this yields; with ``interrupt`` they also
    raise ``KeyboardInterrupt``, so blocking code unwinds on SIGTERM as it does on Ctrl-C.
    The previous handlers come back on exit."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if interrupt:
            raise KeyboardInterrupt

    restore = on_stop_signal(handler)
    try:
        yield stop
    finally:
        restore()
