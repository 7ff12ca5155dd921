"""`streamrec backtest`: its pure parts, and the whole live path against `trainer evaluate`.

The end-to-end tests run the CLIs as a user would (``python -m trainer train|evaluate``,
``python -m streamrec backtest``) on a tiny synthetic log: each backtest starts its own
embedded broker (or uses $STREAMREC_TEST_BOOTSTRAP through ``--kafka``) and worker processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from streamrec.data.synthetic import generate_clicks
from streamrec.model.api import TrainableStepModel
from streamrec.model.checkpoint import load_checkpoint
from streamrec.model.gru4rec import GRU4Rec
from streamrec.serving.records import Recommendation
from streamrec.testing import TEST_BOOTSTRAP_ENV
from streamrec.tools.backtest import parse_every, parse_warmup
from streamrec.tools.backtest_metrics import make_periods

KS = (1, 5, 10, 20)
TINY = ["layers=16", "n_epochs=2", "batch_size=16", "n_sample=0", "device=cpu"]


# ----------------------------------------------------------------------------- pure parts


def test_parse_every_and_warmup() -> None:
    assert parse_every("1d") == 86400.0
    assert parse_every("12h") == 43200.0
    assert parse_every("90") == 90.0
    assert parse_every(None) is None
    with pytest.raises(ValueError):
        parse_every("soon")
    assert parse_warmup("0.5", 100.0, 300.0) == 200.0
    assert parse_warmup("50%", 100.0, 300.0) == 200.0
    assert parse_warmup(None, 100.0, 300.0) == 100.0
    assert parse_warmup("0", 100.0, 300.0) == 100.0
    assert parse_warmup("1700000000", 1.6e9, 1.8e9) == 1.7e9
    assert parse_warmup("2023-11-14T22:13:20Z", 1.6e9, 1.8e9) == 1.7e9


@pytest.mark.parametrize("text", ["2", "150%", "-0.1", "1600000000", "2024-01-01", "soon"])
def test_a_warmup_that_is_neither_a_fraction_nor_a_time_of_the_log_is_refused(text: str) -> None:
    """``--warmup-until 2`` on a 2023 log read as 1970-01-01T00:00:02 planned 16,169 periods;
    numbers in 0..1 are fractions, anything else must be a time inside the log."""
    from streamrec.errors import StreamrecError

    with pytest.raises(StreamrecError) as err:
        parse_warmup(text, 1.69e9, 1.7e9)
    assert str(err.value).startswith(f"--warmup-until {text}: neither a fraction")
    assert "2023-07-22 04:26:40 UTC to 2023-11-14 22:13:20 UTC" in str(err.value)


def test_periods_cover_the_scored_span() -> None:
    ps = make_periods(0.0, 25.0, 10.0)
    assert [(p.start, p.end) for p in ps] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert [(p.start, p.end) for p in make_periods(0.0, 25.0, None)] == [(0.0, 25.0)]


def _answer(click_id: str, duplicate: bool = False) -> Recommendation:
    return Recommendation(click_id, "recs", 0, 0, None, "s", "i", ["i"], [1.0], "v", "champion",
                          0.0, None, None, 0.0, duplicate, False)  # fmt: skip


def test_lost_and_duplicate_clicks_are_counted_per_click() -> None:
    """``lost``: produced clicks with no answer; ``duplicates``: clicks answered more than
    once or flagged as redeliveries, each click counted once; answers to clicks that were not
    produced (another run's) count for nothing; the first answer is the one scored."""
    from streamrec.tools.backtest_metrics import collect_answers

    sent = ["c0", "c1", "c2", "c3", "c4", "c5"]
    answers = [
        _answer("c0"),
        _answer("c1"),
        _answer("c1"),  # answered twice
        _answer("c2", duplicate=True),  # answered once, as a redelivery
        _answer("c3"),
        _answer("c3", duplicate=True),  # twice, the second flagged: one duplicate click
        _answer("c3", duplicate=True),
        _answer("other"),  # not a click of this run
        _answer("other"),
    ]
    ans = collect_answers(answers, sent)
    assert ans.lost == 2  # c4, c5
    assert ans.duplicates == 3  # c1, c2, c3
    assert set(ans.first) == {"c0", "c1", "c2", "c3"}
    assert ans.first["c3"] is answers[4]  # the first answer, not a later one
    clean = collect_answers([_answer(c) for c in sent], sent)
    assert (clean.lost, clean.duplicates) == (0, 0)
    assert collect_answers([], sent).lost == len(sent)


@pytest.mark.parametrize(
    ("answered", "status"),
    [
        (["c0", "c1", "c2"], 0),
        (["c0", "c1"], 1),  # one click lost
        (["c0", "c1", "c2", "c2"], 1),  # one click answered twice
        (["c0", "c1", "c2", "c1*"], 1),  # one flagged redelivery
    ],
)
def test_the_backtest_command_exits_1_when_a_click_is_lost_or_duplicated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answered: list[str], status: int
) -> None:
    """The command's exit status comes from the report's counts: 1 if any arm lost or
    duplicated a click (the run itself, broker and workers, is replaced by its report)."""
    from click.testing import CliRunner

    from streamrec.cli.main import main
    from streamrec.tools import backtest
    from streamrec.tools.backtest_metrics import collect_answers

    def run(opts: backtest.BacktestOptions) -> dict[str, Any]:
        good = collect_answers([_answer(c) for c in ("c0", "c1", "c2")], ["c0", "c1", "c2"])
        ours = collect_answers(
            [_answer(c.rstrip("*"), c.endswith("*")) for c in answered], ["c0", "c1", "c2"]
        )
        arms = {"frozen": good, "retrained": ours}
        return {
            "overall": {a: {"n_scored": 3, "swaps": 0} for a in arms},
            "lost": sum(x.lost for x in arms.values()),
            "duplicates": sum(x.duplicates for x in arms.values()),
        }

    monkeypatch.setattr(backtest, "run_backtest", run)
    log = tmp_path / "log.tsv"
    log.write_text("SessionId\tItemId\tTime\ns\ti\t1\n")
    out = CliRunner().invoke(main, ["backtest", str(log), "--out", str(tmp_path / "bt")])
    assert out.exit_code == status, out.output
    assert ("lost 1," in out.output) == (answered == ["c0", "c1"])


