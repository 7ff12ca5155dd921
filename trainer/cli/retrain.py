"""``trainer retrain`` (one retrain cycle, or one every period: ``trainer.retrain``) and
``trainer models`` (the model registry: list, show, rollback)."""

from __future__ import annotations

import time

import click

from streamrec.data.clicklog import DataError
from streamrec.loop import registry
from trainer.archive_source import parse_duration
from trainer.cli.options import MultiValueCommand, split_values, threads_option
from trainer.retrain import RetrainConfig, RetrainError, run_cycle
from trainer.retrain_metrics import RetrainMetrics


@click.command("retrain", cls=MultiValueCommand)
@click.option("--archive", required=True, help="Archive directory or URL (streamrec archive).")
@click.option("--models", required=True, help="Model registry directory.")
@click.option("--window", default="14d", show_default=True, help="Event-time window.")
@click.option(
    "--holdout",
    default="auto",
    show_default=True,
    help="Newest slice of event time held out to judge the candidate, e.g. 1d; auto: a day, "
    "or less on a young archive: the slice in which the newest tenth of the sessions start.",
)
@click.option("--every", default=None, help="Run a cycle every e.g. 1h (a loop).")
@click.option("--once", is_flag=True, help="Run one cycle and exit.")
@click.option("--model", "model_name", default="gru4rec", show_default=True)
@click.option("--preset", default=None)
@click.option("--param", "params", multiple=True, help="key=value (official names)")
@click.option("--cold", is_flag=True, help="Train from scratch (default: warm start).")
@click.option("--tolerance", default=0.02, show_default=True, help="Relative gate tolerance.")
@click.option("--metric", default="recall@20", show_default=True)
@click.option("--keep", default=registry.DEFAULT_KEEP, show_default=True, help="Versions kept.")
@click.option(
    "--gate-z",
    default=0.0,
    show_default=True,
    help="Confidence of the gate: the candidate must be shown within the tolerance at "
    "this one-sided z (0: compare the point estimates; e.g. 1.645 for 95%).",
)
@click.option(
    "--min-holdout-events",
    default=100,
    show_default=True,
    help="With a published model, fewer holdout predictions than this keep it.",
)
@click.option(
    "--warm-epochs",
    default="auto",
    show_default=True,
    help="Epochs of a warm start: N, or auto (the new events' share of n_epochs).",
)
@click.option(
    "--min-item-support",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="A new item enters the catalogue only with this many training events in the window "
    "(known items keep training on any number); the cycle's log records what was left out.",
)
@click.option("--variant", default=None, help="HRNN variant (init, all), as trainer train")
@click.option("--features", default=None, help="p-RNN item feature file, as trainer train")
@click.option("--item-meta", default=None, help="p-RNN item metadata, as trainer train")
@click.option("--schedule", default=None, help="p-RNN training schedule")
@click.option(
    "--publish-as",
    type=click.Choice([registry.CHAMPION, registry.CHALLENGER]),
    default=registry.CHAMPION,
    show_default=True,
    help="What a candidate that passes the gate becomes: the champion (served) or the "
    "challenger (served beside it: streamrec worker --challenger-share / --shadow).",
)
@click.option("--progress/--no-progress", default=True)
@threads_option
@click.option(
    "--retrieval-index",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Build the ANN retrieval index into the version before publishing it.",
)
@click.option(
    "--metrics-port",
    default=9110,
    show_default=True,
    help="With --every: port of /metrics, /healthz, /readyz (0: none).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of that port (0.0.0.0 in a container scraped from outside).",
)
def retrain(
    archive: str,
    models: str,
    window: str,
    holdout: str,
    every: str | None,
    once: bool,
    model_name: str,
    preset: str | None,
    params: tuple[str, ...],
    cold: bool,
    tolerance: float,
    metric: str,
    keep: int,
    gate_z: float,
    min_holdout_events: int,
    warm_epochs: str,
    min_item_support: int,
    variant: str | None,
    features: str | None,
    item_meta: str | None,
    schedule: str | None,
    publish_as: str,
    progress: bool,
    retrieval_index: str,
    metrics_port: int,
    metrics_host: str,
) -> None:
    """Retrain from the click archive; publish the candidate if it passes the gate."""
    if once == bool(every):
        raise click.UsageError("give exactly one of --once and --every")
    if warm_epochs != "auto" and not (warm_epochs.isdigit() and int(warm_epochs) > 0):
        raise click.BadParameter("a positive integer or auto", param_hint="--warm-epochs")
    if gate_z < 0 or min_holdout_events < 0 or not 0 <= tolerance <= 1:
        raise click.UsageError("--gate-z, --min-holdout-events >= 0; --tolerance in [0, 1]")
    cfg = RetrainConfig(
        archive, models, window, holdout, model_name, preset, split_values(params), cold,
        tolerance, metric, keep, min_item_support, progress, None, gate_z,
        min_holdout_events, None if warm_epochs == "auto" else int(warm_epochs), variant,
        features, item_meta, schedule, retrieval_index, publish_as,
    )  # fmt: skip
    if once:
        try:
            run_cycle(cfg, _echo)
        except RetrainError as e:
            raise click.ClickException(str(e)) from None
        return
    assert every is not None
    period = _period(every)
    metrics = RetrainMetrics(models)
    metrics.serve(metrics_port, metrics_host)
    _run_every(cfg, period, metrics)


