"""The CLI's one error boundary.

Bad input (InputError, DataError, ComponentError): one `error:` line per problem naming the culprit, exit 2.
Anything else: one line saying what failed and where its full traceback was saved (the sweep's `errors/`
folder when a sweep is running, else the cache's), exit 1; `--debug` prints the traceback instead. Every line is
redacted (secrets from the environment, URL passwords) and bounded, whatever the input was.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

import typer

from fluxtune.config.errors import InputError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
MAX_PROBLEMS = 20  # a file of garbage gives the first problems, not one line per garbage line
MAX_LINE = 400

debug = bool(os.environ.get("FLUXTUNE_DEBUG"))  # `fluxtune --debug` sets it too


def _echo(line: str) -> None:
    from fluxtune.redact import redact_text

    line = redact_text(line.replace("\r", " "))
    typer.echo(line if len(line) <= MAX_LINE else line[:MAX_LINE - 1] + "…", err=True)


def _problem_lines(lines: list[str], snippets: list[str] | None = None) -> None:
    for i, line in enumerate(lines[:MAX_PROBLEMS]):
        _echo(line)
        if snippets and snippets[i]:
            _echo(f"    {snippets[i].strip()[:200]}")
    if len(lines) > MAX_PROBLEMS:
        _echo(f"error: … and {len(lines) - MAX_PROBLEMS} more problems")


def report_input_error(exc: BaseException, show_snippets: bool = False, prefix: str = "error") -> int:
    """Print a bad-input error, one line per problem (`prefix: …`); returns exit code 2."""
    from fluxtune.data.rows import DataError

    if isinstance(exc, InputError):
        _problem_lines([f"{prefix}: {p.one_line()}" for p in exc.problems],
                       [p.snippet for p in exc.problems] if show_snippets else None)
    elif isinstance(exc, DataError):
        _problem_lines([f"{prefix}: {exc.summary}", *(f"  {p}" for p in exc.problems[1:])])
    else:
        _echo(f"{prefix}: {exc}")
    return EXIT_BAD_INPUT


def report_usage_error(message: str, command: str) -> int:
    """A command line that does not parse: one line, and where the help is."""
    first = " ".join(message.split())
    _echo(f"error: {first} (see `{command} --help`)")
    return EXIT_BAD_INPUT


def input_error_types() -> tuple[type[BaseException], ...]:
    from fluxtune.components import ComponentError
    from fluxtune.data.rows import DataError

    return InputError, DataError, ComponentError


def _innermost_fluxtune_frame(exc: BaseException) -> str:
    """`fluxtune/config/load.py:42` of the innermost frame in fluxtune or a plugin, else the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    ours = [f for f in frames if "/fluxtune/" in f.filename and "/site-packages/" not in f.filename]
    frame = (ours or frames)[-1]
    parts = frame.filename.split("/")
    short = "/".join(parts[parts.index("fluxtune"):]) if "fluxtune" in parts else parts[-1]
    return f" at {short}:{frame.lineno}"


def report_unexpected(exc: BaseException, command: str) -> int:
    """One line naming what failed and the file holding its traceback (or the traceback itself with --debug)."""
    from fluxtune.failures import exception_line, keep_traceback

    if debug:
        from fluxtune.redact import redact_text

        sys.stderr.write(redact_text("".join(traceback.format_exception(exc))))
        return EXIT_FAILED
    kept = keep_traceback(exc, command.replace(" ", "-") or "fluxtune")
    where = f"full traceback: {kept}" if kept else "the traceback could not be saved; run with --debug to see it"
    _echo(f"error: fluxtune {command} failed{_innermost_fluxtune_frame(exc)}: {exception_line(exc)} ({where})")
    return EXIT_FAILED


def handle(exc: BaseException, command: str, show_snippets: bool = False) -> int:
    """The exit code for an exception that reached the top of a command, after printing its one line."""
    if isinstance(exc, KeyboardInterrupt):
        _echo("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, input_error_types()):
        return report_input_error(exc, show_snippets)
    return report_unexpected(exc, command)


@contextmanager
def error_boundary(show_snippets: bool = False) -> Iterator[None]:
    """Inside a command: input errors end it with their lines and exit 2; Ctrl-C with 130. Anything else
    goes up to `fluxtune.cli.main.main`, which saves its traceback."""
    try:
        yield
    except input_error_types() as exc:
        raise typer.Exit(report_input_error(exc, show_snippets)) from None
    except KeyboardInterrupt:
        _echo("interrupted")
        sys.exit(EXIT_INTERRUPTED)
