"""Service commands of the `streamrec` CLI: worker, produce, tail, replay, backtest, demo, archive.

A :class:`streamrec.errors.StreamrecError` raised below is reported by the group
(:class:`streamrec.errors.CommandGroup`) as one ``Error: ...`` line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

import click

from streamrec.errors import require_extra
from streamrec.kafka.clients import connect, ensure_service_topics
from streamrec.processes import stop_signals
from streamrec.settings import Settings, get_settings

if TYPE_CHECKING:
    from streamrec.serving.served_model import ModelHolder, ServingModel


def load_model_holder(path: Path | None, settings: Settings, wait_s: float = 0.0):
    """A ModelHolder for a checkpoint directory, or a directory of checkpoints (newest wins)."""
    from streamrec.loop.registry import RegistryError
    from streamrec.serving.served_model import (
        RetrievalOptions,
        ServingModel,
        find_checkpoint,
    )

    path = path or settings.model.path
    if path is None:
        raise click.ClickException("no model: pass --model DIR or set STREAMREC_MODEL__PATH")
    path = Path(path)
    m = settings.model
    deadline = time.monotonic() + wait_s
    problem = ""
    while True:
        try:
            ckpt = find_checkpoint(path)
        except RegistryError as exc:  # a broken pointer may be fixed while we wait
            ckpt, problem = None, f": {exc}"
        if ckpt is not None or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if ckpt is None:
        raise click.ClickException(f"no checkpoint (checkpoint.json) found in {path}{problem}")
    model = ServingModel.from_checkpoint(
        ckpt, m.device, m.top_k, m.score_dtype, retrieval=RetrievalOptions.from_settings(m)
    )
    model.validate()
    return _holder(model, path, settings)


def _holder(
    model: ServingModel | None, watch_dir: Path, settings: Settings, alias: str = ""
) -> ModelHolder:
    """A ModelHolder watching ``watch_dir`` with the model settings, following the registry
    alias ``alias`` (default: the champion)."""
    from streamrec.loop.registry import CHAMPION
    from streamrec.serving.served_model import ModelHolder, RetrievalOptions

    m = settings.model
    return ModelHolder(
        model,
        watch_dir=watch_dir,
        device=m.device,
        top_k=m.top_k,
        score_dtype=m.score_dtype,
        gate_ratio=m.gate_ratio,
        retrieval=RetrievalOptions.from_settings(m),
        alias=alias or CHAMPION,
    )


def load_challenger_holder(path: Path | None, settings: Settings):
    """The challenger's holder: the registry's challenger, loaded and checked now when one is
    named (else none yet: the worker serves it once one is named)."""
    from streamrec.loop import registry

    path = Path(path or settings.model.path or "")
    if not registry.is_registry(path):
        raise click.ClickException(
            f"{path} is not a model registry: a challenger is what its CHALLENGER names "
            "(trainer models alias --models DIR challenger VERSION)"
        )
    holder = _holder(None, path, settings, alias=registry.CHALLENGER)
    first = holder.prepare_reload()
    if first is not None:
        holder.install(first)
    return holder


@click.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), help="Checkpoint dir.")
@click.option("--wait-for-model", default=0.0, help="Seconds to wait for a checkpoint to appear.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="RocksDB state directory.")
@click.option("--loglevel", default=None, help="Log level (default: settings).")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="torch intra-op threads on CPU (default: worker.torch_threads, 1).",
)
@click.option(
    "--fetch-wait-ms",
    type=int,
    default=None,
    help="Longest wait of an empty consumer fetch (default: kafka.fetch_max_wait_ms; unset: "
    "10 ms on the embedded broker, the client's default on Kafka).",
)
@click.option(
    "--engine",
    type=click.Choice(["native", "faust"]),
    default=None,
    help="Consumer and state engine (default: worker.engine, native).",
)
@click.option(
    "--challenger-share",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="A/B: the share of keys (by a stable hash of the user id, else the session id) the "
    "registry's challenger answers (default: model.challenger_share, 0).",
)
@click.option(
    "--shadow/--no-shadow",
    default=None,
    help="The registry's challenger scores every click too (measured, not published; "
    "default: model.shadow).",
)
def worker(
    model_path: Path | None,
    wait_for_model: float,
    data_dir: Path | None,
    loglevel: str | None,
    threads: int | None,
    fetch_wait_ms: int | None,
    engine: str | None,
    challenger_share: float | None,
    shadow: bool | None,
) -> None:
    """Run one worker: clicks in, recommendations out (Ctrl-C stops it cleanly)."""
    settings = get_settings()
    engine = engine or settings.worker.engine
    if engine == "faust":  # before the broker and the model: say it first
        require_extra("faust", "faust", "worker.engine=faust")
    share = settings.model.challenger_share if challenger_share is None else challenger_share
    shadow = settings.model.shadow if shadow is None else shadow
    if shadow and share > 0:
        raise click.UsageError("--shadow serves the challenger every click: no share with it")
    level = (loglevel or settings.worker.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conf = connect(settings)  # an unreachable broker ends the command here, in one line
    import torch

    torch.set_num_threads(threads or settings.worker.torch_threads)
    holder = load_model_holder(model_path, settings, wait_for_model)
    challenger = None
    if shadow or share > 0:
        challenger = load_challenger_holder(model_path, settings)
    m = holder.current
    c = challenger.served if challenger is not None else None
    mode = f"shadow, challenger {c.version if c else 'none yet'}; " if shadow else ""
    if share > 0:
        mode = f"challenger {c.version if c else 'none yet'} on {share:.0%} of the keys; "
    click.echo(
        f"serving {m.name} {m.version} ({m.n_items} items) on {m.device}; {mode}"
        f"clicks={settings.topics.clicks} -> {settings.topics.recommendations}",
        err=True,
    )
    ensure_service_topics(settings, conf)
    if engine == "faust":
        from streamrec.engines.faust.app import Worker

        # Faust's worker parses sys.argv; give it only the program name.
        sys.argv = sys.argv[:1]
        Worker(
            settings, holder, challenger=challenger, challenger_share=share, shadow=shadow,
            datadir=data_dir, fetch_max_wait_ms=fetch_wait_ms, conf=conf,
        ).run(loglevel=level)  # fmt: skip
        return
    from streamrec.engines.native.worker import NativeWorker

    # a DeliveryError or StateLayoutError ends the command with its message (nothing was
    # committed), as every StreamrecError does
    NativeWorker(
        settings, holder, challenger=challenger, challenger_share=share, shadow=shadow,
        datadir=data_dir, fetch_max_wait_ms=fetch_wait_ms, conf=conf,
    ).run()  # fmt: skip


def terminal_safe(text: str) -> str:
    """``text`` with control and format characters escaped (``\\x1b``, ``\\u202e``): ids come
    from click bodies, and a producer must not be able to move the cursor, retitle or garble
    the terminal of an operator reading them."""
    if text.isprintable():
        return text
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
        else c
        for c in text
    )


def _stdout_is_terminal() -> bool:
    return click.get_text_stream("stdout").isatty()


@click.command()
@click.option("--from-beginning/--latest", default=False, help="Start at offset 0.")
@click.option("--max", "max_n", default=0, help="Stop after this many (0: forever).")
@click.option("--raw", is_flag=True, help="Print the JSON values unchanged.")
def tail(from_beginning: bool, max_n: int, raw: bool) -> None:
    """Print recommendations as they arrive (on a terminal, control characters escaped)."""
    from streamrec.kafka.clients import tail as tail_topic
    from streamrec.serving.records import Recommendation

    settings = get_settings()
    conf = connect(settings)
    topic = settings.topics.recommendations
    safe = terminal_safe if _stdout_is_terminal() else str
    n = 0
    try:
        for msg in tail_topic(conf, topic, from_beginning=from_beginning):
            n += 1
            if raw:
                click.echo(safe(msg.value().decode(errors="replace")))
            else:
                r = Recommendation.from_json(msg.value())
                top = ", ".join(r.items[:5])
                click.echo(
                    safe(
                        f"{r.click_id:<24} user={r.user_id or '-':<10} "
                        f"session={r.session_id:<10} clicked={r.item_id:<10} -> [{top}, ...] "
                        f"({r.model_version[:20]})"
                    )
                )
            if max_n and n >= max_n:
                break
    except KeyboardInterrupt:
        pass


def _load_log(path: Path, fmt: str | None, limit: int):
    from streamrec.data.clicklog import load_clicks

    df = load_clicks(path, fmt=fmt)
    df = df.sort_values("Time", kind="stable")  # a stream arrives in time order
    return df.head(limit) if limit else df


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rate", type=float, help="Events per second (default: as fast as possible).")
@click.option("--speedup", type=float, help="Replay the log's own timing, X times faster.")
@click.option("--format", "fmt", default=None, help="gru4rec|tsv|csv|yoochoose|parquet.")
@click.option("--limit", default=0, help="Only the first N events (0: all).")
@click.option("--topic", default=None, help="Target topic (default: the clicks topic).")
def produce(
    path: Path,
    rate: float | None,
    speedup: float | None,
    fmt: str | None,
    limit: int,
    topic: str | None,
) -> None:
    """Publish a click log (the trainer's formats) to the clicks topic."""
    from rich.progress import Progress

    from streamrec.tools.replay import click_values
    from streamrec.tools.replay import produce as produce_values

    if rate and speedup:
        raise click.UsageError("--rate and --speedup are exclusive")
    settings = get_settings()
    df = _load_log(path, fmt, limit)
    values = click_values(df)
    if speedup and not ("timestamp" in json.loads(values[0][1]) if values else False):
        raise click.UsageError("--speedup needs real timestamps; this log has an ordinal Time")
    conf = connect(settings)
    ensure_service_topics(settings, conf)
    with Progress() as bar:
        task = bar.add_task("producing", total=len(values))
        out = produce_values(
            conf,
            topic or settings.topics.clicks,
            values,
            rate=rate,
            speedup=speedup,
            on_progress=lambda n: bar.update(task, completed=n),
        )
    click.echo(
        f"produced {out.n - out.failed:,} events in {out.seconds:.1f} s "
        f"({out.n / max(out.seconds, 1e-9):,.0f}/s); {out.failed} failed",
        err=True,
    )
    if out.failed:
        sys.exit(1)


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rate", type=float, help="Events per second (default: as fast as possible).")
@click.option("--format", "fmt", default=None, help="gru4rec|tsv|csv|yoochoose|parquet.")
@click.option("--limit", default=0, help="Only the first N events (0: all).")
@click.option("--timeout", default=300.0, help="Seconds to wait for all answers.")
@click.option("-k", "k", default=20, help="Cut-off of Recall/MRR.")
def replay(
    path: Path, rate: float | None, fmt: str | None, limit: int, timeout: float, k: int
) -> None:
    """Replay a historical log through the running workers; live Recall@k/MRR@k and latency."""
    from streamrec.tools.replay import (
        click_values,
        latency_percentiles,
        live_metrics,
        wait_for_answers,
    )
    from streamrec.tools.replay import produce as produce_values

    settings = get_settings()
    conf = connect(settings)
    ensure_service_topics(settings, conf)
    values = click_values(_load_log(path, fmt, limit))
    click.echo(f"replaying {len(values):,} clicks to {settings.topics.clicks}", err=True)
    out = produce_values(conf, settings.topics.clicks, values, rate=rate)
    answers = wait_for_answers(conf, settings.topics.recommendations, out.click_ids, timeout)
    recs = list(answers.values())
    lat = latency_percentiles(r.emitted_at - out.sent_at[r.click_id] for r in recs)
    m = live_metrics(recs, k)
    click.echo(f"answered {len(recs):,}/{len(out.click_ids):,} clicks")
    click.echo(
        f"latency p50 {lat['p50'] * 1e3:.1f} ms p95 {lat['p95'] * 1e3:.1f} ms "
        f"p99 {lat['p99'] * 1e3:.1f} ms"
    )
    click.echo(f"live {m}")
    if len(recs) < len(out.click_ids):
        sys.exit(1)


@click.command(context_settings={"show_default": True})
@click.argument("log", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Report dir."
)
@click.option("--every", default=None, help="Period of event time, e.g. 1d, 7d, 30d, 12h.")
@click.option(
    "--warmup-until",
    default=None,
    help="Warm-up end: a fraction of the log's time span (0-1), epoch seconds or ISO time.",
)
@click.option("--model", "model_name", default="gru4rec", help="gru4rec, hrnn or prnn.")
@click.option("--param", "params", multiple=True, help="key=value for the trainer (repeatable).")
@click.option(
    "--init",
    "init_model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Initial checkpoint (instead of training one on the warm-up clicks).",
)
@click.option(
    "--compare",
    nargs=2,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Two fixed checkpoints scored side by side on the same replay.",
)
@click.option("--frozen/--no-frozen", default=True, help="Run the arm with the initial model.")
@click.option("--retrain/--no-retrain", default=True, help="Run the periodically retrained arm.")
@click.option(
    "--kafka/--embedded",
    "use_kafka",
    default=False,
    help="The configured Kafka (settings) instead of an embedded broker.",
)
@click.option(
    "--retrain-option",
    "retrain_options",
    multiple=True,
    help="An option for `trainer retrain`, e.g. --retrain-option=--window=60d (repeatable).",
)
@click.option("--partitions", default=2, help="Partitions of the backtest's topics.")
@click.option(
    "--session-gap", type=float, default=None, help="Sessionise a log without sessions (s)."
)
@click.option("--state-gap", type=float, default=None, help="Workers' session inactivity gap (s).")
@click.option("--format", "fmt", default=None, help="Log format (default: from the file).")
@click.option("--timeout", default=600.0, help="Longest wait for one step (s).")
@click.option("--progress/--no-progress", default=True)
def backtest(
    log: Path,
    out_dir: Path,
    every: str | None,
    warmup_until: str | None,
    model_name: str,
    params: tuple[str, ...],
    init_model: Path | None,
    compare: tuple[Path, Path] | None,
    frozen: bool,
    retrain: bool,
    use_kafka: bool,
    retrain_options: tuple[str, ...],
    partitions: int,
    session_gap: float | None,
    state_gap: float | None,
    fmt: str | None,
    timeout: float,
    progress: bool,
) -> None:
    """Replay LOG through the live path, retrained arm against frozen; report.json + report.html."""
    from streamrec.tools.backtest import BacktestOptions, parse_every, run_backtest

    try:
        period = parse_every(every)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--every") from None
    if model_name not in ("gru4rec", "hrnn", "prnn"):
        raise click.BadParameter(f"unknown model {model_name!r}", param_hint="--model")
    opts = BacktestOptions(
        log=log,
        out=out_dir,
        every=period,
        warmup_until=warmup_until,
        model=model_name,
        params=list(params),
        init=init_model,
        compare=compare or None,
        frozen=frozen,
        retrain=retrain,
        retrain_args=list(retrain_options),
        kafka_conf=connect(get_settings()) if use_kafka else None,
        partitions=partitions,
        session_gap=session_gap,
        state_gap=state_gap,
        fmt=fmt,
        timeout=timeout,
        progress=progress,
        command=" ".join(["streamrec", *sys.argv[1:]]),
    )
    try:
        with stop_signals(interrupt=True):  # SIGTERM cleans up as Ctrl-C does
            report = run_backtest(opts)
    except KeyboardInterrupt:
        click.echo("interrupted: workers and broker stopped", err=True)
        sys.exit(130)
    for arm, fig in report["overall"].items():
        recall, mrr = fig.get("recall@20") or 0.0, fig.get("mrr@20") or 0.0
        click.echo(
            f"{arm:>10}: Recall@20 {recall:.4f}  MRR@20 {mrr:.4f}"
            f"  (n={fig.get('n_scored', 0):,}, swaps {fig.get('swaps', 0)})"
        )
    html = out_dir / "report.html"
    dead = ", ".join(f"{n:,} {reason}" for reason, n in report.get("dead_letters", {}).items())
    lost = f"lost {report['lost']}" + (f" (dead-lettered: {dead})" if dead else "")
    click.echo(f"{lost}, duplicated {report['duplicates']}; report: {html}")
    if report["lost"] or report["duplicates"]:
        sys.exit(1)


@click.command()
@click.option("--sessions", default=2000, show_default=True, help="Synthetic sessions.")
@click.option("--items", default=300, show_default=True, help="Synthetic items.")
@click.option("--rate", default=400.0, show_default=True, help="Clicks per second streamed.")
@click.option("--epochs", default=3, show_default=True, help="Training epochs.")
@click.option("--keep", type=click.Path(path_type=Path), help="Keep model and logs here.")
@click.option(
    "--retrain", is_flag=True, help="The retraining loop: archive, retrain, publish, swap."
)
def demo(
    sessions: int, items: int, rate: float, epochs: int, keep: Path | None, retrain: bool
) -> None:
    """Broker, synthetic clicks, a GRU4Rec trained in seconds, a worker, live recommendations."""
    from streamrec.tools.demo import DemoOptions, run_demo, run_retrain_demo

    opts = DemoOptions(sessions=sessions, items=items, rate=rate, epochs=epochs, keep_dir=keep)
    (run_retrain_demo if retrain else run_demo)(opts)


@click.command()
@click.option("--dir", "directory", required=True, help="Archive directory or fsspec URL.")
@click.option("--until-caught-up", is_flag=True, help="Exit once the end offsets are reached.")
@click.option("--group", default=None, help="Consumer group (default: <app_id>-archiver).")
@click.option("--flush-events", default=50_000, show_default=True, help="Rows per file, max.")
@click.option("--flush-interval", default=10.0, show_default=True, help="Seconds per file.")
@click.option(
    "--max-open-hours",
    default=24,
    show_default=True,
    type=click.IntRange(min=1),
    help="Event hours one range of offsets may hold (one file each) before it is written.",
)
@click.option("--idle", default=2.0, show_default=True, help="Idle s ending a catch-up.")
@click.option(
    "--metrics-port",
    default=0,
    show_default=True,
    help="Port of /metrics, /healthz, /readyz, e.g. 9109 (0: none, so several archivers can "
    "share a machine); the address is worker.metrics_host.",
)
def archive(
    directory: str,
    until_caught_up: bool,
    group: str | None,
    flush_events: int,
    flush_interval: float,
    max_open_hours: int,
    idle: float,
    metrics_port: int,
) -> None:
    """Archive the clicks topic as Parquet, by event date and hour (exactly once)."""
    from streamrec.loop.archiver import Archiver
    from streamrec.serving.config import CoreConfig

    settings = get_settings()
    logging.basicConfig(
        level=settings.worker.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    conf = connect(settings)
    ensure_service_topics(settings, conf)
    archiver = Archiver(
        conf,
        settings.topics.clicks,
        directory,
        group=group or f"{settings.worker.app_id}-archiver",
        flush_events=flush_events,
        flush_interval_s=flush_interval,
        max_open_hours=max_open_hours,
        config=CoreConfig.from_settings(settings),
        partitioner=settings.topics.partitioner,
    )
    click.echo(f"archiving {settings.topics.clicks} -> {directory}", err=True)
    server = archiver.metrics.serve(metrics_port, settings.worker.metrics_host)
    with stop_signals() as stop:
        st = archiver.run(until_caught_up=until_caught_up, idle_s=idle, stopped=stop.is_set)
    if server is not None:
        server.shutdown()
    click.echo(
        f"archived {st.archived:,} clicks in {st.files} files ({st.skipped} skipped, "
        f"{st.records:,} records) in {st.seconds:.1f} s "
        f"({st.records / max(st.seconds, 1e-9):,.0f} records/s)",
        err=True,
    )


def register(main: click.Group) -> None:
    """Add the service commands to the `streamrec` group."""
    from streamrec.cli.quality import guard, live_report

    for cmd in (worker, produce, tail, replay, backtest, demo, archive, live_report, guard):
        main.add_command(cmd)
