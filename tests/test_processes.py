"""streamrec.processes: the one launcher of child processes and the one stop-signal helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamrec.processes import ChildFailed, ChildProcess, run_child, stop_signals

PY = sys.executable


def _ready(child: ChildProcess, line: str) -> None:
    """Wait until the child's log shows ``line`` (it has installed its handlers)."""
    deadline = time.monotonic() + 30
    while line not in child.log_tail():
        assert child.alive(), child.log_tail()
        assert time.monotonic() < deadline, f"the child never said {line!r}"
        time.sleep(0.01)


def test_a_child_writes_to_its_log_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = ChildProcess([PY, "-c", code], env={"X": "1"}, log=tmp_path / "child.log")
    _ready(child, "ready")
    assert child.alive()
    assert child.stop(timeout=10) == 3  # its own clean exit, not a SIGKILL
    assert not child.alive()


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = ChildProcess([PY, "-c", code], log=tmp_path / "child.log")
    _ready(child, "ready")
    assert child.stop(timeout=0.5) == -signal.SIGKILL


def test_a_paused_child_still_stops(tmp_path: Path) -> None:
    child = ChildProcess([PY, "-c", "import time; print('ready', flush=True); time.sleep(60)"])
    child.send_signal(signal.SIGSTOP)
    assert child.stop(timeout=10) == -signal.SIGTERM  # SIGCONT first, then SIGTERM worked


def test_run_child_returns_stdout_and_reports_a_failure_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    out = run_child(
        [PY, "-c", "import os; print(os.environ['X'])"], what="echo", log=log, env={"X": "42"}
    )
    assert out.strip() == "42"
    assert "42" in log.read_text()
    code = "import sys; print('went wrong', file=sys.stderr); sys.exit(2)"
    with pytest.raises(ChildFailed, match=r"(?s)failing step failed \(exit 2\).*went wrong"):
        run_child([PY, "-c", code], what="failing step", log=log)


def test_run_child_leaves_nothing_running_after_a_timeout(tmp_path: Path) -> None:
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([PY, "-c", code], what="sleeper", log=tmp_path / "run.log", timeout=1)
    # the child printed into the pipe that was abandoned: find it by its command line instead
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert code not in ps


def test_stop_signals_set_the_event_and_put_the_handlers_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) == before


def test_stop_signals_can_unwind_blocking_code_as_ctrl_c_does() -> None:
    with pytest.raises(KeyboardInterrupt), stop_signals(interrupt=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        stop.wait(5)
    assert stop.is_set()
