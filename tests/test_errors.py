"""One exception base for the project, and the command lines report it as one line."""

from __future__ import annotations

import gzip
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

import click
import pytest
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


# ----------------------------------------------------------------------------- bad input files

#: (file name, bytes, the one error line after "Error: {path}: ")
_GZIP_TSV = gzip.compress(b"SessionId\tItemId\tTime\n1\t2\t1700000000\n1\t3\t1700000010\n")
BAD_LOGS = [
    ("fields.tsv", b"SessionId\tItemId\tTime\n1\t2\t1700000000\n1\t3\t17\textra\n",
     "line 3: expected 3 fields, found 4"),
    ("quote.tsv", b'SessionId\tItemId\tTime\n1\t2\t1700000000\n1\t"3\t1700000010\n',
     'line 3: a field opens a quote (") that never closes'),
    ("time.tsv", b"SessionId\tItemId\tTime\n1\t2\tsoon\n", "line 2: cannot parse Time value"),
    ("text.tsv.gz", b"SessionId\tItemId\tTime\n1\t2\t1700000000\n",
     "the name ends in .gz but the file is not gzip-compressed"),
    ("binary.tsv.gz", bytes(range(256)) * 8,
     "the name ends in .gz but the file is not gzip-compressed"),
    ("truncated.tsv.gz", _GZIP_TSV[: len(_GZIP_TSV) // 2], "damaged or truncated gzip data"),
]  # fmt: skip


def _one_error_line(res: Any, path: Path, expected: str) -> None:
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: {expected}"), res.output


@pytest.mark.parametrize(("name", "data", "expected"), BAD_LOGS, ids=[b[0] for b in BAD_LOGS])
def test_a_bad_log_is_one_line_with_its_line_for_produce_backtest_and_trainer(
    tmp_path: Path, name: str, data: bytes, expected: str
) -> None:
    """The same file gives the same one line (no traceback, exit 1) in every command that
    reads logs; no broker is needed: the log is read before anything starts."""
    log = tmp_path / name
    log.write_bytes(data)
    runner = CliRunner()
    _one_error_line(runner.invoke(streamrec_main, ["produce", str(log)]), log, expected)
    res = runner.invoke(streamrec_main, ["backtest", str(log), "--out", str(tmp_path / "bt")])
    _one_error_line(res, log, expected)
    res = runner.invoke(trainer_main, ["train", "--train", str(log), "--out", str(tmp_path / "m")])
    _one_error_line(res, log, expected)


def test_an_unknown_format_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "clicks.tsv"
    log.write_text("SessionId\tItemId\tTime\n1\t2\t1700000000\n")
    res = CliRunner().invoke(streamrec_main, ["produce", str(log), "--format", "foo"])
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        "Error: unknown format 'foo'; expected one of "
        "('gru4rec', 'yoochoose', 'csv', 'tsv', 'parquet')"
    ]


def test_one_error_prefix_everywhere() -> None:
    """Commands report errors as ``Error: ...`` (click's and CommandGroup's): no source
    writes its own lower-case ``error:`` prefix."""
    pattern = re.compile(r"""["']error: """)
    offenders = [
        f"{path}:{n}"
        for package in (streamrec, trainer)
        for path in Path(package.__path__[0]).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


# ----------------------------------------------------------------------------- the terminal


def test_control_characters_are_escaped_for_a_terminal() -> None:
    from streamrec.cli.commands import terminal_safe

    hostile = "u1\x1b]0;owned\x07\x1b[2J\r\u202e\x9b\u2028"
    safe = terminal_safe(hostile)
    assert safe.isprintable()
    assert safe == "u1\\x1b]0;owned\\x07\\x1b[2J\\r\\u202e\\x9b\\u2028"
    assert terminal_safe("café 😀 item-42") == "café 😀 item-42"  # printable text unchanged


def test_tail_escapes_ids_on_a_terminal_and_passes_them_through_a_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import streamrec.cli.commands as commands
    import streamrec.kafka.clients as clients
    from streamrec.serving.records import Recommendation

    rec = Recommendation(
        click_id="c:0:1", topic="c", partition=0, offset=1, user_id=None,
        session_id="s\x1b]0;owned\x07", item_id="i\x1b[2J", items=["a", "b\x1b[31m"],
        scores=[1.0, 0.5], model_version="v1", arm="champion", event_time=1.7e9, produced_at=None,
        received_at=None, emitted_at=1.7e9, duplicate=False, unknown_item=False,
    )  # fmt: skip

    class Msg:
        def value(self) -> bytes:
            return rec.to_json()

    monkeypatch.setattr(clients, "tail", lambda *a, **k: iter([Msg()]))
    monkeypatch.setattr(commands, "connect", lambda settings: {})  # no broker: the probe
    for on_terminal in (True, False):
        monkeypatch.setattr(commands, "_stdout_is_terminal", lambda t=on_terminal: t)
        for args in (["tail", "--max", "1"], ["tail", "--max", "1", "--raw"]):
            out = CliRunner().invoke(streamrec_main, args).output
            if on_terminal:
                assert "\x1b" not in out and "\x07" not in out and "owned" in out, args
            elif "--raw" not in args:
                assert "s\x1b]0;owned\x07" in out  # a pipe gets the ids as they are


@pytest.mark.parametrize("group", [streamrec_main, trainer_main], ids=["streamrec", "trainer"])
def test_both_commands_take_h_and_version(group: click.Group) -> None:
    runner = CliRunner()
    for args in (["-h"], ["--help"]):
        res = runner.invoke(group, args)
        assert res.exit_code == 0 and res.output.startswith("Usage: "), res.output
    res = runner.invoke(group, ["--version"])
    assert res.exit_code == 0 and "version 0." in res.output, res.output
    for name in group.list_commands(click.Context(group)):  # every command, one level down
        command = group.get_command(click.Context(group), name)
        assert command is not None
        # invoked on its own first (as other tests do): click keeps the help option it built
        assert runner.invoke(command, ["--help"]).exit_code == 0
        res = runner.invoke(group, [name, "-h"])
        assert res.exit_code == 0 and res.output.startswith("Usage: "), (name, res.output)
