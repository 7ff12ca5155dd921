"""The whole evidence matrix of bench/results/accuracy-beyond-gru4rec.md in one place: the data
splits, which runs are still missing, running them (several at once where cores or a GPU
allow), and the table of means.

    # 1. the splits, from the shared data sets (the repository never holds them)
    PYTHONPATH=. .venv/bin/python bench/accuracy_matrix.py splits \
        --shared ../shared/data --out /tmp/splits
    # 2. what is missing from the runs file (commands, one per line)
    PYTHONPATH=. .venv/bin/python bench/accuracy_matrix.py plan --splits /tmp/splits \
        --official /tmp/official
    # 3. run the missing cells, N at a time (each with OMP_NUM_THREADS=1; --device cuda on a GPU)
    PYTHONPATH=. .venv/bin/python bench/accuracy_matrix.py run --splits /tmp/splits \
        --official /tmp/official --jobs 2 [--data yoochoose-1_64] [--seeds 1] \
        [--start-within MINUTES]   # start no cell after that (a lent machine's time)
    # 4. means per data set and arm, and the goal's ratio against the authors' code
    #    (--write: into the results file's tables)
    PYTHONPATH=. .venv/bin/python bench/accuracy_matrix.py table [--write]

A cell is one (phase, data set, arm, seed): the authors' code with its parameter file
(``official``, bench/official_gru4rec.py), the project's parity preset (``paper``), the
defaults (``defaults``) and one ablation per part of the mechanism (bench/accuracy_memory.py),
each at every seed. The authors publish no parameter file for the ML-1M sessions: the
file their code does best with on the ML-1M validation split (seed 1, phase ``choice``) is
taken as its best published file there, for every arm.

HRNN and p-RNN (data ``ml1k-test``: the ML-1M 1k-user split with user ids of
bench/ml1k_users.py, test sessions from 2001-01-01) have no authors' code to run here: their
cells are each model at its defaults (``hrnn-defaults``, the session memory on) and without the
session memory (``hrnn-no-session-memory``: ``session_memory=0``), per seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNS = Path(__file__).parent / "results" / "accuracy-beyond-gru4rec-runs.jsonl"
SEEDS = (1, 2, 3)
#: the authors' published parameter files (paramfiles/ of their repository)
PARAMFILES = (
    "yoochoose_xe_shared_best",
    "rsc15_xe_shared_100_best",
    "rees46_xe_shared_best",
    "coveo_bprmax_shared_best",
    "diginetica_bprmax_shared_best",
    "retailrocket_bprmax_shared_best",
)
#: one ablation per part of the mechanism: the gate, the memory's size
ABLATIONS = {"ablation-no-gate": ["memory_gate=0"], "ablation-k16": ["session_memory=16"]}
ML1M = "ml1m-sessions"
#: HRNN / p-RNN: the 1k-user ML-1M test split (files of bench/ml1k_users.py), its models, and
#: p-RNN's item features (ML-1M's items.tsv.gz, copied into the splits folder)
HIER = "ml1k-test"
HIER_FILES = ("ml1k_users_train_full.tsv", "ml1k_users_test.tsv")
HIER_MODELS = ("hrnn", "prnn")
ITEM_META = "ml1m_items.tsv.gz"


@dataclass(frozen=True)
class DataSet:
    name: str
    train: str  # file names in the splits folder
    test: str
    valid: tuple[str, str]  # (train, validation)
    paramfile: str | None  # None: chosen on the validation split


DATA_SETS = {
    d.name: d
    for d in (
        DataSet(
            "yoochoose-1_64",
            "yoochoose_train.tsv",
            "yoochoose_test.tsv",
            ("yoochoose_train_tr.tsv", "yoochoose_train_valid.tsv"),
            "yoochoose_xe_shared_best",
        ),
        DataSet(
            "rsc15-100k",
            "rsc15_train_full.tsv",
            "rsc15_test.tsv",
            ("rsc15_train_tr.tsv", "rsc15_train_valid.tsv"),
            "rsc15_xe_shared_100_best",
        ),
        DataSet(
            ML1M,
            "ml1m_train_full.tsv",
            "ml1m_test.tsv",
            ("ml1m_train_tr.tsv", "ml1m_train_valid.tsv"),
            None,
        ),
    )
}


# ----------------------------------------------------------------------------- splits


def _save(df: pd.DataFrame, path: Path) -> None:
    df = df[["SessionId", "ItemId", "Time"]].astype({"SessionId": "int64"})
    df.sort_values(["SessionId", "Time"], kind="stable").to_csv(path, sep="\t", index=False)
    print(f"{path}: {len(df):,} events, {df.SessionId.nunique():,} sessions", file=sys.stderr)


def write_splits(shared: Path, out: Path) -> None:
    """Every file the matrix reads, from the shared data sets:

    * rsc15-100k: its four files as they are;
    * yoochoose 1/64: train and test as they are; validation = the sessions of train whose
      first event is among the last 12.5% of train's session start times (items seen in the
      rest, sessions of 2 or more);
    * ML-1M sessions: each user's ratings split at 30-minute gaps (``sessionize``), consecutive
      repeats removed, items with 5 or more events, sessions of 2 or more (``preprocess``);
      test = the sessions starting on or after 2001-01-01, validation = those of the rest
      starting on or after 2000-12-01 (``split_by_time``);
    * the ML-1M 1k-user split with user ids (bench/ml1k_users.py) and ML-1M's item features.
    """
    from streamrec.data.clicklog import sessionize
    from trainer.data import preprocess, split_by_time

    out.mkdir(parents=True, exist_ok=True)
    for name in ("train_full", "test", "train_tr", "train_valid"):
        raw = gzip.decompress((shared / "rsc15-100k" / f"{name}.tsv.gz").read_bytes())
        (out / f"rsc15_{name}.tsv").write_bytes(raw)
    y = pd.read_csv(shared / "yoochoose-1_64" / "train.tsv.gz", sep="\t", dtype={"ItemId": str})
    _save(y, out / "yoochoose_train.tsv")
    yt = pd.read_csv(shared / "yoochoose-1_64" / "test.tsv.gz", sep="\t", dtype={"ItemId": str})
    _save(yt, out / "yoochoose_test.tsv")
    start = y.groupby("SessionId").Time.transform("min")
    cut = np.quantile(y.groupby("SessionId").Time.min(), 1 - 0.125)
    y_tr, y_va = y[start < cut], y[start >= cut]
    y_va = y_va[y_va.ItemId.isin(set(y_tr.ItemId))]
    y_va = y_va[y_va.groupby("SessionId").SessionId.transform("size") >= 2]
    _save(y_tr, out / "yoochoose_train_tr.tsv")
    _save(y_va, out / "yoochoose_train_valid.tsv")

    r = pd.read_csv(
        shared / "movielens-1m" / "ratings.tsv.gz", sep="\t", dtype={"UserId": str, "ItemId": str}
    )
    s = preprocess(sessionize(r[["UserId", "ItemId", "Time"]].astype({"Time": float}), 1800))
    codes, _ = pd.factorize(s.SessionId)
    s = s.assign(SessionId=codes + 1)
    train, test = split_by_time(s, _days_from(s, "2001-01-01"))
    _save(train, out / "ml1m_train_full.tsv")
    _save(test, out / "ml1m_test.tsv")
    tr, va = split_by_time(train, _days_from(train, "2000-12-01"))
    _save(tr, out / "ml1m_train_tr.tsv")
    _save(va, out / "ml1m_train_valid.tsv")

    from ml1k_users import ml1k_user_splits, save  # bench/, beside this script

    for name, df in ml1k_user_splits(r).items():
        save(df, out / name)
    (out / ITEM_META).write_bytes((shared / "movielens-1m" / "items.tsv.gz").read_bytes())


def _days_from(df: pd.DataFrame, date: str) -> float:
    return float((df.Time.max() - pd.Timestamp(date).timestamp()) / 86400)


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    phase: str  # "final" (test split) or "choice" (validation split, the ML-1M file)
    data: str
    arm: str
    seed: int
    preset: str  # the authors' parameter file, or the project's preset ("" for HRNN, p-RNN)
    model: str = "gru4rec"

    def key(self) -> tuple[str, str, str, int, str]:
        """What a run of this cell records (the choice's cells differ by their file alone)."""
        return self.phase, self.data, self.arm, self.seed, self.preset


def read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(run: dict[str, Any]) -> tuple[str, str, str, int, str]:
    """:meth:`Cell.key` of the cell ``run`` is a run of (HRNN's and p-RNN's record no preset)."""
    phase, data, arm = run.get("phase", ""), run.get("data", ""), run.get("arm", "")
    return phase, data, arm, int(run.get("seed", 0)), run.get("preset") or ""


def _choice_runs(runs: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The authors' code on the ML-1M validation split, by parameter file."""
    return {
        r["preset"]: r
        for r in runs
        if r.get("phase") == "choice" and r.get("data") == f"{ML1M}-valid"
    }


def chosen_paramfile(runs: Iterable[dict[str, Any]]) -> str | None:
    """The authors' file with the best MRR@20 on the ML-1M validation split (None until every
    file has its run)."""
    got = _choice_runs(runs)
    if set(got) != set(PARAMFILES):
        return None
    return max(PARAMFILES, key=lambda f: got[f]["metrics"]["mrr@20"])


def wanted(
    runs: list[dict[str, Any]], data: Iterable[str], seeds: Iterable[int] = SEEDS
) -> list[Cell]:
    """The cells of ``data`` at ``seeds`` that the runs lack, in the order to run them: the
    ML-1M choice first (its test cells wait for it), then the goal's three arms seed by seed (a
    partial matrix is complete per seed), then the ablations seed by seed."""
    done = {_key(r) for r in runs}
    cells: list[Cell] = []
    for name in data:
        if name == HIER:
            cells += [
                Cell("final", HIER, f"{model}-{arm}", seed, "", model)
                for seed in seeds
                for model in HIER_MODELS
                for arm in ("defaults", "no-session-memory")
            ]
            continue
        ds = DATA_SETS[name]
        paramfile = ds.paramfile
        if paramfile is None:
            cells += [Cell("choice", f"{name}-valid", "official", 1, f) for f in PARAMFILES]
            paramfile = chosen_paramfile(runs)
            if paramfile is None:
                continue
        for seed in seeds:
            cells += [
                Cell("final", name, "official", seed, paramfile),
                Cell("final", name, "defaults", seed, paramfile),
                Cell("final", name, "paper", seed, f"{paramfile}_paper"),
            ]
        cells += [Cell("final", name, arm, seed, paramfile) for seed in seeds for arm in ABLATIONS]
    return [c for c in cells if c.key() not in done]


def command(cell: Cell, splits: Path, official: Path, out: Path, device: str) -> list[str]:
    """The command line of one cell (the two bench scripts record it with their figures)."""
    if cell.model != "gru4rec":
        return _hier_command(cell, splits, out, device)
    ds = DATA_SETS[cell.data.removesuffix("-valid")]
    train, test = ds.valid if cell.phase == "choice" else (ds.train, ds.test)
    common = ["--data", cell.data, "--train", str(splits / train), "--test", str(splits / test)]
    common += ["--phase", cell.phase, "--out", str(out)]
    if cell.arm == "official":
        script = ["bench/official_gru4rec.py", "--official", str(official)]
        args = ["--paramfile", cell.preset, "--seed", str(cell.seed), "--device", device]
    else:
        script = ["bench/accuracy_memory.py", "--preset", cell.preset, "--arm", cell.arm]
        args = _param_args(cell.seed, device, ABLATIONS.get(cell.arm, []))
    return [sys.executable, *script, *common, *args]


def _hier_command(cell: Cell, splits: Path, out: Path, device: str) -> list[str]:
    args = ["bench/accuracy_memory.py", "--model", cell.model]
    if cell.model == "prnn":
        args += ["--item-meta", str(splits / ITEM_META)]
    args += ["--data", cell.data, "--train", str(splits / HIER_FILES[0])]
    args += ["--test", str(splits / HIER_FILES[1]), "--phase", cell.phase, "--out", str(out)]
    off = ["session_memory=0"] if cell.arm.endswith("-no-session-memory") else []
    return [sys.executable, *args, "--arm", cell.arm, *_param_args(cell.seed, device, off)]


def _param_args(seed: int, device: str, extra: list[str]) -> list[str]:
    """``--param`` options: the seed, the device where it is not the CPU, then ``extra``."""
    params = [f"seed={seed}", *([f"device={device}"] if device != "cpu" else []), *extra]
    return [x for kv in params for x in ("--param", kv)]


def run_cells(
    cells: list[Cell], cmds: list[list[str]], jobs: int, start_within: float | None = None
) -> int:
    """Run ``cmds`` ``jobs`` at a time (one thread each); the number that failed. With
    ``start_within`` (seconds), a cell not started by then is left for a later run (a machine
    lent for a while: a run cut off at the end records nothing)."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": "."}
    deadline = None if start_within is None else time.monotonic() + start_within

    def one(i: int) -> int:
        if deadline is not None and time.monotonic() > deadline:
            print(f"not started (past --start-within) {cells[i]}", file=sys.stderr, flush=True)
            return 0
        print(f"start {cells[i]}", file=sys.stderr, flush=True)
        done = subprocess.run(cmds[i], env={**os.environ, **env}, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"FAILED {cells[i]}:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        else:
            print(f"done {cells[i]}", file=sys.stderr, flush=True)
        return done.returncode

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return sum(rc != 0 for rc in pool.map(one, range(len(cells))))


# ----------------------------------------------------------------------------- table


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per data set and arm, the seeds run and the mean Recall@20 / MRR@20 of the
    test runs; the ratio of the defaults' means to the authors' code where both have the same
    seeds (the goal: MRR@20 at least 1.02x, Recall@20 at least 1.00x)."""
    final = [r for r in runs if r.get("phase") == "final"]
    rows = [
        "| data set | arm | seeds | Recall@20 | MRR@20 | vs official (R / MRR) |",
        "|---|---|---|---|---|---|",
    ]
    for name in DATA_SETS:
        by_arm = _by_arm(r for r in final if r["data"] == name)
        rows += _mean_rows(name, by_arm, "official")
    return "\n".join(rows)


def hier_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: HRNN and p-RNN on the 1k-user test split, per model and arm, the seeds run and
    the mean Recall@20 / MRR@20; the defaults' ratio to the same model without the session
    memory at the same seeds."""
    final = [r for r in runs if r.get("phase") == "final" and r.get("data") == HIER]
    rows = [
        "| model | arm | seeds | Recall@20 | MRR@20 | vs no session memory (R / MRR) |",
        "|---|---|---|---|---|---|",
    ]
    for model in HIER_MODELS:
        by_arm = _by_arm(r for r in final if r["arm"].startswith(f"{model}-"))
        rows += _mean_rows(model, by_arm, f"{model}-no-session-memory")
    return "\n".join(rows)


def _by_arm(runs: Iterable[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """The runs' metrics by arm and seed."""
    by_arm: dict[str, dict[int, dict[str, float]]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[int(r["seed"])] = r["metrics"]
    return by_arm


def _mean_rows(label: str, by_arm: dict[str, dict[int, dict[str, float]]], base: str) -> list[str]:
    """One table row per arm (``base`` first, then :func:`_arm_order`): its seeds, its mean
    Recall@20 / MRR@20 and, where arm ``base`` has every one of its seeds, the ratio to
    ``base``'s means at those seeds."""

    def means(metrics: Iterable[dict[str, float]]) -> tuple[float, float]:
        ms = list(metrics)
        recall = statistics.fmean(m["recall@20"] for m in ms)
        return recall, statistics.fmean(m["mrr@20"] for m in ms)

    of_base = by_arm.get(base, {})
    rows = []
    for arm in sorted(by_arm, key=lambda a: (a != base, _arm_order(a))):
        seeds = by_arm[arm]
        recall, mrr = means(seeds.values())
        versus = ""
        if arm != base and set(seeds) <= set(of_base):
            b_recall, b_mrr = means(of_base[s] for s in seeds)
            versus = f"{recall / b_recall:.3f} / {mrr / b_mrr:.3f}"
        seed_list = ",".join(map(str, sorted(seeds)))
        rows.append(f"| {label} | {arm} | {seed_list} | {recall:.4f} | {mrr:.4f} | {versus} |")
    return rows


def choice_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: the authors' code on the ML-1M validation split with each published file
    (seed 1), and the file the test cells take (the best MRR@20, once every file has run)."""
    got = _choice_runs(runs)
    rows = [
        "| parameter file | Recall@20 | MRR@20 | date (UTC) |",
        "|---|---|---|---|",
    ]
    for f in PARAMFILES:
        if f in got:
            m = got[f]["metrics"]
            rows.append(f"| {f} | {m['recall@20']:.4f} | {m['mrr@20']:.4f} | {_date(got[f])} |")
        else:
            rows.append(f"| {f} | not run | | |")
    chosen = chosen_paramfile(runs)
    missing = [f for f in PARAMFILES if f not in got]
    rows.append("")
    rows.append(
        f"Chosen: `{chosen}`."
        if chosen
        else f"Chosen: none yet (waiting for {len(missing)} of {len(PARAMFILES)} files)."
    )
    return "\n".join(rows)


def runs_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per test run, in data set, seed and arm order."""
    rows = [
        "| data | arm | seed | Recall@20 | MRR@20 | Recall@10 | MRR@10 | Recall@5 | MRR@5 "
        "| train s | head fit s | load avg start/end (1 min) | date (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = [*DATA_SETS, HIER]
    final = [r for r in runs if r.get("phase") == "final" and r.get("data") in order]
    final.sort(key=lambda r: (order.index(r["data"]), int(r["seed"]), _arm_order(r["arm"])))
    for r in final:
        m = r["metrics"]
        figures = " | ".join(f"{m[f'{x}@{k}']:.4f}" for k in (20, 10, 5) for x in ("recall", "mrr"))
        head = r.get("memory_head")
        load = re.search(r"at start ([0-9.]+)/.*at end ([0-9.]+)/", r.get("machine", ""))
        rows.append(
            f"| {r['data']} | {r['arm']} | {r['seed']} | {figures} | {r.get('train_seconds')} "
            f"| {round(head['seconds'], 1) if head else '-'} "
            f"| {f'{load.group(1)} / {load.group(2)}' if load else '-'} "
            f"| {_date(r)} |"
        )
    return "\n".join(rows)


#: the tables of the results file, each between ``<!-- name -->`` and ``<!-- /name -->``
TABLES = {
    "final-table": runs_table,
    "means-table": table,
    "choice-table": choice_table,
    "hier-table": hier_table,
}
RESULTS = Path(__file__).parent / "results" / "accuracy-beyond-gru4rec.md"


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- {name} -->\n(.*?)\n?<!-- /{name} -->", re.DOTALL)


def tables_in(text: str) -> dict[str, str]:
    """The results file's tables by name, as they stand in ``text``."""
    found = {name: _block(name).search(text) for name in TABLES}
    return {name: m.group(1) for name, m in found.items() if m}


def with_tables(text: str, runs: list[dict[str, Any]]) -> str:
    """``text`` with each table made again from ``runs``."""
    for name, make in TABLES.items():
        found = _block(name).search(text)
        if not found:
            raise ValueError(f"the results file has no <!-- {name} --> block")
        block = f"<!-- {name} -->\n{make(runs)}\n<!-- /{name} -->"
        text = text[: found.start()] + block + text[found.end() :]
    return text


def _date(run: dict[str, Any]) -> str:
    """A run's recorded date as the tables show it: ``YYYY-MM-DD HH:MM`` (UTC)."""
    return str(run.get("date", ""))[:16].replace("T", " ")


def _arm_order(arm: str) -> tuple[int, str]:
    return ({"official": 0, "paper": 1, "defaults": 2}.get(arm, 3), arm)


# ----------------------------------------------------------------------------- CLI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("splits", help="write the split files")
    sp.add_argument("--shared", type=Path, required=True, help="the shared data folder")
    sp.add_argument("--out", type=Path, required=True)
    for name in ("plan", "run"):
        p = sub.add_parser(name, help=f"{name} the missing cells")
        p.add_argument("--splits", type=Path, required=True)
        p.add_argument("--official", type=Path, required=True, help="the authors' code")
        p.add_argument("--data", action="append", choices=sorted([*DATA_SETS, HIER]))
        p.add_argument("--seeds", default="1,2,3")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--runs", type=Path, default=RUNS)
        if name == "run":
            p.add_argument("--jobs", type=int, default=1)
            p.add_argument(
                "--start-within",
                type=float,
                metavar="MINUTES",
                help="start no cell after this many minutes (the rest waits for a later run)",
            )
    tp = sub.add_parser("table", help="means per data set and arm")
    tp.add_argument("--runs", type=Path, default=RUNS)
    tp.add_argument(
        "--write", type=Path, nargs="?", const=RESULTS, help="rewrite the results file's tables"
    )
    a = ap.parse_args()
    if a.what == "splits":
        write_splits(a.shared, a.out)
        return
    runs = read_runs(a.runs)
    if a.what == "table":
        if a.write:
            a.write.write_text(with_tables(a.write.read_text(), runs))
        else:
            print(*(make(runs) for make in TABLES.values()), sep="\n\n")
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    cells = wanted(runs, a.data or [*DATA_SETS, HIER], seeds)
    cmds = [command(c, a.splits, a.official, a.runs, a.device) for c in cells]
    if a.what == "plan":
        for cmd in cmds:
            print("OMP_NUM_THREADS=1 PYTHONPATH=. " + shlex.join(cmd))
        return
    was_chosen = chosen_paramfile(runs)
    within = None if a.start_within is None else a.start_within * 60
    failed = run_cells(cells, cmds, a.jobs, within)
    if was_chosen is None and chosen_paramfile(read_runs(a.runs)) is not None:
        print("the ML-1M file is chosen now: run again for its test cells", file=sys.stderr)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
