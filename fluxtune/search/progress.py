"""What a sweep shows on the console while it runs: trials running, finished, stopped and failed, their steps, and
the best so far.

On a terminal: live bars (the sweep's trials, then one per running trial: steps done of planned, latest metric)
under a log of events (started, stage ended, finished, stopped early, failed). Into a file or a pipe: the same
events plus one line per evaluation and a status line after each trial ends, with no cursor tricks, so a log
reads top to bottom. Ray-free: the Tune callback (fluxtune.search.callbacks.ConsoleProgress) feeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxtune.search.names import column_labels, format_value


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("—" if value is None else str(value))


@dataclass
class TrialLine:
    name: str
    planned: int
    step: int = 0
    metric: float | None = None
    task: Any = None  # the live bar's task id


class SweepProgress:
    def __init__(self, console: Console, metric: str, mode: str = "min", total: int | None = None,
                 live: bool | None = None):
        self.console, self.metric, self.mode, self.total = console, metric, mode, total
        self.live = console.is_terminal if live is None else live
        self.running: dict[str, TrialLine] = {}
        self.counts = {"finished": 0, "stopped": 0, "failed": 0}
        self.best: tuple[float, str] | None = None
        self._bars: Progress | None = None
        self._sweep_task: Any = None

    # -- what the callback reports
    def started(self, trial_id: str, name: str, config: dict[str, Any], planned: int) -> None:
        line = TrialLine(name, planned)
        self.running[trial_id] = line
        labels = column_labels(config)
        sampled = ", ".join(f"{labels[k]}={format_value(v)}" for k, v in config.items())
        # the Tune trial id names its folders under runs/<sweep>/ (checkpoints, error files)
        self._event(f"[bold]{escape(name)}[/] started (trial {escape(trial_id)}, {planned} steps)"
                    f"{': ' + escape(sampled) if sampled else ''}")
        if self.live:
            bars = self._live()
            line.task = bars.add_task(name, total=planned, completed=0, metric="")
            self._refresh()

    def result(self, trial_id: str, step: int, value: float | None, where: str = "", stage_end: bool = False) -> None:
        line = self.running.get(trial_id)
        if line is None:
            return
        line.step, line.metric = step, value if value is not None else line.metric
        if value is not None and math.isfinite(value):
            self._offer_best(value, line.name)
        shown = f"{self.metric}={fmt(line.metric)}"
        if self.live:
            self._bars.update(line.task, completed=min(step, line.planned), metric=shown)
            self._refresh()
            if stage_end:
                self._event(f"  {escape(line.name)} {escape(where)} ended at step {step}: {shown}")
        else:
            end = f" ({escape(where)} ended)" if stage_end else ""
            self._event(f"  {escape(line.name)} step {step}/{line.planned}: {shown}{end}")

    def retried(self, trial_id: str, step: int, why: str) -> None:
        name = self.running[trial_id].name if trial_id in self.running else trial_id
        self._event(f"[yellow]{escape(name)} retried[/] from step {step} after a worker failure ({escape(why)})")

    def ended(self, trial_id: str, how: str, detail: str = "", separator: str = ": ") -> None:
        """`how`: finished, stopped or failed; `detail`: the rest of its line (already escaped markup), after
        `separator`."""
        line = self.running.pop(trial_id, None)
        name = line.name if line else trial_id
        self.counts[how] += 1
        colour = {"finished": "green", "stopped": "yellow", "failed": "red"}[how]
        label = {"finished": "finished", "stopped": "stopped early", "failed": "failed"}[how]
        self._event(f"[{colour}]{escape(name)} {label}[/]{separator + detail if detail else ''}")
        if self.live:
            if line is not None and line.task is not None:
                self._bars.remove_task(line.task)
            self._refresh()
        else:
            self.console.print(self.status_line(), highlight=False)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    # -- rendering
    def status_line(self) -> str:
        done = sum(self.counts.values())
        of = f" of {self.total}" if self.total else ""
        parts = [f"{len(self.running)} running", *(f"{n} {k}" for k, n in self.counts.items())]
        best = f"; best {self.metric}={fmt(self.best[0])} ({self.best[1]})" if self.best else ""
        return f"trials{of}: {', '.join(parts)} ({done} done){best}"

    def _offer_best(self, value: float, name: str) -> None:
        better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
        if better:
            self.best = (value, name)

    def _event(self, text: str) -> None:
        (self._bars.console if self._bars is not None else self.console).print(text, highlight=False)

    def _live(self) -> Progress:
        if self._bars is None:
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                  TextColumn("{task.fields[metric]}"), TimeElapsedColumn(), console=self.console,
                                  transient=True)
            self._sweep_task = self._bars.add_task("trials", total=self.total, metric="")
            self._bars.start()
        return self._bars

    def _refresh(self) -> None:
        if self._bars is not None:
            self._bars.update(self._sweep_task, description="sweep", completed=sum(self.counts.values()),
                              metric=escape(self.status_line()))