def _echo(s: str) -> None:
    click.echo(s, err=True)


def _period(every: str) -> float:
    """``--every``: a duration (``1h``, ``30m``) or seconds."""
    try:
        period = parse_duration(every if every[-1].isalpha() else f"{every}s")
    except DataError as e:
        raise click.BadParameter(str(e), param_hint="--every") from None
    assert period is not None
    return period


#: a new deployment's retrainer usually starts before the archive holds enough clicks: until
#: a cycle has run, a skipped cycle is tried again after this, doubling up to the period
FIRST_RETRY_SECONDS = 30.0


def next_wait(period: float, ran_once: bool, skips_in_a_row: int) -> float:
    """Seconds from the start of a cycle to the start of the next one: the period, but before
    any cycle has run, ``FIRST_RETRY_SECONDS`` after the first skip, doubling per skip."""
    if ran_once or skips_in_a_row == 0:
        return period
    return min(period, FIRST_RETRY_SECONDS * 2 ** (skips_in_a_row - 1))


def _run_every(cfg: RetrainConfig, period: float, metrics: RetrainMetrics) -> None:
    """A cycle every ``period`` seconds, forever; a cycle that fails is reported, and the
    next one runs on time (:func:`next_wait`: sooner while none has run for lack of data).
    Liveness: busy during a cycle, a beat every second between them; ready once a cycle has
    ended without an unexpected error."""
    health = metrics.health
    ran_once, skips = False, 0
    while True:
        start = time.monotonic()
        health.busy("a retrain cycle is running")
        try:
            metrics.observe_cycle(run_cycle(cfg, _echo), cfg.metric)
            health.done(True, "last cycle ended")
            ran_once = True
        except RetrainError as e:  # unattended: say why, try again next period
            skips += 1
            _echo(f"cycle skipped: {e}")
            metrics.observe_skipped()
            health.done(True, f"last cycle skipped: {e}")
        except Exception as e:  # a failed cycle must not stop the loop
            _echo(f"cycle failed: {type(e).__name__}: {e}")
            metrics.observe_failed()
            health.done(False, f"last cycle failed: {type(e).__name__}: {e}")
        wait = next_wait(period, ran_once, skips)
        if wait < period:
            _echo(f"no cycle has run yet: the next one in {wait:.0f} s")
        while (left := wait - (time.monotonic() - start)) > 0:
            time.sleep(min(1.0, left))
            health.beat()
