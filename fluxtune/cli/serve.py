"""Running a local web server in the foreground of a command (`fluxtune ui`, `fluxtune dashboard`): a taken port
is one line and exit 2, the URL is printed only for the server this command started and that answers, and
Ctrl-C, SIGTERM and SIGHUP (a closed terminal) all stop it."""

from __future__ import annotations

import signal
import subprocess
from typing import Callable

import typer

from fluxtune.cli.console import console

EXIT_INPUT = 2


class _Signalled(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C so the server is stopped on the way out."""


def _raise(signum: int, frame: object) -> None:
    raise _Signalled(signum)


def serve(what: str, start: Callable[[], tuple[subprocess.Popen, str]], port: int, host: str,
          ready_lines: Callable[[str], list[str]], starting: str = "") -> None:
    """Print `starting`, start with `start()`, print `ready_lines(url)`, wait until a signal or the server's own
    end, stop it."""
    from fluxtune.serving import PortInUse, port_in_use, stop

    if port_in_use(port, host):  # before anything starts: the usual case, and the clearest message
        _port_taken(port, host)
    if starting:
        typer.echo(starting)
    before = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP)}
    process = None
    try:
        try:
            process, url = start()
        except PortInUse:  # taken between the check and the server's bind
            _port_taken(port, host)
        except RuntimeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        for line in ready_lines(url):
            console.print(line, highlight=False)
        code = process.wait()
        typer.echo(f"error: {what} stopped by itself (exit code {code})", err=True)
        raise typer.Exit(1)
    except (KeyboardInterrupt, _Signalled):
        pass
    finally:
        if process is not None:
            stop(process)
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _port_taken(port: int, host: str) -> None:
    typer.echo(f"error: port {port} on {host} is already in use (another server?): choose another with --port",
               err=True)
    raise typer.Exit(EXIT_INPUT)
