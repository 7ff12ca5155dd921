"""The project's one exception base, and the one place a command line reports it.

Every exception the project raises on purpose derives from :class:`StreamrecError` (besides
the built-in class its callers catch, e.g. ``ValueError``), trainer's included: its message
is written for the user, so the ``streamrec`` and ``trainer`` commands print it as one
``Error: ...`` line and exit with status 1, with no traceback (:class:`CommandGroup`).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

import click


class StreamrecError(Exception):
    """Base of every error streamrec and trainer raise on purpose (a message for the user)."""


def require_extra(module: str, extra: str, what: str) -> None:
    """Import ``module`` or say, in one line, which extra of the package brings it."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise StreamrecError(
            f"{what} needs the '{extra}' extra, which is not installed: "
            f"pip install 'streamrec[{extra}]'"
        ) from None


HELP_OPTION_NAMES = ["-h", "--help"]


class CommandGroup(click.Group):
    """A click group whose commands report a :class:`StreamrecError` as ``Error: message``
    (exit status 1) instead of a traceback."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        # click builds a command's help option once and keeps it: a command first invoked on
        # its own (a test, another tool) would then refuse -h even under this group
        cmd.context_settings.setdefault("help_option_names", HELP_OPTION_NAMES)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StreamrecError as exc:
            raise click.ClickException(str(exc)) from None
