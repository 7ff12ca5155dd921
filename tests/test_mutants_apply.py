"""The mutation check (tests/mutation.py) plants each bug by replacing one exact line of the
code: when the code changes under it, the mutant silently stops applying. This fails first."""

from __future__ import annotations

from pathlib import Path

import pytest
from mutation import MUTANTS, ROOT, Mutant  # tests/ is on sys.path (pytest rootdir)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_each_mutant_applies_to_exactly_one_place(mutant: Mutant) -> None:
    text = (ROOT / mutant.path).read_text()
    assert text.count(mutant.old) == 1, f"{mutant.name}: its line is gone from {mutant.path}"
    for t in mutant.tests:
        assert (ROOT / t.split("::")[0]).is_file(), t  # a file, or one test in it
    assert Path(mutant.path).suffix == ".py"
