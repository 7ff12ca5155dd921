"""`streamrec live-report` and `streamrec guard`: what the live metrics topic says about the
arms, and the rollback guard that acts on it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from streamrec.kafka.clients import connect
from streamrec.processes import stop_signals
from streamrec.settings import get_settings


def _topic(topic: str | None) -> str:
    from streamrec.engines.live import live_metrics_topic

    return topic or live_metrics_topic(get_settings())


@click.command("live-report")
@click.option("--topic", help="Live metrics topic (default: the workers' group's).")
@click.option("--app-id", help="Only the counts of this worker group (default: all).")
@click.option("-k", "k", default=20, show_default=True, help="Cut-off (1, 5, 10 or 20).")
@click.option("--confidence", default=0.95, show_default=True, help="Of the intervals.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def live_report(
    topic: str | None, app_id: str | None, k: int, confidence: float, as_json: bool
) -> None:
    """Per arm and model version: predictions, live Recall@k and MRR@k with intervals; the
    challenger minus the champion, and whether the data tell them apart yet."""
    from streamrec.loop.live_report import compare, format_comparison, read_live_records, to_json

    conf = connect(get_settings())
    records = read_live_records(conf, _topic(topic), app_id=app_id)
    report = compare(records, k, confidence)
    click.echo(json.dumps(to_json(report), indent=2) if as_json else format_comparison(report))


@click.command()
@click.option(
    "--models",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    required=True,
    help="The model registry the workers serve.",
)
@click.option("--topic", help="Live metrics topic (default: the workers' group's).")
@click.option("--app-id", help="Only the counts of this worker group (default: all).")
@click.option("--tolerance", default=0.0, show_default=True, help="Recall@20 a champion may lose.")
@click.option("--confidence", default=0.95, show_default=True)
@click.option("--min-predictions", default=500, show_default=True)
@click.option("--max-predictions", default=20_000, show_default=True)
@click.option(
    "--window",
    "window_s",
    default=3600.0,
    show_default=True,
    help="Seconds before a change over which the previous champion is measured.",
)
@click.option("--interval", "interval_s", default=10.0, show_default=True)
@click.option("--once", is_flag=True, help="Judge once and exit.")
def guard(
    models: Path,
    topic: str | None,
    app_id: str | None,
    tolerance: float,
    confidence: float,
    min_predictions: int,
    max_predictions: int,
    window_s: float,
    interval_s: float,
    once: bool,
) -> None:
    """Roll a new champion back when its live Recall@20 is worse than the previous
    champion's (streamrec.loop.guard)."""
    from streamrec.loop.guard import GuardConfig, check
    from streamrec.loop.live_report import read_live_records

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = GuardConfig(
        tolerance=tolerance,
        confidence=confidence,
        min_predictions=min_predictions,
        max_predictions=max_predictions,
        window_s=window_s,
    )
    conf = connect(get_settings())
    name = _topic(topic)
    with stop_signals() as stop:
        while True:
            verdict = check(models, read_live_records(conf, name, app_id=app_id), cfg)
            if verdict is not None:
                click.echo(f"{verdict.action} {verdict.new}: {verdict.reason}", err=True)
            if once or stop.wait(interval_s):
                return
