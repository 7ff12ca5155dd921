"""A seeded random sample of ``make mutation``'s mutants, N per module, printed one name a line
(for ``mutmut run``): the whole scope does not fit 2 hours on a shared 2-core machine, a sample
of each module gives its score with a confidence interval (``mutmut_summary.py`` prints both).

    python tests/mutmut_sample.py N [MODULE_GLOB ...] [--seed S]

Generates the mutants first (mutmut's own generation, into ``mutants/``) if none are there.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import random
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"


def generate() -> None:
    """mutmut run's first step alone (no tests run)."""
    from mutmut import __main__ as mm

    os.chdir(ROOT)
    os.environ["MUTANT_UNDER_TEST"] = "mutant_generation"
    mm.Config.ensure_loaded()
    MUTANTS.mkdir(exist_ok=True)
    mm.copy_src_dir()
    mm.copy_also_copy_files()
    mm.setup_source_paths()
    mm.store_lines_covered_by_tests()
    mm.create_mutants(1)


def names_by_module() -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        module = str(meta.relative_to(MUTANTS).with_suffix("").with_suffix("")).replace("/", ".")
        out[module] = sorted(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def sample(n: int, modules: list[str], seed: int) -> list[str]:
    """n mutants of each module matching one of the globs (all of a module with fewer)."""
    picked = []
    for module, names in sorted(names_by_module().items()):
        if modules and not any(fnmatch.fnmatch(module, m) for m in modules):
            continue
        # one generator per module, so adding a module leaves the others' samples unchanged
        rng = random.Random(f"{seed}:{module}")
        picked += sorted(rng.sample(names, min(n, len(names))))
    return picked


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("modules", nargs="*", help="module globs, e.g. streamrec.serving.pipeline")
    ap.add_argument("--seed", type=int, default=25)
    args = ap.parse_args()
    if not any(MUTANTS.rglob("*.py.meta")):
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the list of names
            generate()
    print("\n".join(sample(args.n, args.modules, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
