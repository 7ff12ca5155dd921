"""CI prints the reason of every skip and fails on any skip but the GPU tests' (no CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# each test runs pytest in a child process (seconds)
pytestmark = pytest.mark.slow

CONFTEST = Path(__file__).parent / "conftest.py"

TESTS = """
import pytest

@pytest.mark.gpu
def test_needs_gpu():
    pass

def test_plain():
    pass
"""


def _run(tmp_path: Path, extra: str = "", env: dict[str, str] | None = None) -> tuple[int, str]:
    import os

    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_x.py").write_text(TESTS + extra)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_gpu_skip_alone_passes(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs CUDA (runs on the GPU machine)")  # the GPU test runs here instead
    rc, out = _run(tmp_path)
    assert rc == 0, out
    assert "expected: test_x.py::test_needs_gpu: needs CUDA (runs on the GPU machine)" in out


def test_other_skips_are_printed_and_fail_the_run(tmp_path: Path) -> None:
    extra = """
def test_skipped():
    pytest.skip("no broker today")

@pytest.mark.skipif(True, reason="never here")
def test_skipif():
    pass
"""
    rc, out = _run(tmp_path, extra)
    assert rc == 1, out
    assert "UNEXPECTED: test_x.py::test_skipped: no broker today" in out
    assert "UNEXPECTED: test_x.py::test_skipif: never here" in out
    assert "2 unexpected skip(s) fail the run" in out
    rc, out = _run(tmp_path, extra, {"STREAMREC_TEST_ALLOW_SKIPS": "1"})
    assert rc == 0 and "UNEXPECTED: test_x.py::test_skipped: no broker today" in out
