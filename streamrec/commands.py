"""Service commands of the `streamrec` CLI: worker, produce, tail, replay, demo."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from .settings import Settings, get_settings


def _topic_specs(settings: Settings) -> list:
    from .kafka import TopicSpec

    t = settings.topics
    return [
        TopicSpec(name, t.partitions, t.replication_factor)
        for name in (t.clicks, t.recommendations, t.dead_letter)
    ]


def ensure_service_topics(settings: Settings) -> None:
    """Create the clicks, recommendations and dead-letter topics with their partition counts."""
    from .kafka import ensure_topics

    ensure_topics(settings.kafka.confluent_config(), _topic_specs(settings))


def load_model_holder(path: Path | None, settings: Settings, wait_s: float = 0.0):
    """A ModelHolder for a checkpoint directory, or a directory of checkpoints (newest wins)."""
    from .runtime import ModelHolder, ModelLoadError, ServingModel

    path = path or settings.model.path
    if path is None:
        raise click.ClickException("no model: pass --model DIR or set STREAMREC_MODEL__PATH")
    path = Path(path)
    m = settings.model
    deadline = time.monotonic() + wait_s
    while True:
        probe = ModelHolder.__new__(ModelHolder)
        probe.watch_dir = path
        ckpt = ModelHolder.newest_checkpoint(probe)
        if ckpt is not None or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if ckpt is None:
        raise click.ClickException(f"no checkpoint (checkpoint.json) found in {path}")
    try:
        model = ServingModel.from_checkpoint(ckpt, m.device, m.top_k)
        model.validate()
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None
    return ModelHolder(model, watch_dir=path, device=m.device, top_k=m.top_k)


@click.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), help="Checkpoint dir.")
@click.option("--wait-for-model", default=0.0, help="Seconds to wait for a checkpoint to appear.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="RocksDB state directory.")
@click.option("--loglevel", default=None, help="Log level (default: settings).")
def worker(
    model_path: Path | None, wait_for_model: float, data_dir: Path | None, loglevel: str | None
) -> None:
    """Run one worker: clicks in, recommendations out (Ctrl-C stops it cleanly)."""
    from .app import Worker

    settings = get_settings()
    level = (loglevel or settings.worker.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    holder = load_model_holder(model_path, settings, wait_for_model)
    m = holder.current
    click.echo(
        f"serving {m.name} {m.version} ({m.n_items} items) on {m.device}; "
        f"clicks={settings.topics.clicks} -> {settings.topics.recommendations}",
        err=True,
    )
    ensure_service_topics(settings)
    # Faust's worker parses sys.argv; give it only the program name.
    sys.argv = sys.argv[:1]
    Worker(settings, holder, datadir=data_dir).run(loglevel=level)


@click.command()
@click.option("--from-beginning/--latest", default=False, help="Start at offset 0.")
@click.option("--max", "max_n", default=0, help="Stop after this many (0: forever).")
@click.option("--raw", is_flag=True, help="Print the JSON values unchanged.")
def tail(from_beginning: bool, max_n: int, raw: bool) -> None:
    """Print recommendations as they arrive."""
    from confluent_kafka import Consumer

    settings = get_settings()
    consumer = Consumer(
        {
            **settings.kafka.confluent_config(),
            "group.id": f"streamrec-tail-{time.time_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.subscribe([settings.topics.recommendations])
    n = 0
    try:
        while not max_n or n < max_n:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            n += 1
            if raw:
                click.echo(msg.value().decode())
                continue
            r = json.loads(msg.value())
            top = ", ".join(r["items"][:5])
            click.echo(
                f"{r['click_id']:<24} user={r['user_id'] or '-':<10} session={r['session_id']:<10} "
                f"clicked={r['item_id']:<10} -> [{top}, ...] ({r['model_version'][:20]})"
            )
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def register(main: click.Group) -> None:
    """Add the service commands to the `streamrec` group."""
    main.add_command(worker)
    main.add_command(tail)
    for name in ("produce", "replay", "demo"):
        try:
            mod = __import__(f"streamrec.{name}_cmd", fromlist=["command"])
        except ModuleNotFoundError:
            continue
        main.add_command(mod.command)
