"""`streamrec` command line: `broker` here; the service commands are in commands.py."""

from __future__ import annotations

import signal
import sys
import threading

import click

from streamrec.cli import commands
from streamrec.kafka.embedded import DEFAULT_PORT, BrokerError, EmbeddedBroker
from streamrec.settings import SettingsError, get_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamrec")
def main() -> None:
    """Real-time session-based recommendations from Kafka click streams."""
    try:
        get_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command()
@click.option(
    "--port", default=DEFAULT_PORT, show_default=True, help="TCP port (0 picks a free one)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
def broker(port: int, host: str) -> None:
    """Run the embedded Kafka-compatible broker (in memory) until Ctrl-C."""
    try:
        embedded = EmbeddedBroker(port=port, host=host).start()
    except BrokerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"broker ready: bootstrap servers {embedded.bootstrap} (Ctrl-C to stop)", err=True)
    click.echo(embedded.bootstrap)
    try:
        wait_for_stop_signal()
    finally:
        embedded.stop()
        click.echo("broker stopped", err=True)


commands.register(main)

if __name__ == "__main__":
    main()
