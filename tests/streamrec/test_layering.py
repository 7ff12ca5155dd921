"""What the import contracts (pyproject.toml [tool.importlinter], `make lint`,
tests/test_import_contracts.py) cannot see: the worker runs without ``trainer``, and the
worker image carries none of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_worker_runs_without_the_trainer_package() -> None:
    """What the worker image holds: the worker command works with ``trainer`` unimportable."""
    code = (
        "import sys\n"
        "sys.modules['trainer'] = None  # any import of it now raises ImportError\n"
        "import streamrec.engines.native.worker, streamrec.engines.faust.app\n"
        "from streamrec.cli.main import main\n"
        "main(['worker', '--help'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Run one worker" in out.stdout


def test_worker_image_does_not_copy_the_trainer() -> None:
    copies = [
        line.split()[1]
        for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    ]
    assert "streamrec" in copies
    assert not [c for c in copies if c.startswith("trainer")]
