"""run_cycle: the stage schedule (cycles × stages), in one process and free of Ray.

Ray Train runs this same function in each worker of a trial; tests run it directly. Between stages the
`Handoff` passes the transformer on in the dtype the next stage trains it in, while its canonical fp32 weights
stay exact (see `fluxtune.canonical`): each stage checkpoint, written from them, is that copy.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fluxtune.callbacks import CallbackList
from fluxtune.canonical import (DTYPES, FP32, LiveWeights, SavedWeights, Weights, assign, cast,
                                save_weights_folder, shapes, weights_dtype)
from fluxtune.checkpoints import Progress, write_stage_checkpoint
from fluxtune.config.schedule import stage_for_cycle
from fluxtune.context import RunContext, WorkerSetup, evaluate
from fluxtune.failures import FailureSite, StepMark, configured_entries, failure_site
from fluxtune.train.protocol import CYCLE_KEY, STAGE_KEY


def stage_params(stage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k not in ("name", "type", "steps")}


def stage_dtype(stage: Any, device_type: str) -> torch.dtype:
    """The dtype a stage wants the transformer's weights in: what it declares, else fp32 (plugin stages train
    the module as they get it)."""
    declared = getattr(stage, "weights_dtype", None)
    return DTYPES[declared(device_type)] if declared is not None else FP32


def initial_weights_dtype(experiment: dict[str, Any], components: Any, device_type: str) -> torch.dtype:
    """The dtype of the first stage of the schedule: load the model in it (no fp32 copy to round later)."""
    for index in range(len(experiment["stages"])):
        spec = stage_for_cycle(experiment, index, 0)
        if spec is not None:
            return stage_dtype(components.get("stage", spec["type"]).build(stage_params(spec)), device_type)
    return FP32


class Handoff:
    """Where the canonical fp32 weights are between stages, and the live module made from them.

    Rank 0 holds the folder (the last stage checkpoint's transformer, a copy of the starting weights, or the
    model's own folder); the others receive its tensors by broadcast. A folder is kept until the next stage's
    checkpoint is written, because a stage may read it up to its end (a LoRA merge).
    """

    def __init__(self, setup: WorkerSetup, module: Any, scratch_root: Path | None, folder: Path | None = None):
        self.setup, self.scratch_root = setup, scratch_root
        # A folder matters only for a bf16 module; an fp32 one (a resumed checkpoint, say) is itself exact.
        usable = folder is not None and weights_dtype(module) != FP32
        self.folder = Path(folder) if usable and setup.rank == 0 else None
        self.saved = usable  # the same on every rank
        self._scratches: list[Path] = []

    def weights(self, module: Any) -> Weights:
        if not self.saved or weights_dtype(module) == FP32:
            return LiveWeights(module)
        s = self.setup
        return SavedWeights(self.folder, shapes(module), s.device, s.rank, s.world_size)

    def prepare(self, module: Any, dtype: torch.dtype) -> Any:
        """`module` in `dtype`, holding the canonical values rounded to it."""
        current = weights_dtype(module)
        if current == dtype:
            return module
        if current == FP32:  # exact values about to be rounded: keep them on disk first
            if not self.saved:
                self._save_live(module)
            return cast(module, dtype)
        if self.saved:  # back to fp32: the exact values come from the canonical copy, not from bf16
            assign(module, self.weights(module), FP32)
            return module
        return cast(module, dtype)  # a bf16 module with no other copy: its bf16 values are the canonical ones

    def scratch(self) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self.scratch_root))
        self._scratches.append(folder)
        return folder

    def _save_live(self, module: Any) -> None:
        if self.setup.rank == 0:
            self.folder = self.scratch() / "transformer"
            save_weights_folder(self.folder, module, LiveWeights(module).tensors())
        self.saved = True

    def write(self, scratch: Path, trained: Weights, module: Any, progress: Progress, stage: str,
              export_dir: Path, metrics: dict[str, float]) -> Path | None:
        """The stage checkpoint from the trained canonical weights (rank 0 writes; reading them is a collective
        every rank takes part in); it becomes the canonical copy and older folders go."""
        checkpoint = None
        if self.setup.rank == 0:
            checkpoint = write_stage_checkpoint(scratch / "checkpoint", module, progress, stage, export_dir,
                                                metrics, weights=trained.tensors())
        else:
            for _ in trained.tensors():
                pass
        trained.close()
        self.folder = checkpoint / "transformer" if checkpoint is not None else None
        self.saved = True
        for old in self._scratches[:-1]:
            shutil.rmtree(old, ignore_errors=True)
        self._scratches = self._scratches[-1:]
        return checkpoint

    def cleanup(self) -> None:
        for folder in self._scratches:
            shutil.rmtree(folder, ignore_errors=True)
        self._scratches = []


def trained_weights(ctx: RunContext, stage_type: str) -> Weights:
    """Where a finished stage's fp32 weights are: what it said, else its live module, which must be fp32."""
    if ctx.trained_weights is not None:
        return ctx.trained_weights
    if weights_dtype(ctx.transformer) != FP32:
        raise RuntimeError(f"stage {ctx.name!r} ({stage_type}) left a {weights_dtype(ctx.transformer)} transformer "
                           "without setting ctx.trained_weights: its fp32 weights would be lost")
    return LiveWeights(ctx.transformer)


def run_cycle(experiment: dict[str, Any], transformer: Any, setup: WorkerSetup,
              progress: Progress = Progress(), checkpoint_root: Path | None = None,
              weights_folder: Path | None = None) -> Any:
    """Train `transformer` through the experiment's schedule, starting at `progress`; returns the final model.

    `weights_folder`: the model folder `transformer` was loaded from, in case it was loaded in bf16 (its exact
    values then come from there). At each stage end: evaluate, write a stage checkpoint (rank 0), report it. A
    stage's transition time is measured from the previous stage's last step to this stage's first step.
    """
    stages = experiment["stages"]
    last_step_done_at: float | None = None
    callbacks = CallbackList.build(experiment.get("callbacks", []), setup.components)
    step_mark = StepMark()  # the last step logged: an error names the step it interrupted
    callbacks = CallbackList([*callbacks.callbacks, step_mark])
    handoff = Handoff(setup, transformer, checkpoint_root, weights_folder)
    try:
        for cycle in range(progress.cycle, experiment["cycles"]):
            for index, spec in enumerate(stages):
                spec = stage_for_cycle(experiment, index, cycle)  # the schedule may skip it or change its steps
                if spec is None or (cycle, index) < (progress.cycle, progress.stage_index):
                    continue
                site = FailureSite(spec["name"], cycle, step=progress.global_step)
                entries = configured_entries(experiment, spec, setup.components)
                with failure_site(site, entries, step_mark):
                    stage = setup.components.get("stage", spec["type"]).build(stage_params(spec))
                    transformer = handoff.prepare(transformer, stage_dtype(stage, setup.device.type))
                    scratch = handoff.scratch()
                    ctx = RunContext(
                        setup=setup, name=spec["name"], cycle=cycle, steps=spec["steps"], transformer=transformer,
                        export_dir=scratch / "exports", first_global_step=progress.global_step,
                        stream_seed=_stream_seed(setup, cycle, index), callbacks=callbacks,
                        weights=handoff.weights(transformer),
                    )
                    ctx.export_dir.mkdir()
                    callbacks.stage_start(ctx)
                    site.phase = "training"
                    metrics = stage.run(ctx) or {}
                    site.phase = "stage end"
                    transformer = ctx.transformer
                    trained = trained_weights(ctx, spec["type"])
                    metrics.update(evaluate(transformer, setup, stage_end=True))
                    metrics.update(callbacks.stage_end(ctx, metrics))
                    if last_step_done_at is not None and ctx.first_step_at is not None:
                        metrics["transition_s"] = ctx.first_step_at - last_step_done_at
                    progress = progress.after(index, len(stages), spec["steps"])
                    checkpoint = handoff.write(scratch, trained, transformer, progress, spec["name"],
                                               ctx.export_dir, metrics)
                    named = {f"{spec['name']}/cycle{cycle}/{k}": v for k, v in metrics.items()}
                    setup.reporter.stage_end(progress.global_step, {**metrics, **named, CYCLE_KEY: cycle,
                                                                    STAGE_KEY: spec["name"]}, checkpoint)
                    last_step_done_at = ctx.last_step_at
    finally:
        handoff.cleanup()
    return transformer


def _stream_seed(setup: WorkerSetup, cycle: int, index: int) -> int:
    # Each (rank, cycle, stage) draws its own batches and noise, reproducibly across restarts.
    return setup.seed * 1_000_003 + setup.rank * 10_007 + cycle * 101 + index
