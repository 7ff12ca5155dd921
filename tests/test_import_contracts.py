"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they catch what they
are for: each import below is planted inside a function (where the old hand-written layering
test did not look) in a copy of the packages, and `lint-imports` must name the contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

PLANTS = [
    # (file, the function-level import planted there, the contract that must break)
    ("streamrec/loop/archive.py", "from streamrec.cli import commands", "rooms"),
    ("streamrec/loop/archive.py", "from streamrec.cli import commands", "cli-imported-by-nothing"),
    ("streamrec/kafka/tansu.py", "from streamrec.kafka import clients", "no-cycles"),
    ("streamrec/loop/archive.py", "from streamrec.serving import events", "rooms"),
    ("streamrec/model/api.py", "from streamrec.loop import registry", "rooms"),
    ("streamrec/serving/state.py", "import trainer.data", "serving-without-trainer"),
    ("streamrec/engines/common.py", "from streamrec.tools import replay", "rooms"),
    ("trainer/data.py", "from streamrec.serving import pipeline", "trainer-offline"),
    ("trainer/losses.py", "from trainer import presets", "no-cycles"),
    ("trainer/retrain.py", "from trainer.cli import options", "trainer-cli-imported-by-nothing"),
]


def _lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the packages under ``root`` with the project's configuration."""
    args = [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"]
    for contract in contracts:
        args += ["--contract", contract]
    return subprocess.run(
        args,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_project_keeps_its_import_contracts() -> None:
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.fixture(scope="module")
def packages_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("packages")
    for package in ("streamrec", "trainer"):
        shutil.copytree(
            ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return root


@pytest.mark.slow  # one lint-imports run per plant
@pytest.mark.parametrize(("path", "statement", "contract"), PLANTS)
def test_a_function_level_import_breaks_its_contract(
    packages_copy: Path, path: str, statement: str, contract: str
) -> None:
    target = packages_copy / path
    original = target.read_text()
    target.write_text(original + f"\n\ndef _planted() -> None:\n    {statement}  # noqa\n")
    try:
        done = _lint_imports(packages_copy, contract)
    finally:
        target.write_text(original)
    assert done.returncode == 1, done.stdout + done.stderr
    # (the real tree keeps every contract, so a broken one shows the copy was analysed)
    assert "1 broken" in done.stdout, done.stdout


@pytest.mark.slow
def test_a_new_module_must_be_given_its_layer(packages_copy: Path) -> None:
    new = packages_copy / "streamrec" / "unplaced.py"
    new.write_text('"""A module no layer names."""\n')
    try:
        done = _lint_imports(packages_copy, "rooms")
    finally:
        new.unlink()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "streamrec.unplaced" in done.stdout
