"""`streamrec backtest`: replay a historical log through the live path, arm against arm.

The whole live stack runs: a broker (the embedded Tansu, or the configured Kafka), one worker
group per arm (``streamrec worker`` child processes), and for the retrained arm the archiver
and one retrain cycle per period (``streamrec archive`` / ``trainer retrain --once``,
as child processes: the serving package never imports ``trainer``).

The log is replayed in event-time order, compressed in time: each period's clicks are
published as fast as the workers take them, the run waits until every arm answered every
click, then (retrained arm) archives, retrains once and waits for the workers to swap to the
published model before the next period starts. All arms' workers read the same clicks topic
(one consumer group each) and publish to their own recommendations topic, so they score
exactly the same clicks.

Warm-up: clicks before ``--warmup-until`` give the initial model (with the retrained arm:
retrain cycle 0 on them, and the frozen arm serves a copy of it; else ``trainer train`` in a
child process, or ``--init``) and are replayed first, which builds session and user states;
they are not scored. Figures: :mod:`streamrec.tools.backtest_metrics`; the report:
:mod:`streamrec.tools.report`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, KeysView, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamrec.errors import StreamrecError
from streamrec.processes import run_child
from streamrec.serving.records import Recommendation
from streamrec.tools.backtest_metrics import (
    KS,
    LogView,
    Period,
    collect_answers,
    make_periods,
    model_swaps,
    new_item_click_share,
    plot_series,
    score_arm,
)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


class BacktestError(StreamrecError, RuntimeError):
    pass


def parse_every(text: str | None) -> float | None:
    """``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds -> seconds (None stays None)."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw]?)\s*", text)
    if m is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 1d, 7d, 12h, 3600s)")
    value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if value <= 0:
        raise ValueError(f"the period must be positive, got {text!r}")
    return value


