"""bench/accuracy_matrix.py: which runs the accuracy evidence still lacks, and its table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer.presets import make_params

_PATH = Path(__file__).resolve().parents[1] / "bench" / "accuracy_matrix.py"
_spec = importlib.util.spec_from_file_location("accuracy_matrix", _PATH)
assert _spec is not None and _spec.loader is not None
matrix = importlib.util.module_from_spec(_spec)
sys.modules["accuracy_matrix"] = matrix
_spec.loader.exec_module(matrix)


def run(
    phase: str,
    data: str,
    arm: str,
    seed: int,
    preset: str | None,
    mrr: float,
    recall: float = 0.5,
) -> dict[str, Any]:
    return {
        "phase": phase,
        "data": data,
        "arm": arm,
        "seed": seed,
        "preset": preset,
        "metrics": {"mrr@20": mrr, "recall@20": recall},
    }


def choices(best: str) -> list[dict[str, Any]]:
    return [
        run("choice", "ml1m-sessions-valid", "official", 1, f, 0.3 if f == best else 0.1)
        for f in matrix.PARAMFILES
    ]


def test_every_arm_trains_with_a_preset_the_trainer_knows() -> None:
    for paramfile in matrix.PARAMFILES:
        paper = make_params(f"{paramfile}_paper", [])
        assert paper.session_memory == 0
        assert make_params(paramfile, []).session_memory > 0
        for overrides in matrix.ABLATIONS.values():
            make_params(paramfile, overrides)


def test_the_ml1m_file_is_the_one_the_authors_code_does_best_with_once_all_ran() -> None:
    runs = choices("coveo_bprmax_shared_best")
    assert matrix.chosen_paramfile(runs[:-1]) is None
    assert matrix.chosen_paramfile(runs) == "coveo_bprmax_shared_best"


def test_the_ml1m_test_cells_wait_for_the_choice_and_then_use_the_chosen_file() -> None:
    before = matrix.wanted([], ["ml1m-sessions"])
    assert {c.phase for c in before} == {"choice"}
    assert sorted(c.preset for c in before) == sorted(matrix.PARAMFILES)

    after = matrix.wanted(choices("diginetica_bprmax_shared_best"), ["ml1m-sessions"])
    assert {c.phase for c in after} == {"final"}
    by_arm = {(c.arm, c.seed): c.preset for c in after}
    assert by_arm[("official", 2)] == "diginetica_bprmax_shared_best"
    assert by_arm[("paper", 3)] == "diginetica_bprmax_shared_best_paper"
    assert by_arm[("defaults", 1)] == "diginetica_bprmax_shared_best"
    # three arms and each ablation, at three seeds
    assert len(after) == 3 * (3 + len(matrix.ABLATIONS))
    assert {c.seed for c in after if c.arm in matrix.ABLATIONS} == {1, 2, 3}
    # the goal's cells first, seed by seed; the ablations after them
    is_ablation = [c.arm in matrix.ABLATIONS for c in after]
    assert is_ablation == sorted(is_ablation)
    goal_seeds = [c.seed for c in after if c.arm not in matrix.ABLATIONS]
    assert goal_seeds == sorted(goal_seeds)


def test_the_choice_plans_the_files_not_yet_run_while_some_have_run() -> None:
    # every choice cell is (choice, ml1m-sessions-valid, official, seed 1): only the file tells
    # them apart, so a run of one file must not count for the others
    some = choices("yoochoose_xe_shared_best")[:3]
    cells = matrix.wanted(some, ["ml1m-sessions"])
    assert [c.preset for c in cells] == list(matrix.PARAMFILES[3:])
    assert {c.phase for c in cells} == {"choice"}


def test_hrnn_and_prnn_runs_count_for_their_cells() -> None:
    # their runs record no preset (null), their cells none ("")
    done = [run("final", matrix.HIER, "hrnn-defaults", 1, None, 0.1)]
    cells = matrix.wanted(done, [matrix.HIER], seeds=[1])
    assert ("hrnn-defaults", 1) not in {(c.arm, c.seed) for c in cells}
    assert len(cells) == 3


def test_a_cell_with_a_run_is_not_planned_again() -> None:
    done = [run("final", "rsc15-100k", "official", 1, "rsc15_xe_shared_100_best", 0.3)]
    cells = matrix.wanted(done, ["rsc15-100k"], seeds=[1])
    assert ("official", 1) not in {(c.arm, c.seed) for c in cells}
    assert ("defaults", 1) in {(c.arm, c.seed) for c in cells}


def test_an_ablation_runs_the_defaults_with_its_part_switched_off(tmp_path: Path) -> None:
    cell = matrix.Cell("final", "yoochoose-1_64", "ablation-no-gate", 1, "yoochoose_xe_shared_best")
    cmd = matrix.command(cell, tmp_path, tmp_path / "official", tmp_path / "runs.jsonl", "cpu")
    assert "bench/accuracy_memory.py" in cmd
    assert cmd[cmd.index("--preset") + 1] == "yoochoose_xe_shared_best"
    params = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--param"]
    assert params == ["seed=1", *matrix.ABLATIONS["ablation-no-gate"]]
    assert cmd[cmd.index("--train") + 1] == str(tmp_path / "yoochoose_train.tsv")
    choice = matrix.Cell("choice", "ml1m-sessions-valid", "official", 1, "rees46_xe_shared_best")
    cmd = matrix.command(choice, tmp_path, tmp_path / "official", tmp_path / "r.jsonl", "cuda")
    assert cmd[cmd.index("--test") + 1] == str(tmp_path / "ml1m_train_valid.tsv")
    assert cmd[cmd.index("--device") + 1] == "cuda"


@pytest.mark.parametrize("defaults_seeds", [[1, 2, 3], [1]])
def test_the_table_compares_the_defaults_with_the_official_runs_of_the_same_seeds(
    defaults_seeds: list[int],
) -> None:
    runs = [run("final", "rsc15-100k", "official", s, "f", 0.1 * s, 0.5) for s in (1, 2, 3)]
    runs += [
        run("final", "rsc15-100k", "defaults", s, "f", 0.1 * s * 1.05, 0.5) for s in defaults_seeds
    ]
    runs += [run("choice", "ml1m-sessions-valid", "official", 1, "f", 0.9)]
    rows = matrix.table(runs).splitlines()
    defaults = next(r for r in rows if "| defaults |" in r)
    assert defaults.endswith("| 1.000 / 1.050 |")
    assert "ml1m" not in matrix.table(runs)


def test_the_runs_table_has_one_row_per_test_run_with_its_load_and_head_fit() -> None:
    metrics = {f"{x}@{k}": 0.25 for k in (5, 10, 20) for x in ("recall", "mrr")}
    base = {"data": "rsc15-100k", "seed": 1, "metrics": metrics, "train_seconds": 9.5}
    machine = "Load average (1/5/15 min) at start 5.6/5.5/4.8, at end 4.6/5.2/4.9"
    runs = [
        {**base, "phase": "final", "arm": "defaults", "machine": machine,
         "memory_head": {"seconds": 12.34}, "date": "2026-12-07T09:59:22Z"},
        {**base, "phase": "final", "arm": "official"},
        {**base, "phase": "exploration", "arm": "prototype"},
    ]  # fmt: skip
    rows = matrix.runs_table(runs).splitlines()[2:]
    assert len(rows) == 2
    assert rows[0].startswith("| rsc15-100k | official | 1 | 0.2500 |")
    assert rows[1].endswith("| 9.5 | 12.3 | 5.6 / 4.6 | 2026-12-07 09:59 |")


def test_hrnn_and_prnn_run_at_their_defaults_and_without_the_session_memory(
    tmp_path: Path,
) -> None:
    done = [run("final", matrix.HIER, "hrnn-defaults", 2, "", 0.1)]
    cells = matrix.wanted(done, [matrix.HIER], seeds=[1, 2])
    assert {(c.model, c.arm, c.seed) for c in cells} == {
        (m, f"{m}-{arm}", s)
        for m in ("hrnn", "prnn")
        for arm in ("defaults", "no-session-memory")
        for s in (1, 2)
    } - {("hrnn", "hrnn-defaults", 2)}
    cmds = {
        c.arm: matrix.command(c, tmp_path, tmp_path / "o", tmp_path / "r.jsonl", "cuda")
        for c in cells
        if c.seed == 1
    }
    for arm, cmd in cmds.items():
        params = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--param"]
        off = ["session_memory=0"] if arm.endswith("no-session-memory") else []
        assert params == ["seed=1", "device=cuda", *off]
        assert cmd[cmd.index("--model") + 1] == arm.split("-")[0]
        assert cmd[cmd.index("--test") + 1] == str(tmp_path / "ml1k_users_test.tsv")
        assert ("--item-meta" in cmd) == arm.startswith("prnn")
        assert cmd[cmd.index("--arm") + 1] == arm


def test_the_hrnn_table_compares_the_defaults_without_the_memory_at_the_same_seeds() -> None:
    runs = [run("final", matrix.HIER, "hrnn-no-session-memory", s, "", 0.1 * s) for s in (1, 2)]
    runs += [run("final", matrix.HIER, "hrnn-defaults", 1, "", 0.1 * 1.08)]
    runs += [run("final", matrix.HIER, "prnn-defaults", 1, "", 0.2)]  # no baseline yet
    rows = matrix.hier_table(runs).splitlines()[2:]
    assert rows[0].startswith("| hrnn | hrnn-no-session-memory | 1,2 | 0.5000 | 0.1500 |")
    assert rows[1] == "| hrnn | hrnn-defaults | 1 | 0.5000 | 0.1080 | 1.000 / 1.080 |"
    assert rows[2] == "| prnn | prnn-defaults | 1 | 0.5000 | 0.2000 |  |"
    assert "ml1k" not in matrix.table(runs)


def test_the_results_file_holds_the_tables_its_runs_file_makes() -> None:
    """Every figure of the three tables comes from a recorded run: the file's tables are the
    ones ``table --write`` makes from the runs file (hand edits, or runs added without
    writing the tables again, fail here)."""
    runs = matrix.read_runs(matrix.RUNS)
    found = matrix.tables_in(matrix.RESULTS.read_text())
    assert set(found) == set(matrix.TABLES)
    for name, make in matrix.TABLES.items():
        assert found[name] == make(runs), name


def test_writing_the_tables_replaces_each_block_and_nothing_else() -> None:
    runs = [run("final", "rsc15-100k", "official", 1, "f", 0.3)]
    runs[0]["metrics"] = {f"{x}@{k}": 0.3 for k in (5, 10, 20) for x in ("recall", "mrr")}
    text = "intro\n<!-- final-table -->\nold\n<!-- /final-table -->\nmiddle\n"
    text += "<!-- means-table -->\n<!-- /means-table -->\n<!-- hier-table -->\nx\ny\n"
    text += "<!-- /hier-table -->\n<!-- choice-table -->\n"
    text += "<!-- /choice-table -->\nend\n"
    out = matrix.with_tables(text, runs)
    assert out.startswith("intro\n<!-- final-table -->\n| data | arm |")
    assert "\nmiddle\n" in out and out.endswith("<!-- /choice-table -->\nend\n")
    assert "old" not in out and "\nx\ny\n" not in out
    assert matrix.tables_in(out)["means-table"] == matrix.table(runs)
    with pytest.raises(ValueError, match="hier-table"):
        matrix.with_tables(text.replace("hier-table", "other"), runs)


def test_running_cells_counts_failures_and_starts_none_past_its_window(tmp_path: Path) -> None:
    cells = [matrix.Cell("final", "rsc15-100k", arm, 1, "f") for arm in ("official", "paper")]
    marks = [tmp_path / "ran-0", tmp_path / "ran-1"]
    ok = [sys.executable, "-c", f"open({str(marks[0])!r}, 'w')"]
    fails = [sys.executable, "-c", f"open({str(marks[1])!r}, 'w'); raise SystemExit(3)"]

    assert matrix.run_cells(cells, [ok, fails], jobs=2) == 1
    assert all(m.exists() for m in marks)

    for m in marks:
        m.unlink()
    # a window already over: nothing starts, nothing counts as failed (a later run does them)
    assert matrix.run_cells(cells, [ok, fails], jobs=1, start_within=-1.0) == 0
    assert not any(m.exists() for m in marks)


def test_the_choice_table_shows_each_files_validation_run_and_the_file_chosen() -> None:
    runs = choices("coveo_bprmax_shared_best")
    table = matrix.choice_table(runs)
    assert "| coveo_bprmax_shared_best | 0.5000 | 0.3000 |" in table
    assert "| yoochoose_xe_shared_best | 0.5000 | 0.1000 |" in table
    assert table.endswith("Chosen: `coveo_bprmax_shared_best`.")

    partial = matrix.choice_table(runs[:4])
    assert f"| {matrix.PARAMFILES[5]} | not run | | |" in partial
    assert partial.endswith("Chosen: none yet (waiting for 2 of 6 files).")
    # a test run of the same file is not a choice
    test_run = run("final", "ml1m-sessions", "official", 1, matrix.PARAMFILES[5], 0.9)
    assert f"| {matrix.PARAMFILES[5]} | not run" in matrix.choice_table([*runs[:4], test_run])
