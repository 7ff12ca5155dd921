"""`streamrec` command line: `broker` here; the service commands are in commands.py."""

from __future__ import annotations

import click

from streamrec.cli import commands
from streamrec.errors import CommandGroup
from streamrec.kafka.embedded import DEFAULT_PORT, EmbeddedBroker
from streamrec.processes import stop_signals
from streamrec.settings import get_settings


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamrec")
def main() -> None:
    """Real-time session-based recommendations from Kafka click streams."""
    get_settings()  # invalid settings stop every command here, each one named


@main.command()
@click.option(
    "--port", default=DEFAULT_PORT, show_default=True, help="TCP port (0 picks a free one)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
def broker(port: int, host: str) -> None:
    """Run the embedded Kafka-compatible broker (in memory) until Ctrl-C."""
    embedded = EmbeddedBroker(port=port, host=host).start()
    click.echo(f"broker ready: bootstrap servers {embedded.bootstrap} (Ctrl-C to stop)", err=True)
    click.echo(embedded.bootstrap)
    try:
        with stop_signals() as stop:
            while not stop.wait(0.5):
                pass
    finally:
        embedded.stop()
        click.echo("broker stopped", err=True)


commands.register(main)

if __name__ == "__main__":
    main()