def test_a_log_without_sessions_is_sessionized_as_the_trainer_does(tmp_path: Path) -> None:
    """``--session-gap``: the trainer's sessionisation (``<user>:<n>`` ids), and the replay
    order is time, then file order (users tied in time keep their order in the file)."""
    from streamrec.data.clicklog import sessionize
    from streamrec.tools.backtest import BacktestOptions, load_log

    log = tmp_path / "log.tsv"
    log.write_text("UserId\tItemId\tTime\nv\ta\t10\nu\tb\t10\nu\tc\t20\nv\td\t5000\n")
    df = load_log(BacktestOptions(log=log, out=tmp_path / "out", session_gap=1800.0))
    assert df["SessionId"].tolist() == ["v:0", "u:0", "u:0", "v:1"]
    assert df["ItemId"].tolist() == ["a", "b", "c", "d"]
    raw = pd.read_csv(log, sep="\t", dtype=str).astype({"Time": float})
    assert df["SessionId"].tolist() == sessionize(raw, 1800.0)["SessionId"].tolist()


def test_the_published_checkpoint_is_the_registrys_own_answer(tmp_path: Path) -> None:
    from streamrec.loop import registry
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
    from streamrec.tools.backtest import registry_current

    models = tmp_path / "models"
    assert registry_current(models) is None  # no registry yet
    model = GRU4Rec(GRU4RecConfig(n_items=3, layers=[4]), seed=0)
    ck = save_checkpoint(registry.staging_dir(models, "a"), model, "gru4rec", ["a", "b", "c"])
    version = registry.add_version(models, ck)
    assert registry_current(models) is None  # nothing published
    registry.publish(models, version)
    assert registry_current(models) == registry.resolve(models) == models / "versions" / version
    (models / "CURRENT").write_text("gone\n")
    assert registry_current(models) is None  # a pointer to a version that is not held


