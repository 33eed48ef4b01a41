"""A trial's configuration, resolved once: its sampled values applied to the base experiment and validated, with
what the driver and the trial derive from it (the stages it runs, its planned steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

from fluxtune.components import Components
from fluxtune.config.frozen import freeze, thaw
from fluxtune.config.load import sample_experiment
from fluxtune.config.schedule import describe, plan


class ScheduledStage(NamedTuple):
    """One stage as it runs in one cycle (its steps as the schedule sets them for that cycle)."""

    cycle: int
    index: int  # in the experiment's `stages`
    stage: Mapping[str, Any]


@dataclass(frozen=True)
class ResolvedTrial:
    """What one sampled configuration makes. The experiment is the normalised tree (every component's params with
    defaults filled; `stages` a list of mappings) that stages, plugins and MLflow read, kept read-only because
    every caller shares it; `experiment_dict()` gives a changeable copy."""

    values: Mapping[str, Any]  # the sampled values by dotted path, in search-file order (the run name is made of them)
    experiment: Mapping[str, Any]
    schedule: tuple[ScheduledStage, ...]  # every stage the trial runs, in order

    @property
    def planned_steps(self) -> int:
        return sum(scheduled.stage["steps"] for scheduled in self.schedule)

    @property
    def description(self) -> str:
        """`full(40) → lora(60) | lora(60)`: the stages of each cycle."""
        return describe(self.experiment)

    def experiment_dict(self) -> dict[str, Any]:
        return thaw(self.experiment)


def resolve_trial(base: Mapping[str, Any], values: Mapping[str, Any], components: Components) -> ResolvedTrial:
    """The trial that sampled `values` (dotted path → value) from the search over `base` (the normalised base
    experiment). Raises InputError when the values make an invalid experiment, each problem naming the sampled
    value that caused it."""
    experiment = freeze(sample_experiment(dict(base), dict(values), components))
    schedule = tuple(ScheduledStage(cycle, index, freeze(stage)) for cycle, index, stage in plan(experiment))
    return ResolvedTrial(values=freeze(dict(values)), experiment=experiment, schedule=schedule)


__all__ = ["ResolvedTrial", "ScheduledStage", "resolve_trial"]
