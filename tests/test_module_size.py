"""The floor plan's size rule: no module of the product or the trainer over 800 lines.

A module that grows past it holds more than one part; split it by role (docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 800


def test_no_module_exceeds_the_line_limit() -> None:
    too_long = {
        str(path.relative_to(ROOT)): n
        for package in ("streamrec", "trainer")
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines (split them by role): {too_long}"
