"""One exception base for the project, and the command lines report it as one line."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import click
from click.testing import CliRunner

import streamrec
import trainer
from streamrec.cli.main import main as streamrec_main
from streamrec.errors import CommandGroup, StreamrecError
from trainer.cli import main as trainer_main


def _project_exceptions() -> list[type[BaseException]]:
    found = []
    for package in (streamrec, trainer):
        prefix = package.__name__ + "."
        for info in pkgutil.walk_packages(package.__path__, prefix):
            if info.name.endswith("__main__"):
                continue  # runs the command line
            module = importlib.import_module(info.name)
            found += [
                obj
                for _, obj in inspect.getmembers(module, inspect.isclass)
                if issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not issubclass(obj, Warning)
            ]
    return found


def test_every_project_exception_derives_from_the_one_base() -> None:
    exceptions = _project_exceptions()
    assert len(exceptions) >= 16  # the walk found them (16 when the base came in)
    assert [e.__qualname__ for e in exceptions if not issubclass(e, StreamrecError)] == []


def test_both_command_lines_report_project_errors_in_one_place() -> None:
    assert isinstance(streamrec_main, CommandGroup)
    assert isinstance(trainer_main, CommandGroup)


def test_a_project_error_is_one_line_and_status_1_anything_else_a_traceback() -> None:
    @click.group(cls=CommandGroup)
    def cli() -> None:
        pass

    @cli.command()
    def refuse() -> None:
        raise StreamrecError("the archive is unreadable")

    @cli.command()
    def bug() -> None:
        raise KeyError("bug")

    res = CliRunner().invoke(cli, ["refuse"])
    assert (res.exit_code, res.output) == (1, "Error: the archive is unreadable\n")
    res = CliRunner().invoke(cli, ["bug"])
    assert isinstance(res.exception, KeyError)  # a bug keeps its traceback


def test_streamrec_produce_reports_a_bad_log_without_a_traceback(tmp_path: Path) -> None:
    log = tmp_path / "clicks.tsv"
    log.write_text("a\tb\n1\t2\n")
    res = CliRunner().invoke(streamrec_main, ["produce", str(log)])
    assert res.exit_code == 1, res.output
    assert res.output.splitlines() == [
        f"Error: {log}: missing column(s): SessionId, ItemId, Time; found ['a', 'b']"
    ]
