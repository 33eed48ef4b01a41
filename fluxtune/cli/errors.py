"""The CLI's one error boundary: bad input → one line per problem on stderr, exit code 2."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import typer

from fluxtune.config.errors import InputError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


@contextmanager
def error_boundary(show_snippets: bool = False) -> Iterator[None]:
    from fluxtune.data.rows import DataError
    from fluxtune.registry import RegistryError

    try:
        yield
    except InputError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem.one_line()}", err=True)
            if show_snippets and problem.snippet:
                typer.echo(f"    {problem.snippet}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except DataError as exc:
        typer.echo(f"error: {exc.summary}", err=True)
        for problem in exc.problems[1:]:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
