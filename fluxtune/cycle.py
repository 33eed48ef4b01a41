"""run_cycle: the stage schedule (cycles × stages), in one process and free of Ray.

Ray Train runs this same function in each worker of a trial; tests run it directly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fluxtune.callbacks import CallbackList
from fluxtune.checkpoints import Progress, write_stage_checkpoint
from fluxtune.config.schedule import stage_for_cycle
from fluxtune.context import RunContext, Shared, evaluate
from fluxtune.failures import FailureSite, StepMark, configured_entries, failure_site


def stage_params(stage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k not in ("name", "type", "steps")}


def run_cycle(experiment: dict[str, Any], transformer: Any, shared: Shared,
              progress: Progress = Progress(), checkpoint_root: Path | None = None) -> Any:
    """Train `transformer` through the experiment's schedule, starting at `progress`; returns the final model.

    At each stage end: evaluate, write a stage checkpoint (rank 0), report it. A stage's transition time is
    measured from the previous stage's last step to this stage's first step.
    """
    stages = experiment["stages"]
    last_step_done_at: float | None = None
    callbacks = CallbackList.build(experiment.get("callbacks", []), shared.registry)
    step_mark = StepMark()  # the last step logged: an error names the step it interrupted
    callbacks = CallbackList([*callbacks.callbacks, step_mark])
    for cycle in range(progress.cycle, experiment["cycles"]):
        for index, spec in enumerate(stages):
            spec = stage_for_cycle(experiment, index, cycle)  # the schedule may skip it or change its steps
            if spec is None or (cycle, index) < (progress.cycle, progress.stage_index):
                continue
            site = FailureSite(spec["name"], cycle, step=progress.global_step)
            entries = configured_entries(experiment, spec, shared.registry)
            with failure_site(site, entries, step_mark), tempfile.TemporaryDirectory(dir=checkpoint_root) as scratch:
                stage = shared.registry.get("stage", spec["type"]).build(stage_params(spec))
                scratch = Path(scratch)
                ctx = RunContext(
                    shared=shared, name=spec["name"], cycle=cycle, steps=spec["steps"], transformer=transformer,
                    export_dir=scratch / "exports", first_global_step=progress.global_step,
                    stream_seed=_stream_seed(shared, cycle, index), callbacks=callbacks,
                )
                ctx.export_dir.mkdir()
                callbacks.stage_start(ctx)
                site.phase = "training"
                metrics = stage.run(ctx) or {}
                site.phase = "stage end"
                transformer = ctx.transformer
                metrics.update(evaluate(transformer, shared, stage_end=True))
                metrics.update(callbacks.stage_end(ctx, metrics))
                if last_step_done_at is not None and ctx.first_step_at is not None:
                    metrics["transition_s"] = ctx.first_step_at - last_step_done_at
                progress = progress.after(index, len(stages), spec["steps"])
                checkpoint = None
                if shared.rank == 0:
                    checkpoint = write_stage_checkpoint(scratch / "checkpoint", transformer, progress, spec["name"],
                                                        ctx.export_dir, metrics)
                named = {f"{spec['name']}/cycle{cycle}/{k}": v for k, v in metrics.items()}
                shared.reporter.stage_end(progress.global_step, {**metrics, **named, "cycle": cycle,
                                                                 "stage": spec["name"]}, checkpoint)
                last_step_done_at = ctx.last_step_at
    return transformer


def _stream_seed(shared: Shared, cycle: int, index: int) -> int:
    # Each (rank, cycle, stage) draws its own batches and noise, reproducibly across restarts.
    return shared.seed * 1_000_003 + shared.rank * 10_007 + cycle * 101 + index
