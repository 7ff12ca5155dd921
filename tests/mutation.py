"""Mutation check: plant deliberate bugs in a copy of the code and run the tests that should
catch each one. Every mutant must make its tests fail ("killed").

    python tests/mutation.py            # all mutants; exit 1 unless every one is killed
    python tests/mutation.py --list
    python tests/mutation.py logq mrr   # some of them, by name

The copy is the working tree (tracked and untracked, not ignored files) in a temporary
directory, run with ``PYTHONPATH`` pointing at it, so an installed streamrec never interferes.
The unmutated copy is run first: its tests must pass, or a kill would mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "dedup",
        "skip offset deduplication (a redelivered click is applied again)",
        "streamrec/serving/input_topic.py",
        "        if rec_offset < 0 or partition != rec_partition or rec_offset > offset:\n"
        "            return False\n",
        "        return False\n",
        ("tests/streamrec/test_core.py",),
    ),
    Mutant(
        "incarnation",
        "positions ignore the topic's incarnation (a re-created topic freezes returning users)",
        "streamrec/serving/input_topic.py",
        "        if incarnation and self.incarnation and incarnation != self.incarnation:",
        "        if False:",
        ("tests/streamrec/test_hostile_sequences.py",),
    ),
    Mutant(
        "end-bound",
        "a position beyond the partition's end is a duplicate source (a forged state freezes)",
        "streamrec/serving/input_topic.py",
        "        return end is None or offset < end",
        "        return True",
        ("tests/streamrec/test_hostile_sequences.py",),
    ),
    Mutant(
        "dead-letters-vote",
        "a refused event keeps its key's vote, at the refused skew (dead letters move the clock)",
        "streamrec/serving/clock.py",
        "        if self.accepted[slot]:\n            self.accepted[slot] = False\n"
        "            self.votes -= 1\n            self._changed += 1\n"
        "        self.skews[slot] = skew\n",
        "        self.skews[slot] = skew\n        if self.accepted[slot]:\n"
        "            self._changed += 1\n            return False\n",
        ("tests/streamrec/test_hostile_sequences.py",),
    ),
    Mutant(
        "ahead-refused",
        "an event far ahead of its partition's clock is refused (a replay's active keys lost)",
        "streamrec/serving/clock.py",
        "        if median is None or skew - median >= -self.max_skew:\n"
        "            c.vote(key, skew)\n            return None\n"
        "        recent = c.recent_median(self.min_keys)\n"
        "        if recent is not None and skew - recent >= -self.max_skew:",
        "        if median is None or abs(skew - median) <= self.max_skew:\n"
        "            c.vote(key, skew)\n            return None\n"
        "        recent = c.recent_median(self.min_keys)\n"
        "        if recent is not None and abs(skew - recent) <= self.max_skew:",
        ("tests/streamrec/test_semantics.py",),
    ),
    Mutant(
        "idle",
        "never end idle sessions",
        "streamrec/serving/expiry.py",
        "        if t is not None and t - s.last_time > config.session_gap_seconds:",
        "        if False:",
        ("tests/streamrec/test_core.py", "tests/streamrec/test_semantics.py"),
    ),
    Mutant(
        "ttl",
        "never expire idle users (the one rule both engines and the tests run)",
        "streamrec/serving/expiry.py",
        "        if t is None or t - u.last_time <= ttl:",
        "        if True:",
        ("tests/streamrec/test_core.py", "tests/streamrec/test_store.py"),
    ),
    Mutant(
        "swap",
        "swap a new model in without validating it",
        "streamrec/serving/served_model.py",
        "            new.validate(holdout, reference_recall=reference_recall,"
        " gate_ratio=self.gate_ratio)\n",
        "            pass\n",
        ("tests/streamrec/test_runtime.py",),
    ),
    Mutant(
        "logq",
        "drop the logQ correction from the training loop",
        "trainer/train.py",
        '        self.use_logq = p.loss == "cross-entropy" and p.logq > 0',
        "        self.use_logq = False",
        ("tests/trainer/test_training_parts.py",),
    ),
    Mutant(
        "mrr",
        "off-by-one in the MRR rank (1 / (rank + 1))",
        "trainer/metrics.py",
        "torch.where(within, 1.0 / r.unsqueeze(0), 0.0)",
        "torch.where(within, 1.0 / (r.unsqueeze(0) + 1), 0.0)",
        ("tests/trainer/test_evaluate.py", "tests/trainer/test_trainer_cli.py"),
    ),
    Mutant(
        "rank",
        "conservative rank counts only strictly higher items",
        "trainer/metrics.py",
        "        r = (scores >= target_scores).sum(dim=1).to(torch.float32)",
        "        r = (scores > target_scores).sum(dim=1).to(torch.float32)",
        ("tests/trainer/test_evaluate.py", "tests/trainer/test_trainer_cli.py"),
    ),
    Mutant(
        "reset",
        "training carries the hidden state across session boundaries",
        "trainer/train.py",
        "        hs = [h * self.keep for h in self.hidden]",
        "        hs = list(self.hidden)",
        ("tests/trainer/test_batching.py",),
    ),
    Mutant(
        "wait",
        "the session scheduler lets a user's sessions overlap when asked to wait",
        "trainer/batching.py",
        "    if users is None:\n        return 0, t\n",
        "    if True:\n        return 0, t\n",
        ("tests/trainer/test_batching.py", "tests/trainer/test_hrnn.py"),
    ),
    Mutant(
        "gate",
        "the quality gate lets every candidate through",
        "streamrec/model/gate.py",
        "    if lower >= margin - FLOAT_SLACK:",
        "    if True:",
        ("tests/streamrec/test_gate.py", "tests/trainer/test_retrain.py"),
    ),
    Mutant(
        "clock",
        "the stream clock runs on wall time",
        "streamrec/serving/clock.py",
        "        return (time.time() if wall is None else wall) + median",
        "        return time.time() if wall is None else wall",
        ("tests/streamrec/test_core.py", "tests/streamrec/test_semantics.py"),
    ),
    # the six gaps an outside mutation pass found (bench/results/mutation-testing.md)
    Mutant(
        "hrnnuser",
        "a session end advances the user from the empty user state, not the user's own",
        "streamrec/serving/pipeline.py",
        "    users = model.end_session(_user_ctx(keys, model), finals)",
        "    users = model.end_session(model.initial_user_states(len(keys)), finals)",
        ("tests/streamrec/test_hrnn_serving.py",),
    ),
    Mutant(
        "sweepver",
        "the sweep ends a session from before a swap without re-encoding it",
        "streamrec/serving/expiry.py",
        "            migrate_states([k], model, stats)  # re-encodes s in place",
        "            pass",
        ("tests/streamrec/test_hrnn_serving.py",),
    ),
    Mutant(
        "dupid",
        "only the last applied event id counts as a duplicate",
        "streamrec/serving/pipeline.py",
        "            and ev.event_id in s.event_ids\n",
        "            and bool(s.event_ids) and ev.event_id == s.event_ids[-1]\n",
        ("tests/streamrec/test_semantics.py",),
    ),
    Mutant(
        "btlost",
        "the backtest never counts a lost click",
        "streamrec/tools/backtest_metrics.py",
        "    return Answers(first, duplicates, len(wanted) - len(first))",
        "    return Answers(first, duplicates, 0)",
        ("tests/streamrec/test_backtest.py::test_lost_and_duplicate_clicks_are_counted_per_click",),
    ),
    Mutant(
        "btexit",
        "the backtest command exits 1 only on lost clicks, not on duplicates",
        "streamrec/cli/commands.py",
        '    if report["lost"] or report["duplicates"]:',
        '    if report["lost"]:',
        (
            "tests/streamrec/test_backtest.py::"
            "test_the_backtest_command_exits_1_when_a_click_is_lost_or_duplicated",
        ),
    ),
    Mutant(
        "fsync",
        "an atomic write fsyncs its file after the rename (a crash can publish an empty file)",
        "streamrec/loop/files.py",
        "            self.sync(f)\n        self.rename(tmp, path)\n",
        "            self.rename(tmp, path)\n            self.sync(f)\n",
        ("tests/streamrec/test_atomic_writes.py",),
    ),
    Mutant(
        "pointer",
        "the registry's CURRENT pointer is written in place",
        "streamrec/loop/registry.py",
        '(version + "\\n").encode(), str(models / TMP_POINTER))',
        '(version + "\\n").encode(), str(models / POINTER))',
        ("tests/streamrec/test_atomic_writes.py",),
    ),
    Mutant(
        "archcommit",
        "the archiver commits a range before its file is written",
        "streamrec/loop/archiver.py",
        "            size = self.storage.write_atomic(rel, table)\n",
        "            self.consumer.commit(\n"
        "                offsets=[TopicPartition(self.topic, partition, buf.last + 1)],\n"
        "                asynchronous=False,\n"
        "            )\n"
        "            size = self.storage.write_atomic(rel, table)\n",
        ("tests/streamrec/test_archiver_unit.py",),
    ),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        src = ROOT / f.decode()
        if src.is_file():
            (dest / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f.decode())


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def failed_tests(output: str) -> list[str]:
    return [line.split(" ")[1] for line in output.splitlines() if line.startswith("FAILED ")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Plant bugs in a copy; each must fail its tests.")
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:8s} {m.what}  [{m.path}; {' '.join(m.tests)}]")
        return 0
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="streamrec-mutants-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        copy_tree(tree)
        tests = tuple(sorted({t for m in chosen for t in m.tests}))
        rc, out, secs = run_tests(tree, tests)
        if rc != 0:
            print(out[-3000:])
            print("the unmutated code fails its tests: no mutant can be judged")
            return 2
        print(f"unmutated: {len(tests)} test files pass ({secs:.0f} s)")
        killed = 0
        for m in chosen:
            target = tree / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name}: the code to mutate is not in {m.path} exactly once (stale?)")
                return 2
            target.write_text(original.replace(m.old, m.new))
            try:
                rc, out, secs = run_tests(tree, m.tests)
            finally:
                target.write_text(original)
            caught = rc != 0
            killed += caught
            by = ", ".join(failed_tests(out)) or (out.strip().splitlines() or ["?"])[-1]
            verdict = f"KILLED by {by}" if caught else "SURVIVED"
            print(f"{m.name:8s} {m.what}: {verdict} ({secs:.0f} s)")
        print(f"kill rate: {killed}/{len(chosen)} = {killed / len(chosen):.0%}")
        return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