# ----------------------------------------------------------------------------- end to end


def _py() -> list[str]:
    return [sys.executable, "-m"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.environ.get(TEST_BOOTSTRAP_ENV):
        env["STREAMREC_KAFKA__BOOTSTRAP_SERVERS"] = os.environ[TEST_BOOTSTRAP_ENV]
    return env


def _broker_args() -> list[str]:
    return ["--kafka"] if os.environ.get(TEST_BOOTSTRAP_ENV) else []


def _run(args: list[str], timeout: float = 240) -> str:
    done = subprocess.run(_py() + args, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~900 clicks of 20 users over four weeks, 60 items."""
    df = generate_clicks(150, 60, 20, seed=3, span_days=28)
    path = tmp_path_factory.mktemp("backtest") / "log.tsv"
    df.to_csv(path, sep="\t", index=False)
    return path


def _train(log: Path, out: Path, model: str, seed: int = 42) -> Path:
    args = ["trainer", "train", "--train", str(log), "--out", str(out), "--model", model]
    params = TINY if model == "gru4rec" else ["layers=16", "n_epochs=2", "batch_size=8"]
    for kv in [*params, f"seed={seed}"] if model == "gru4rec" else params:
        args += ["--param", kv]
    _run([*args, "--no-progress"])
    return out


def _evaluate(model: Path, log: Path) -> dict[str, Any]:
    out = json.loads(_run(["trainer", "evaluate", "--model", str(model), "--test", str(log),
                           "--json"]))  # fmt: skip
    return dict(out)


def _backtest(log: Path, out: Path, *args: str) -> dict[str, Any]:
    _run(["streamrec", "backtest", str(log), "--out", str(out), "--no-progress",
          *_broker_args(), *args])  # fmt: skip
    return dict(json.loads((out / "report.json").read_text()))


def _assert_equal_to_offline(live: dict[str, Any], offline: dict[str, Any]) -> None:
    """Same predictions scored, the same hits at every cut-off (so the same ranks up to 20);
    MRR sums the same reciprocal ranks in another order (float64, 1e-12)."""
    assert live["n_scored"] == offline["n_events"]
    for k in KS:
        assert live[f"recall@{k}"] == offline[f"recall@{k}"], k
        assert live[f"mrr@{k}"] == pytest.approx(offline[f"mrr@{k}"], abs=1e-12), k


def _assert_complete(report: dict[str, Any], out: Path) -> None:
    assert report["lost"] == 0 and report["duplicates"] == 0
    page = (out / "report.html").read_text()
    pngs = [p for p in ("recall.png", "mrr.png", "coverage_new_items.png", "latency_cdf.png",
                        "throughput.png")]  # fmt: skip
    for name in pngs:
        assert f'src="{name}"' in page
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("model", ["gru4rec", "hrnn"])
def test_replay_without_retraining_or_warmup_equals_trainer_evaluate(
    log: Path, tmp_path: Path, model: str
) -> None:
    ckpt = _train(log, tmp_path / "m", model)
    # the defaults of both: the session memory in the state, its head fitted (not silent)
    trained = load_checkpoint(ckpt).model
    assert isinstance(trained, (GRU4Rec, TrainableStepModel))
    memory = trained.session_memory()
    assert memory is not None and memory.size > 0
    assert float(memory.bias.detach().abs().sum()) > 0
    offline = _evaluate(ckpt, log)
    report = _backtest(log, tmp_path / "bt", "--init", str(ckpt), "--no-retrain",
                       "--warmup-until", "0", "--every", "7d", "--model", model)  # fmt: skip
    assert list(report["overall"]) == ["frozen"]
    _assert_equal_to_offline(report["overall"]["frozen"], offline)
    # the workers' own live metrics (the same code, every answered click: no warm-up here)
    version = json.loads((ckpt / "checkpoint.json").read_text())["version"]
    assert list(report["overall"]["frozen"]["live"]) == [version]
    _assert_equal_to_offline(report["overall"]["frozen"]["live"][version], offline)
    # the periods split the same clicks
    assert sum(p["events"] for p in report["periods"]) == report["events"]
    assert sum(p["frozen"]["n_scored"] for p in report["periods"]) == offline["n_events"]
    assert len(report["periods"]) >= 4
    _assert_complete(report, tmp_path / "bt")


@pytest.mark.broker
@pytest.mark.slow
def test_compare_scores_two_checkpoints_on_the_same_replay(log: Path, tmp_path: Path) -> None:
    """Shadow scoring: each arm's figures are its own checkpoint's offline figures."""
    a = _train(log, tmp_path / "a", "gru4rec", seed=1)
    b = _train(log, tmp_path / "b", "gru4rec", seed=2)
    report = _backtest(log, tmp_path / "bt", "--compare", str(a), str(b), "--every", "14d")
    assert set(report["overall"]) == {"A", "B"}
    for arm, ckpt in (("A", a), ("B", b)):
        offline = _evaluate(ckpt, log)
        _assert_equal_to_offline(report["overall"][arm], offline)
        (live,) = report["overall"][arm]["live"].values()
        _assert_equal_to_offline(live, offline)
    assert report["overall"]["A"]["mrr@20"] != report["overall"]["B"]["mrr@20"]
    assert report["lost"] == 0 and report["duplicates"] == 0


@pytest.mark.broker
@pytest.mark.slow
def test_warmup_trains_the_initial_model_and_is_not_scored(log: Path, tmp_path: Path) -> None:
    import pandas as pd

    params = [x for kv in TINY for x in ("--param", kv)]
    report = _backtest(log, tmp_path / "bt", "--no-retrain", "--warmup-until", "0.5",
                       "--every", "7d", *params)  # fmt: skip
    df = pd.read_csv(log, sep="\t", dtype={"SessionId": str, "ItemId": str})
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    t_warm = df["Time"].min() + 0.5 * (df["Time"].max() - df["Time"].min())
    assert report["warmup_until"] == pytest.approx(t_warm)
    after = df["Time"] >= t_warm
    has_next = df.groupby("SessionId").cumcount(ascending=False) > 0
    fig = report["overall"]["frozen"]
    assert report["warmup_events"] == int((~after).sum())
    assert fig["n_scored"] == int((after & has_next).sum())
    assert fig["answers"] == int(after.sum())  # warm-up clicks are answered but not scored
    assert (tmp_path / "bt" / "work" / "models" / "initial" / "checkpoint.json").exists()
    _assert_complete(report, tmp_path / "bt")


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_leaves_nothing_running(log: Path, tmp_path: Path, signum: int) -> None:
    ckpt = _train(log, tmp_path / "m", "gru4rec")
    cmd = [*_py(), "streamrec", "backtest", str(log), "--out", str(tmp_path / "bt"),
           "--init", str(ckpt), "--no-retrain", "--no-progress", *_broker_args()]  # fmt: skip
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=_env(), stderr=err)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    workers: list[psutil.Process] = []
    while not workers and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        with contextlib.suppress(psutil.Error):
            workers = [c for c in parent.children(recursive=True) if "worker" in c.cmdline()]
    assert workers, (tmp_path / "stderr.txt").read_text()[-2000:]
    children = parent.children(recursive=True)  # the broker and the worker(s)
    time.sleep(1.0)
    proc.send_signal(signum)
    proc.wait(timeout=90)
    assert proc.returncode == 130, (tmp_path / "stderr.txt").read_text()[-2000:]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def _stand_in_retrain(bt: Any, label: str) -> None:
    """A stand-in for issue #11's ``archive`` + ``trainer retrain --once`` (not in this
    branch): ``trainer train`` on the clicks published so far, written as a new checkpoint
    directory into the registry folder, whose newest checkpoint the workers swap in. It tests
    the backtest's side of the cycle (barrier, swap wait, swaps, per-arm figures), not #11."""
    path = bt.work / f"published-{label}.tsv"
    bt.df.iloc[: bt.n_published].to_csv(path, sep="\t", index=False)
    out = bt.registry / f"v-{label}"
    args = ["trainer", "train", "--train", str(path), "--out", str(out), "--no-progress"]
    for kv in TINY:
        args += ["--param", kv]
    _run(args)


@pytest.mark.broker
@pytest.mark.slow
def test_retrained_arm_swaps_after_every_period_beside_the_frozen_arm(
    log: Path, tmp_path: Path
) -> None:
    from streamrec.tools.backtest import BacktestOptions, parse_every, run_backtest

    bootstrap = os.environ.get(TEST_BOOTSTRAP_ENV) or None
    opts = BacktestOptions(
        log=log,
        out=tmp_path / "bt",
        every=parse_every("7d"),
        warmup_until="0.3",
        params=TINY,
        bootstrap=bootstrap,
        progress=False,
        retrain_cycle=_stand_in_retrain,
    )
    report = run_backtest(opts)
    assert list(report["overall"]) == ["retrained", "frozen"]
    n_periods = len(report["periods"])
    assert n_periods >= 3
    swaps = [s for s in report["swaps"] if s["arm"] == "retrained"]
    # one swap after every period but the last, each at or after that period's end
    assert len(swaps) == n_periods - 1
    for p, sw in enumerate(swaps):
        assert sw["event_time"] >= report["periods"][p]["end"]
        assert sw["event_time"] < report["periods"][p + 1]["end"] or p + 2 == n_periods
    assert report["overall"]["frozen"]["swaps"] == 0
    assert report["overall"]["retrained"]["swaps"] == n_periods - 1
    assert [r["label"] for r in report["retrains"]] == ["warmup"] + [
        f"p{p}" for p in range(n_periods - 1)
    ]
    # both arms answered the same clicks; until the first retrain they serve models trained
    # the same way on the same warm-up clicks
    first = report["periods"][0]
    assert first["retrained"]["n_scored"] == first["frozen"]["n_scored"] > 0
    assert first["retrained"]["recall@20"] == first["frozen"]["recall@20"]
    _assert_complete(report, tmp_path / "bt")


@pytest.mark.broker
@pytest.mark.slow
def test_retrained_arm_with_archive_and_trainer_retrain(log: Path, tmp_path: Path) -> None:
    """The retrained arm through issue #11's commands: `streamrec archive --until-caught-up`
    and `trainer retrain --once` after every period, the workers following the registry.

    One partition: `archive --until-caught-up` waits for every partition to reach its end
    offset by a consumed message, which a partition with no new click in a period never does
    (issue #11's archiver; seen here as a 335 s wait with two partitions)."""
    params = [x for kv in TINY for x in ("--param", kv)]
    # the point gate without a holdout floor: a week of this tiny log is too small for the
    # default gate to decide (it would keep every model); this test is about the swaps
    params += ["--retrain-option=--gate-z=0", "--retrain-option=--min-holdout-events=0"]
    out = tmp_path / "bt"
    report = _backtest(log, out, "--every", "7d", "--warmup-until", "0.3",
                       "--partitions", "1", *params)  # fmt: skip
    assert list(report["overall"]) == ["retrained", "frozen"]
    assert report["retrainer"].startswith("streamrec archive")
    cycles = report["retrains"]
    n_periods = len(report["periods"])
    assert [c["label"] for c in cycles] == ["warmup"] + [f"p{p}" for p in range(n_periods - 1)]
    published = [c for c in cycles[1:] if c["published"]]
    swaps = [s for s in report["swaps"] if s["arm"] == "retrained"]
    # every published model is swapped in before the next period; a gated one is not
    assert len(swaps) == len(published) >= 1
    assert [s["to"] for s in swaps] == [c["version"] for c in published]
    assert report["overall"]["frozen"]["swaps"] == 0
    # the frozen arm serves a copy of cycle 0's model: the first period is the same for both
    first = report["periods"][0]
    for k in KS:
        assert first["retrained"][f"recall@{k}"] == first["frozen"][f"recall@{k}"]
    registry = out / "work" / "models" / "registry"
    assert (registry / "CURRENT").read_text().strip() == swaps[-1]["to"]
    _assert_complete(report, out)


@pytest.mark.broker
@pytest.mark.slow
def test_a_1997_log_is_backtested_end_to_end_with_nothing_lost(tmp_path: Path) -> None:
    """A log as old as MovieLens-100k (1997-98) replays through the whole live path: every
    click is answered by both arms (none dead-lettered for its age), the archive holds every
    click published before the last retrain cycle, and the cycles train on them."""
    import pyarrow.parquet as pq

    from streamrec.loop import registry
    from streamrec.loop.archive import Storage, list_archive

    df = generate_clicks(150, 60, 20, seed=3, start_time=874_724_710.0, span_days=28)
    assert df["Time"].max() < 946_684_800  # all of it before 2000
    log = tmp_path / "ml100k-like.tsv"
    df.to_csv(log, sep="\t", index=False)
    out = tmp_path / "bt"
    params = [x for kv in TINY for x in ("--param", kv)]
    params += ["--retrain-option=--min-holdout-events=0"]
    report = _backtest(log, out, "--every", "30d", "--warmup-until", "0.5",
                       "--partitions", "1", *params)  # fmt: skip
    assert report["lost"] == 0 and report["duplicates"] == 0
    scored = report["events"] - report["warmup_events"]
    assert scored > 0 and report["warmup_events"] > 0
    for arm in ("retrained", "frozen"):
        assert report["overall"][arm]["answers"] == scored, arm
    # the archive holds every click published before the last cycle, and it trained on them
    cycles = registry.read_log(out / "work" / "models" / "registry")
    assert len(cycles) == len(report["retrains"]) >= 2
    storage = Storage(str(out / "work" / "archive"))
    archived = sum(pq.read_metadata(storage.join(f.path)).num_rows for f in list_archive(storage))
    last = report["periods"][len(cycles) - 2]
    assert archived == int((df["Time"] < last["end"]).sum())
    assert all(c["events"]["train"] > 0 for c in cycles)


@pytest.mark.broker
@pytest.mark.slow
def test_a_dead_lettered_click_is_reported_lost_with_its_reason_not_waited_for(
    log: Path, tmp_path: Path
) -> None:
    """A log line the worker refuses (dated after its own arrival) is never answered: the
    run does not wait ``--timeout`` for it (the whole run has half that here), it counts as
    lost with its reason, and the exit status says something was lost."""
    df = pd.read_csv(log, sep="\t", dtype=str)
    odd = df.iloc[[5]].assign(SessionId="odd", Time=str(time.time() + 2 * 365 * 86400))
    bad_log = tmp_path / "log.tsv"
    pd.concat([df, odd]).to_csv(bad_log, sep="\t", index=False)
    ckpt = _train(log, tmp_path / "m", "gru4rec")
    out = tmp_path / "bt"
    done = subprocess.run(
        [*_py(), "streamrec", "backtest", str(bad_log), "--out", str(out), "--no-progress",
         *_broker_args(), "--init", str(ckpt), "--no-retrain", "--warmup-until", "0"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-4000:]
    assert "lost 1 (dead-lettered: 1 timestamp_out_of_range)" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["lost"] == 1 and report["dead_letters"] == {"timestamp_out_of_range": 1}
    assert report["overall"]["frozen"]["n_scored"] == _evaluate(ckpt, log)["n_events"]
