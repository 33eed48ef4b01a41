"""The cycle schedule of a normalised experiment: which stage runs in which cycle, with how many steps.

Without a `schedule` every stage runs in every cycle with its own `steps` (full → lora × cycles).
"""

from __future__ import annotations

from typing import Any, Iterator


def resolved_schedule(experiment: dict[str, Any]) -> dict[str, Any] | None:
    """The schedule as a dict (a name is looked up in `schedules`), or None for "every stage, every cycle"."""
    schedule = experiment.get("schedule")
    if isinstance(schedule, str):
        return experiment.get("schedules", {}).get(schedule)
    return schedule


def stage_for_cycle(experiment: dict[str, Any], index: int, cycle: int) -> dict[str, Any] | None:
    """The stage at `index` as it runs in `cycle` (steps resolved), or None when the schedule skips it."""
    stage = experiment["stages"][index]
    schedule = resolved_schedule(experiment)
    if schedule is None:
        return stage
    names = schedule.get("first") if cycle == 0 and schedule.get("first") else schedule.get("each")
    if names is not None and stage["name"] not in names:
        return None
    per_cycle = (schedule.get("steps") or {}).get(stage["name"])
    if per_cycle:
        return {**stage, "steps": per_cycle[min(cycle, len(per_cycle) - 1)]}
    return stage


def plan(experiment: dict[str, Any]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(cycle, stage index, stage) for every stage the experiment will run, in order."""
    for cycle in range(experiment["cycles"]):
        for index in range(len(experiment["stages"])):
            stage = stage_for_cycle(experiment, index, cycle)
            if stage is not None:
                yield cycle, index, stage


def planned_steps(experiment: dict[str, Any]) -> int:
    return sum(stage["steps"] for _, _, stage in plan(experiment))


def describe(experiment: dict[str, Any]) -> str:
    """`full(40) → lora(60) | lora(60)`: one group per cycle."""
    cycles: dict[int, list[str]] = {}
    for cycle, _, stage in plan(experiment):
        cycles.setdefault(cycle, []).append(f"{stage['name']}({stage['steps']})")
    return " | ".join(" → ".join(names) for names in cycles.values())


def schedule_problems(experiment: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(location, message) for schedule names that point nowhere; empty when the schedule is sound."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    stage_names = [s["name"] for s in experiment["stages"]]
    named = experiment.get("schedules") or {}
    schedule = experiment.get("schedule")
    if isinstance(schedule, str) and schedule not in named:
        problems.append((("schedule",), f"no schedule named {schedule!r} (schedules: {', '.join(named) or 'none'})"))
    shapes = [(("schedules", name), s) for name, s in named.items()]
    if isinstance(schedule, dict):
        shapes.append((("schedule",), schedule))
    for loc, shape in shapes:
        for key in ("first", "each"):
            for i, name in enumerate(shape.get(key) or []):
                if name not in stage_names:
                    problems.append((loc + (key, i), f"no stage named {name!r} (stages: {', '.join(stage_names)})"))
        for name in shape.get("steps") or {}:
            if name not in stage_names:
                problems.append((loc + ("steps", name), f"no stage named {name!r} (stages: {', '.join(stage_names)})"))
    return problems
