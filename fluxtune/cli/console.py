"""The CLI's one Console, and the quiet default for the libraries under it.

Console: lines stay whole (grep, logs); into a file or a pipe it is wide, so tables keep one line per row instead
of wrapping at 80 columns. Quiet: Ray, Ray Data, MLflow and friends print INFO lines and advice meant for their
own users (database set-up, dataset plans, token auth, optional kernels, model registration, type hints); fluxtune
says what matters itself. `-v` shows them again; Ray's own logs keep everything either way.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import IO

from rich.console import Console

PIPE_WIDTH = 1000  # columns when not a terminal: a table row is never folded into several lines

# logger → the level shown by default (`-v`: everything these libraries log by default)
QUIET_LEVELS = {
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables", "Updating database tables"
    "alembic": logging.WARNING,  # the same migrations, line by line
    "ray": logging.ERROR,  # token-auth advice, Tune's notes; errors still show
    "ray.tune": logging.ERROR,
    "ray.train": logging.ERROR,
    "bitsandbytes": logging.ERROR,  # "Failed to load CPU gemm_4bit_forward from kernels-community"
    "py.warnings": logging.ERROR,
}
# Lines libraries print straight to stderr (not through logging) that say nothing a fluxtune user acts on.
QUIET_PRINTS = re.compile(r"(\x1b\[[0-9;]*m)*(\((raylet|autoscaler)[^)]*\)|Successfully registered model |"
                          r"Created version |Registered model )")
# Warnings libraries emit inside their own `catch_warnings(); simplefilter("once")` (MLflow's pyfunc type-hint
# advice), which no filter set here reaches: dropped where they are shown instead.
QUIET_WARNINGS = ("Add type hints to the `predict` method",)


def make_console(file: IO[str] | None = None, stderr: bool = False) -> Console:
    stream = file or (sys.stderr if stderr else sys.stdout)
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=file, stderr=stderr, soft_wrap=True, width=None if tty else PIPE_WIDTH)


console = make_console()


class _QuietStream:
    """stdout/stderr without the lines libraries print directly (MLflow's registration notes with print(), Ray's
    raylet warnings forwarded to the driver's stdout), which no logging level reaches."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self._dropped = False

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, bool(QUIET_PRINTS.match(text))
        if self._dropped or (dropped and text == "\n"):  # print() writes the line, then its newline
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


_OURS: dict[str, str] = {}  # environment variables quiet_libraries set (and `-v` takes back)


def _quiet_showwarning(show):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not any(text in str(message) for text in QUIET_WARNINGS):
            show(message, category, filename, lineno, file, line)

    showwarning.shown_by = show
    return showwarning


def quiet_libraries(verbose: bool = False) -> None:
    """Hide (or, `verbose`, show again) the libraries' chatter in this process and the Ray processes it starts."""
    for name, level in QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)
    # MLflow sets its logger up when imported (later, and in Ray workers): it reads this; a user's value wins.
    if not verbose and "MLFLOW_LOGGING_LEVEL" not in os.environ:
        os.environ["MLFLOW_LOGGING_LEVEL"] = _OURS["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    elif verbose and _OURS.pop("MLFLOW_LOGGING_LEVEL", None):
        os.environ.pop("MLFLOW_LOGGING_LEVEL", None)
    # Ray Data's console handler ("Starting execution of Dataset …", plans, progress-bar advice) exists once
    # ray.data is imported: fluxtune.train.cluster.quiet_ray sets it when Ray starts.
    if verbose:
        if isinstance(sys.stderr, _QuietStream):
            sys.stderr = sys.stderr.stream
        if isinstance(sys.stdout, _QuietStream):
            sys.stdout = sys.stdout.stream
        warnings.showwarning = getattr(warnings.showwarning, "shown_by", warnings.showwarning)
        warnings.filterwarnings("default", module="mlflow")
        return
    if not isinstance(sys.stderr, _QuietStream):
        sys.stderr = _QuietStream(sys.stderr)
    if not isinstance(sys.stdout, _QuietStream):
        sys.stdout = _QuietStream(sys.stdout)  # Ray's raylet warnings (its logs keep them)
    warnings.filterwarnings("ignore", module="mlflow")  # deprecation and advice meant for MLflow's own users
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # download bars in a log file
    if not hasattr(warnings.showwarning, "shown_by"):
        warnings.showwarning = _quiet_showwarning(warnings.showwarning)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
