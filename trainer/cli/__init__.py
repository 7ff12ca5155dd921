"""The ``trainer`` command (``trainer.cli.main``)."""

from trainer.cli.main import main

__all__ = ["main"]
