"""Reruns ``make mutation``'s timed-out mutants (and, with ``--unrun``, those not run yet), each
in a new process instead of mutmut's fork, and writes the verdict back into ``mutants/`` (so
``mutmut_summary.py`` counts it).

mutmut forks every child from a process whose tests opened RocksDB; a child that flushes or
closes a RocksDB then waits for the parent's background threads, which a fork does not copy,
and mutmut calls the hang a timeout. A fresh process has no such state: there a mutant's tests
fail (killed), pass (survived), or run past the limit (a real timeout).

    python tests/mutmut_rerun_timeouts.py [--limit SECONDS] [--unrun] [MUTANT_GLOB ...]
    python tests/mutmut_rerun_timeouts.py --again --tests TEST_ID ... -- MUTANT ...

``--again`` reruns the named mutants whatever their verdict, with ``--tests`` added to the ones
mutmut's stats saw reach them (a test written after the stats run, copied into ``mutants/``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
TIMEOUT_CODES = {36, 24, -24, 152, 255}


def tests_of(mutant: str) -> list[str]:
    """The tests mutmut's stats run saw reach the mutant's function."""
    stats = json.loads((MUTANTS / "mutmut-stats.json").read_text())
    mangled = mutant.rsplit("__mutmut_", 1)[0]
    return sorted(stats["tests_by_mangled_function_name"].get(mangled, []))


def pytest_exit(mutant: str, tests: list[str], limit: float, extra: list[str]) -> int:
    """pytest's exit status over ``tests`` with ``mutant`` switched on ("": none), 36 past
    ``limit`` seconds."""
    env = dict(os.environ, MUTANT_UNDER_TEST=mutant, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(MUTANTS), str(MUTANTS / "tests")]))  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "--rootdir=.", "-p", "no:randomly",
           *tests, *extra]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=MUTANTS, env=env, capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return 36
    return done.returncode


def run_one(
    mutant: str, limit: float, extra: list[str], more_tests: list[str] | None = None
) -> int:
    """mutmut's exit code for the mutant: 1 killed, 0 survived, 36 timeout, 33 no tests.

    In a new process the test modules are collected with the mutant on, so a mutant that
    breaks a module's set-up is an error of collection (2) or of usage (4: its tests were
    not found): killed when the same tests pass with no mutant; otherwise reported as is."""
    tests = tests_of(mutant) + (more_tests or [])
    if not tests:
        return 33
    code = pytest_exit(mutant, tests, limit, extra)
    if code not in (0, 1, 36) and pytest_exit("", tests, limit, extra) == 0:
        return 1
    return code


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=300.0, help="seconds per mutant")
    ap.add_argument("--unrun", action="store_true", help="also the mutants not run yet")
    ap.add_argument(
        "--again", action="store_true", help="rerun these mutants whatever their verdict"
    )
    ap.add_argument("--tests", nargs="*", default=[], help="tests to add to the stats' ones")
    ap.add_argument("globs", nargs="*", default=["*"])
    args = ap.parse_args()
    extra = ["-p", "no:cacheprovider", "-p", "mutmut_compat"]
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        for name, code in sorted(codes.items()):
            wanted = args.again or code in TIMEOUT_CODES or (args.unrun and code is None)
            if not wanted or not any(fnmatch.fnmatch(name, g) for g in args.globs):
                continue
            codes[name] = run_one(name, args.limit, extra, args.tests)
            print(f"{name}: {'timeout' if codes[name] == 36 else codes[name]}", flush=True)
            meta.write_text(json.dumps(data, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