def _when(t: float) -> str:
    """An event time for a message: UTC date and time, or the number of an ordinal log."""
    from streamrec.data.clicklog import EPOCH_TIMES_FROM

    if t >= EPOCH_TIMES_FROM:
        return pd.Timestamp(t, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{t:,.0f}"


def parse_warmup(text: str | None, t_first: float, t_last: float) -> float:
    """The warm-up end time: a fraction of the log's time span (``0.5``, ``50%``), or a time
    inside the log (epoch seconds or ISO 8601). None or 0: no warm-up (the first event's
    time). Anything else is refused: ``2`` is no time of a 2015 log, and read as one it
    planned 16,169 periods from 1970."""
    if text is None or str(text).strip() == "":
        return t_first
    text = str(text).strip()
    try:
        x = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        is_number = True
    except ValueError:
        is_number = False
    if is_number:
        if 0.0 <= x <= 1.0:
            return t_first + x * (t_last - t_first)
        if t_first <= x <= t_last and not text.endswith("%"):
            return x
    else:
        try:
            ts = pd.Timestamp(text)
        except ValueError:
            ts = None
        if ts is not None:
            if ts.tzinfo is None:
                ts = ts.tz_localize("UTC")
            if t_first <= ts.timestamp() <= t_last:
                return float(ts.timestamp())
    raise BacktestError(
        f"--warmup-until {text}: neither a fraction of the log's time span (0 to 1, or 0% to "
        f"100%) nor a time inside the log ({_when(t_first)} to {_when(t_last)}, epoch "
        f"seconds {t_first:.0f} to {t_last:.0f})"
    )


@dataclass
class BacktestOptions:
    log: Path
    out: Path
    every: float | None = None
    warmup_until: str | None = None
    model: str = "gru4rec"
    params: Sequence[str] = ()
    init: Path | None = None
    compare: tuple[Path, Path] | None = None
    frozen: bool = True
    retrain: bool = True
    bootstrap: str | None = None  # None: an embedded broker
    kafka_conf: dict[str, Any] | None = None  # the configured Kafka's client config
    partitions: int = 2
    session_gap: float | None = None  # sessionise a log without sessions (trainer's option)
    state_gap: float | None = None  # the workers' session inactivity gap (event time)
    fmt: str | None = None
    ks: tuple[int, ...] = KS
    timeout: float = 600.0
    progress: bool = True
    engine: str | None = None
    command: str = ""
    train_args: Sequence[str] = ()  # extra `trainer train` options
    retrain_args: Sequence[str] = ()  # extra `trainer retrain` options, e.g. --window=60d
    on_event: Callable[[str], None] | None = None
    #: one retrain cycle (label) in place of archive + retrain: must publish a new
    #: checkpoint that a worker watching ``Backtest.registry`` swaps in (tests use a stand-in)
    retrain_cycle: Callable[[Backtest, str], None] | None = None
    retrainer: str = "streamrec archive --until-caught-up; trainer retrain --once"


@dataclass
class Arm:
    name: str
    model: Path
    retrain: bool = False
    worker: Any = None
    metrics_port: int = 0
    recs_topic: str = ""
    dead_topic: str = ""
    versions: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the log


def load_log(opts: BacktestOptions) -> pd.DataFrame:
    """The log in replay order (time, then file order), with an event id per row."""
    from streamrec.data.clicklog import load_clicks, sessionize

    df = load_clicks(opts.log, fmt=opts.fmt)
    if "SessionId" not in df.columns or opts.session_gap is not None:
        if opts.session_gap is None:
            raise BacktestError("the log has no SessionId: pass --session-gap SECONDS")
        df = sessionize(df, opts.session_gap)
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    return df


def write_log(df: pd.DataFrame, path: Path) -> Path:
    cols = [c for c in ("SessionId", "ItemId", "Time", "UserId") if c in df.columns]
    df[cols].to_csv(path, sep="\t", index=False, float_format="%.6f")
    return path


def click_messages(
    df: pd.DataFrame, event_ids: Sequence[str]
) -> tuple[list[tuple[bytes, bytes, float]], list[str]]:
    """(key, JSON, time) per row, with ``event_id``, and the click id each row's answer
    carries (its key and event id: ``serving.records.event_click_id``)."""
    from streamrec.tools.replay import click_values

    out, click_ids = [], []
    for (key, value, t), eid in zip(click_values(df), event_ids, strict=True):
        body = json.loads(value)
        body["event_id"] = eid
        out.append((key, json.dumps(body).encode(), t))
        click_ids.append(body_click_id(body))
    return out, click_ids


def body_click_id(body: dict[str, Any]) -> str:
    """The click id the workers give a click body of the replay (its state key and event id:
    ``serving.records.event_click_id``); KeyError without a session or event id."""
    from streamrec.serving.records import event_click_id
    from streamrec.serving.state import state_key

    return event_click_id(state_key(body.get("user_id"), body["session_id"]), body["event_id"])


def registry_current(models: Path) -> Path | None:
    """The published checkpoint of a model registry (``streamrec.loop.registry.resolve``), or
    None (no registry, nothing published, or a pointer to a version that is gone)."""
    from streamrec.loop import registry

    try:
        return registry.resolve(models)
    except registry.RegistryError:
        return None


# ----------------------------------------------------------------------------- child processes


def train_initial(opts: BacktestOptions, warm: pd.DataFrame, work: Path) -> Path:
    """``trainer train`` on the warm-up clicks -> ``work/models/initial``."""
    if len(warm) == 0:
        raise BacktestError(
            "no warm-up clicks to train the initial model on: pass --warmup-until or --init"
        )
    path = write_log(warm, work / "warmup.tsv")
    out = work / "models" / "initial"
    cmd = [sys.executable, "-m", "trainer", "train", "--train", str(path), "--out", str(out)]
    cmd += ["--model", opts.model, "--no-progress", *opts.train_args]
    for kv in opts.params:
        cmd += ["--param", kv]
    what = "trainer train (initial model)"
    run_child(cmd, what=what, log=work / "trainer.log", timeout=opts.timeout * 4)
    return out


# ----------------------------------------------------------------------------- the run


class _AnswerReader:
    """The click ids settled on a topic, read as they arrive, each with how it was settled:
    answered (a recommendations topic, :func:`_click_id`) or dead-lettered with a reason (a
    dead-letter topic, :func:`_dead_click_id`: never answered, so not waited for)."""

    def __init__(
        self, conf: dict[str, Any], topic: str, parse: Callable[[bytes], tuple[str, str] | None]
    ) -> None:
        self.conf = conf
        self.topic = topic
        self.parse = parse
        self.settled: dict[str, str] = {}  # click id -> "answered" or the dead letter's reason
        self._consumer: Any = None
        self._open()

    def _open(self) -> None:
        from confluent_kafka import TopicPartition

        from streamrec.kafka import clients

        self._consumer = clients.consumer(
            self.conf,
            f"streamrec-backtest-{uuid.uuid4().hex}",
            fixed={"enable.auto.commit": False},
            site={"fetch.wait.max.ms": 10, "log_level": 0},
        )
        n = clients.partition_count(self.conf, self.topic)
        self._consumer.assign([TopicPartition(self.topic, p, 0) for p in range(n)])

    @property
    def seen(self) -> KeysView[str]:
        return self.settled.keys()

    def poll(self, seconds: float) -> bool:
        """Read for up to ``seconds``; True when something new arrived."""
        before = len(self.settled)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            batch = self._consumer.consume(num_messages=10_000, timeout=0.1)
            for msg in batch:
                if msg.error() is None:
                    self._add(msg.value())
            if not batch and len(self.settled) > before:
                break
        return len(self.settled) > before

    def reread(self) -> None:
        """A fresh read from offset 0 (what the broker holds), then tail from there again."""
        from streamrec.kafka.clients import read_topic

        for msg in read_topic(self.conf, self.topic, idle_timeout=1.0):
            self._add(msg.value())
        self.close()
        self._open()

    def _add(self, value: bytes) -> None:
        parsed = self.parse(value)
        if parsed is not None:
            click_id, how = parsed
            self.settled[click_id] = how

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def _click_id(value: bytes) -> tuple[str, str]:
    return Recommendation.from_json(value).click_id, "answered"


def _dead_click_id(value: bytes) -> tuple[str, str] | None:
    """The click id of a dead-lettered click of the replay and the dead letter's reason
    (None: not one of its clicks)."""
    from streamrec.serving.events import DeadLetter

    try:
        dead = DeadLetter.model_validate_json(value)
        return body_click_id(json.loads(dead.original)), dead.reason
    except (ValueError, KeyError, TypeError):
        return None


class Backtest:
    def __init__(self, opts: BacktestOptions) -> None:
        self.opts = opts
        self.out = opts.out
        self.work = opts.out / "work"
        self.run_id = uuid.uuid4().hex[:8]
        self.conf: dict[str, Any] = {}
        self.clicks_topic = f"bt-{self.run_id}-clicks"
        self.sent_at: dict[str, float] = {}
        self.click_ids: list[str] = []
        self.arms: list[Arm] = []
        self.retrains: list[dict[str, Any]] = []
        self._stack = contextlib.ExitStack()
        self._progress: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self.n_published = 0
        self._readers: dict[str, tuple[_AnswerReader, _AnswerReader]] = {}
        self.df = pd.DataFrame()
        self.series: dict[str, Any] = {}

    # -- plumbing
    def say(self, text: str) -> None:
        if self.opts.on_event is not None:
            self.opts.on_event(text)
        if self._progress is not None:
            self._progress.console.log(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def _start_broker(self) -> None:
        from streamrec.kafka.embedded import EmbeddedBroker

        if self.opts.kafka_conf is not None:
            self.conf = dict(self.opts.kafka_conf)
        elif self.opts.bootstrap:
            self.conf = {"bootstrap.servers": self.opts.bootstrap}
        else:
            broker = EmbeddedBroker(port=0, log_path=self.work / "broker.log").start()
            self._stack.callback(broker.stop)
            self.conf = {"bootstrap.servers": broker.bootstrap}

    def _start_worker(self, arm: Arm) -> None:
        from streamrec.kafka.clients import TopicSpec, ensure_topics
        from streamrec.kafka.embedded import free_port
        from streamrec.tools.launch import WorkerProcess

        arm.recs_topic = f"bt-{self.run_id}-{arm.name}-recs"
        arm.dead_topic = dead = f"bt-{self.run_id}-{arm.name}-dead"
        ensure_topics(
            self.conf, [TopicSpec(t, self.opts.partitions) for t in (arm.recs_topic, dead)]
        )
        arm.metrics_port = free_port()
        settings: dict[str, object] = {
            "kafka.bootstrap_servers": self.conf["bootstrap.servers"],
            "topics.clicks": self.clicks_topic,
            "topics.recommendations": arm.recs_topic,
            "topics.dead_letter": dead,
            "topics.partitions": self.opts.partitions,
            "worker.app_id": f"bt-{self.run_id}-{arm.name}",
            "worker.metrics_port": arm.metrics_port,
            "model.top_k": max(self.opts.ks) + 1,
            "model.reload_interval_s": 0.5 if arm.retrain else 0,
        }
        if self.opts.state_gap is not None:
            settings["state.session_gap_seconds"] = self.opts.state_gap
        args = ["--engine", self.opts.engine] if self.opts.engine else []
        arm.worker = WorkerProcess(
            arm.model,
            settings=settings,
            data_dir=self.work / f"state-{arm.name}",
            log_path=self.work / f"worker-{arm.name}.log",
            args=args,
        )
        self._stack.callback(arm.worker.stop)

    def served_version(self, arm: Arm) -> str | None:
        """The model version a worker serves, from its Prometheus metrics."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{arm.metrics_port}/metrics", timeout=2
            ) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(r'streamrec_model_info\{[^}]*version="([^"]*)"', text)
        return m.group(1) if m else None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.opts.timeout
        for arm in self.arms:
            while self.served_version(arm) is None:
                if not arm.worker.alive():
                    raise BacktestError(f"worker {arm.name} exited:\n{arm.worker.log_tail()}")
                if time.monotonic() > deadline:
                    raise BacktestError(
                        f"worker {arm.name} did not start:\n{arm.worker.log_tail()}"
                    )
                time.sleep(0.2)

    def publish(self, values: Sequence[tuple[bytes, bytes, float]]) -> None:
        from streamrec.tools.replay import produce

        if not values:
            return
        out = produce(self.conf, self.clicks_topic, values)
        if out.failed:
            raise BacktestError(f"{out.failed} clicks could not be published")
        self.sent_at.update(out.sent_at)
        self.n_published += len(values)

    def wait_answered(self, upto: int, t_upto: float) -> None:
        """Until every arm answered or dead-lettered the first ``upto`` clicks.

        Each arm's recommendations and dead letters are read incrementally (consumers
        assigned to every partition, no group); a tailing read can skip records on the
        embedded broker, so when it stalls short of the target a fresh read from offset 0
        decides (and restarts it). A dead-lettered click is never answered: it counts as
        lost in the report, with its reason, instead of stalling the run.
        """
        want = set(self.click_ids[:upto])
        deadline = time.monotonic() + self.opts.timeout
        for arm in self.arms:
            readers = self._readers.get(arm.name)
            if readers is None:
                readers = self._readers[arm.name] = (
                    _AnswerReader(self.conf, arm.recs_topic, _click_id),
                    _AnswerReader(self.conf, arm.dead_topic, _dead_click_id),
                )
                for reader in readers:
                    self._stack.callback(reader.close)
            answers, dead = readers
            last_new = time.monotonic()
            while True:
                if answers.poll(0.5) | dead.poll(0.05):
                    last_new = time.monotonic()
                missing = len(want - answers.seen - dead.seen)
                if self._progress is not None and self._task is not None:
                    self._progress.update(
                        self._task, description=f"{arm.name}: {missing:,} clicks to go"
                    )
                if missing == 0:
                    break
                if time.monotonic() - last_new > 3.0:
                    answers.reread()
                    dead.reread()
                    last_new = time.monotonic()
                    if not want - answers.seen - dead.seen:
                        break
                if not arm.worker.alive():
                    raise BacktestError(f"worker {arm.name} exited:\n{arm.worker.log_tail()}")
                if time.monotonic() > deadline:
                    raise BacktestError(
                        f"arm {arm.name}: {missing} of {len(want)} clicks unanswered after "
                        f"{self.opts.timeout:.0f} s; worker log:\n{arm.worker.log_tail()}"
                    )
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=t_upto - self._t0)

    # -- retraining (`streamrec archive` and `trainer retrain`, as child processes)
    @property
    def registry(self) -> Path:
        return self.work / "models" / "registry"

    def archive_and_retrain(self, label: str) -> dict[str, Any]:
        """One retrain cycle on the clicks published so far (``self.n_published``): its
        label, seconds, and what the cycle's log line says (decision, figures, phases)."""
        t0 = time.perf_counter()
        info: dict[str, Any] = {"label": label}
        if self.opts.retrain_cycle is not None:
            self.opts.retrain_cycle(self, label)
        else:
            info.update(self._archive_then_retrain(label))
        info["seconds"] = time.perf_counter() - t0
        return info

    def _archive_then_retrain(self, label: str) -> dict[str, Any]:
        """``streamrec archive --until-caught-up`` then ``trainer retrain --once``, which
        publishes into the registry that the retrained arm's workers follow."""
        from streamrec.loop import registry as models

        archive = self.work / "archive"
        env_cmd = [sys.executable, "-m", "streamrec", "archive", "--dir", str(archive)]
        env_cmd += ["--until-caught-up"]
        t0 = time.perf_counter()
        self._child_with_settings(env_cmd, "streamrec archive", f"archive-{label}")
        archive_seconds = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "trainer", "retrain", "--archive", str(archive)]
        cmd += ["--models", str(self.registry), "--once", "--model", self.opts.model]
        cmd += ["--no-progress"]
        for kv in self.opts.params:
            cmd += ["--param", kv]
        cmd += list(self.opts.retrain_args)
        self._child_with_settings(cmd, "trainer retrain --once", f"retrain-{label}")
        cycle = models.read_cycles(self.registry)[-1]
        metrics, metric = cycle.get("metrics") or {}, cycle.get("metric", "recall@20")
        return {
            "decision": cycle.get("decision"),
            "summary": models.cycle_summary(cycle),
            "metric": metric,
            "candidate": (metrics.get("candidate") or {}).get(metric),
            "current": (metrics.get("current") or {}).get(metric),
            "holdout_predictions": metrics.get("holdout_predictions"),
            "events": cycle.get("events"),
            "phase_seconds": {"archive": archive_seconds, **(cycle.get("seconds") or {})},
        }

    def _child_with_settings(self, cmd: list[str], what: str, label: str) -> str:
        from streamrec.tools.launch import settings_env

        env = settings_env(
            {
                "kafka.bootstrap_servers": self.conf["bootstrap.servers"],
                "topics.clicks": self.clicks_topic,
                "topics.partitions": self.opts.partitions,
                "worker.app_id": f"bt-{self.run_id}-archiver",
            }
        )
        log = self.work / "retrain.log"
        return run_child(cmd, what=what, log=log, env=env, timeout=self.opts.timeout * 4)

    def workers_live_figures(self, arm: Arm) -> dict[str, Any]:
        """The arm's workers' own live metrics (streamrec.serving.live, the code the figures
        above are computed with), per model version, over every click they answered (the
        warm-up's included; sessions as the workers see them)."""
        from streamrec.engines.live import default_live_metrics_topic
        from streamrec.loop.live_report import live_totals, wait_counted

        last: dict[int, int] = {}
        for cid in self.sent_at:  # topic:partition:offset
            _, p, o = cid.rsplit(":", 2)
            last[int(p)] = max(last.get(int(p), -1), int(o))
        topic = default_live_metrics_topic(f"bt-{self.run_id}-{arm.name}")
        try:
            records = wait_counted(self.conf, topic, last, timeout=self.opts.timeout)
        except TimeoutError as exc:
            self.say(f"arm {arm.name}: live metrics incomplete: {exc}")
            return {}
        return {version: c.result() for (_, version), c in live_totals(records).items()}

    def wait_swapped(self, arm: Arm, before: str | None) -> str:
        deadline = time.monotonic() + self.opts.timeout
        while True:
            v = self.served_version(arm)
            if v is not None and v != before:
                return v
            if not arm.worker.alive():
                raise BacktestError(f"worker {arm.name} exited:\n{arm.worker.log_tail()}")
            if time.monotonic() > deadline:
                raise BacktestError(f"worker {arm.name} did not swap from {before}")
            time.sleep(0.2)

    # -- the whole run
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        with self._stack:
            return self._run()

    def _run(self) -> dict[str, Any]:
        from streamrec.kafka.clients import TopicSpec, ensure_topics

        opts = self.opts
        t_wall0 = time.time()
        df = self.df = load_log(opts)
        if len(df) == 0:
            raise BacktestError("the log is empty")
        t_first, t_last = float(df["Time"].iloc[0]), float(df["Time"].iloc[-1])
        t_warm = parse_warmup(opts.warmup_until, t_first, t_last)
        periods = make_periods(t_warm, t_last, opts.every)
        values, self.click_ids = click_messages(df, [f"bt{i}" for i in range(len(df))])
        view = LogView.build(df, self.click_ids, periods)
        n_warm = int((view.period < 0).sum())
        bounds = (
            [n_warm]
            + [
                int(np.searchsorted(df["Time"].to_numpy(), p.end, side="left"))
                for p in periods[:-1]
            ]
            + [len(df)]
        )
        retrain = opts.retrain and opts.compare is None
        self.say(
            f"log {opts.log}: {len(df):,} clicks from {_when(t_first)} to {_when(t_last)}; "
            f"warm-up until {_when(t_warm)} ({n_warm:,} clicks), then {len(periods)} period(s)"
        )
        # arms and their initial models
        if opts.compare is not None:
            self.arms = [Arm("A", opts.compare[0]), Arm("B", opts.compare[1])]
        elif not retrain and not opts.frozen:
            raise BacktestError("no arm left to run (--no-frozen and --no-retrain)")
        self._start_broker()
        ensure_topics(self.conf, [TopicSpec(self.clicks_topic, opts.partitions)])
        # warm-up clicks first: the retrained arm's first model is one retrain cycle on them
        self.publish(values[:n_warm])
        if opts.compare is None:
            # the retrained arm's first model is one retrain cycle on the warm-up clicks; the
            # frozen arm serves a copy of what that cycle published (the registry may prune
            # it later), else (no registry) `trainer train` on the same clicks
            initial = opts.init
            if retrain:
                self.say("retrain cycle 0 (the retrained arm's first model) on the warm-up")
                self.retrains.append(self.archive_and_retrain("warmup"))
                published = registry_current(self.registry)
                self.retrains[-1]["event_time"] = t_warm
                self.retrains[-1]["version"] = published.name if published else None
                if initial is None and published is not None:
                    initial = self.work / "models" / "initial"
                    shutil.copytree(published, initial)
                self.arms.append(Arm("retrained", self.registry, retrain=True))
            if opts.frozen:
                if initial is None:
                    self.say(f"training the initial {opts.model} on {n_warm:,} warm-up clicks")
                    initial = train_initial(opts, df.iloc[:n_warm], self.work)
                self.arms.append(Arm("frozen", initial))
        self._start_progress(t_warm, t_last)
        for arm in self.arms:
            self._start_worker(arm)
        self._wait_ready()
        for arm in self.arms:
            arm.versions.append(self.served_version(arm) or "")
        self.say("workers ready: " + ", ".join(f"{a.name}={a.versions[-1]}" for a in self.arms))
        if n_warm:
            self.wait_answered(n_warm, t_warm)
        for p, period in enumerate(periods):
            lo, hi = bounds[p], bounds[p + 1]
            self.publish(values[lo:hi])
            self.wait_answered(hi, period.end)
            if retrain and p < len(periods) - 1 and hi > lo:
                arm = self.arms[0]
                before = self.served_version(arm)
                pointer = registry_current(self.registry)
                info = self.archive_and_retrain(f"p{p}")
                # trainer retrain's gate may refuse the candidate: then nothing is published
                # and the workers keep their model (the stand-in cycles always publish)
                now = registry_current(self.registry)
                info["published"] = self.opts.retrain_cycle is not None or now != pointer
                if info["published"]:
                    info["version"] = self.wait_swapped(arm, before)
                    arm.versions.append(info["version"])
                else:
                    info["version"] = before
                info["after_period"] = p
                info["event_time"] = period.end
                self.retrains.append(info)
                what = "swapped to" if info["published"] else "not published (gate), still"
                done = info.get("summary") or f"retrained, {what} {info['version']}"
                self.say(f"period {p + 1}/{len(periods)}: {done}")
        self._stop_progress()
        return self._report(view, periods, t_warm, time.time() - t_wall0)

    def _start_progress(self, t0: float, t1: float) -> None:
        if not self.opts.progress:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]backtest[/]"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}% of event time"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._progress.start()
        self._stack.callback(self._stop_progress)
        self._task = self._progress.add_task("", total=t1 - t0 if t1 > t0 else 1.0, completed=0)
        self._t0 = t0

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _report(
        self, view: LogView, periods: list[Period], t_warm: float, seconds: float
    ) -> dict[str, Any]:
        from streamrec.tools.replay import read_recommendations

        opts = self.opts
        n_p = len(periods)
        report: dict[str, Any] = {
            "command": opts.command,
            "log": str(opts.log),
            "model": opts.model,
            "params": list(opts.params),
            "warmup_until": t_warm,
            "every_s": opts.every,
            "events": len(view.df),
            "warmup_events": int((view.period < 0).sum()),
            "arms": {a.name: str(a.model) for a in self.arms},
            "periods": [],
            "overall": {},
            "swaps": [],
            "retrainer": opts.retrainer if any(a.retrain for a in self.arms) else None,
            "retrains": self.retrains,
            "lost": 0,
            "dead_letters": {},
            "duplicates": 0,
            "seconds": seconds,
            "ks": list(opts.ks),
            "rank": "conservative, from the top-(max k + 1) answer",
        }
        shares = new_item_click_share(view, n_p)
        for p, period in enumerate(periods):
            n = int((view.period == p).sum())
            report["periods"].append(
                {**period.to_json(), "events": n, "new_item_click_share": shares[p]}
            )
        series: dict[str, Any] = {}
        for arm in self.arms:
            recs = read_recommendations(self.conf, arm.recs_topic, idle_timeout=1.0)
            ans = collect_answers(recs, self.click_ids)
            per, overall, s = score_arm(view, ans, self.sent_at, n_p, opts.ks)
            for p, fig in enumerate(per):
                report["periods"][p][arm.name] = fig
            overall["live"] = self.workers_live_figures(arm)
            overall["lost"] = ans.lost
            overall["dead_letters"] = self.dead_letter_reasons(arm)
            overall["duplicates"] = ans.duplicates
            swaps = model_swaps(s["versions"])
            overall["swaps"] = len(swaps)
            report["overall"][arm.name] = overall
            report["swaps"] += [{"arm": arm.name, **sw} for sw in swaps]
            report["lost"] += ans.lost
            for reason, n in overall["dead_letters"].items():
                report["dead_letters"][reason] = report["dead_letters"].get(reason, 0) + n
            report["duplicates"] += ans.duplicates
            series[arm.name] = s
        self.series = series
        t0 = min((s["emitted"][0] for s in series.values() if s["emitted"]), default=0.0)
        report["series"] = {
            name: plot_series(s["latencies_ms"], s["emitted"], t0) for name, s in series.items()
        }
        return report

    def dead_letter_reasons(self, arm: Arm) -> dict[str, int]:
        """How many of the replay's clicks the arm's worker dead-lettered, by reason (they are
        among the ``lost``: a valid log line refused, e.g. a time far from the clock), as the
        waits for its answers read them."""
        readers = self._readers.get(arm.name)
        if readers is None:  # never waited: nothing was sent
            return {}
        ours, dead = set(self.click_ids), readers[1].settled
        return dict(Counter(reason for click, reason in dead.items() if click in ours))


def run_backtest(opts: BacktestOptions) -> dict[str, Any]:
    """Run the backtest and write ``report.json`` and ``report.html`` (with PNG plots)."""
    from streamrec.tools.report import write_report

    bt = Backtest(opts)
    report = bt.run()
    write_report(opts.out, report)
    return report
