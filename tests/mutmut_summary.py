"""The score of ``make mutation`` (mutmut's results in ``mutants/``), by module, and its
survivors: each with the line it changed, marked NEW unless ``bench/results/mutation-triage.tsv``
already triages it (so a run after new code shows what is left to look at).

    python tests/mutmut_summary.py [--survivors FILE]

Score: killed (a test failed, or the mutant ran out of time) over the mutants that were run
(``no tests``: no unit test reaches the function: counted apart, and as not killed), less the
ones triaged equivalent. Where only a sample of a module was run (``make mutation SAMPLE=N``),
its score is an estimate: the Wilson 95 % interval says how far off it may be.

Timeouts count neither way: mutmut forks its children from a process whose tests opened RocksDB,
and a child that flushes or closes a RocksDB then waits for the parent's background threads,
which a fork does not copy (a hang, not a kill). So a timeout is a mutant not measured.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
TRIAGE = ROOT / "bench" / "results" / "mutation-triage.tsv"
KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
          255: "timeout", -9: "killed", -11: "killed"}  # fmt: skip
NOT_KILLED = ("survived", "no tests", "suspicious")
STATUS = {0: "survived", 5: "no tests", 33: "no tests", None: "not checked", 37: "type check"}


def status(code: int | None) -> str:
    return KILLED.get(code, STATUS.get(code, "suspicious")) if code is not None else "not checked"


def mutant_change(source: list[str], spans: dict[str, list[int]], mangled: str) -> str:
    """The lines a mutant changed: its function against the original one."""
    base = mangled.rsplit("__mutmut_", 1)[0]
    o0, o1 = spans[f"{base}__mutmut_orig"]
    m0, m1 = spans[mangled]
    orig, mut = source[o0 - 1 : o1], source[m0 - 1 : m1]
    diff = difflib.unified_diff(orig[1:], mut[1:], n=0, lineterm="")  # def lines differ by name
    out = [d for d in diff if d[:1] in "+-" and not d.startswith(("+++", "---"))]
    return " / ".join(line[0] + " " + line[1:].strip() for line in out) or "(no change shown)"


def load_results() -> list[tuple[str, str, str, str]]:
    """(module path, mutant name, status, change) of every mutant."""
    rows = []
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        rel = meta.relative_to(MUTANTS).with_suffix("")  # streamrec/serving/clock.py
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        spans_file = meta.with_suffix(".spans")
        spans = json.loads(spans_file.read_text())["spans"] if spans_file.exists() else {}
        source = (MUTANTS / rel).read_text().splitlines()
        module = str(rel.with_suffix("")).replace("/", ".") + "."
        for name, code in codes.items():
            mangled = name.removeprefix(module)
            change = mutant_change(source, spans, mangled) if mangled in spans else "?"
            rows.append((str(rel), name, status(code), change))
    return rows


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of k successes in n draws (95 % for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_text(killed: int, counted: int) -> str:
    if counted == 0:
        return "-"
    lo, hi = wilson(killed, counted)
    return f"{killed}/{counted} {killed / counted:.1%} [{lo:.0%}, {hi:.0%}]"


def read_triage() -> dict[str, tuple[str, str]]:
    if not TRIAGE.exists():
        return {}
    with open(TRIAGE, newline="") as f:
        return {r["mutant"]: (r["verdict"], r["why"]) for r in csv.DictReader(f, delimiter="\t")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--survivors", type=Path, help="write every survivor with its change here")
    args = ap.parse_args(argv)
    if not MUTANTS.is_dir():
        print("no mutants/ here: run `make mutation` first", file=sys.stderr)
        return 2
    rows = load_results()
    triage = read_triage()
    by_module: dict[str, Counter[str]] = {}
    for path, name, st, _ in rows:
        by_module.setdefault(path, Counter())[st] += 1
        if st in NOT_KILLED and triage.get(name, ("",))[0] == "equivalent":
            by_module[path]["equivalent"] += 1
    total: Counter[str] = Counter()
    print(f"{'module':45s} {'mutants':>7s} {'killed':>7s} {'timeout':>7s} {'survived':>8s} "
          f"{'no tests':>8s} {'other':>6s}  non-equivalent killed [95 % interval]")  # fmt: skip
    for path, c in sorted(by_module.items()):
        total += c
        equivalent = c.pop("equivalent", 0)
        other = sum(c.values()) - c["killed"] - c["timeout"] - c["survived"] - c["no tests"]
        run_here = sum(c.values()) - c["not checked"] - c["timeout"]
        killed_here = c["killed"]
        print(f"{path:45s} {sum(c.values()):7d} {c['killed']:7d} {c['timeout']:7d} "
              f"{c['survived']:8d} {c['no tests']:8d} {other:6d}  "
              f"{score_text(killed_here, run_here - equivalent)}")  # fmt: skip
    total.pop("equivalent", 0)
    run = sum(total.values()) - total["not checked"] - total["timeout"]
    killed = total["killed"]
    print(f"total: {sum(total.values())} mutants, {run} run to a verdict "
          f"({total['timeout']} more timed out: not counted), {killed} killed "
          f"({killed / max(run, 1):.1%}), {total['survived']} survived, "
          f"{total['no tests']} without a unit test")  # fmt: skip
    open_rows = [r for r in rows if r[2] in NOT_KILLED]
    verdicts = Counter(triage[r[1]][0] for r in open_rows if r[1] in triage)
    new = [r for r in open_rows if r[1] not in triage]
    equivalent = verdicts["equivalent"]
    print(f"triaged: {sum(verdicts.values())} of {len(open_rows)} not killed "
          f"({dict(verdicts)}); NEW: {len(new)}")  # fmt: skip
    if run - equivalent > 0:
        print(f"score over the non-equivalent mutants: {score_text(killed, run - equivalent)}")
    for _, name, st, change in new:
        print(f"NEW {st}: {name}: {change}")
    if args.survivors:
        with open(args.survivors, "w") as f:
            for _, name, st, change in open_rows:
                verdict = triage.get(name, ("NEW", ""))[0]
                f.write(f"{name}\t{st}\t{verdict}\t{change}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
