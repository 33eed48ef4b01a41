"""The function each Ray Train worker runs for a trial: set up once, then every stage of every cycle."""

from __future__ import annotations

import os
from typing import Any

import ray.train

from fluxtune.plugins import use_plugin_set
from fluxtune.train.protocol import RESUMED_FROM_KEY
from fluxtune.train.reporter import RayReporter

# torch, diffusers and the data path are imported inside the functions: Tune's trial actor and Train's controller
# import this module only to find `train_loop_per_worker` (seconds of start-up per trial otherwise).



class MarkedReporter(RayReporter):
    """Every report also carries `marks` (where this attempt resumed), so Tune's last result and MLflow show it."""

    marks: dict[str, Any] = {}

    def evaluation(self, global_step: int, metrics: dict[str, float]) -> None:
        super().evaluation(global_step, {**metrics, **self.marks})

    def stage_end(self, global_step: int, metrics: dict[str, Any], checkpoint_dir: Any) -> None:
        super().stage_end(global_step, {**metrics, **self.marks}, checkpoint_dir)


def _resume(transformer: Any, initial: str | None = None) -> tuple[Any, Any, bool]:
    """The latest stage checkpoint of this trial's run, if a previous attempt left one; True when it did."""
    # This run's own checkpoint (a restart: a retried worker group or a resumed sweep) first, else a reused
    # identical stage prefix (stage reuse). Each is used only when complete and its weights hash as written.
    from fluxtune.checkpoints import Progress, usable_checkpoint

    own = ray.train.get_checkpoint()
    for checkpoint, restarted in ((own, True), (ray.train.Checkpoint(initial) if initial else None, False)):
        if checkpoint is None:
            continue
        from diffusers import FluxTransformer2DModel

        with checkpoint.as_directory() as folder:
            manifest = usable_checkpoint(folder)  # incomplete, pruned or corrupted: never resume from it
            if manifest is None:
                continue
            progress = Progress(manifest["cycle"], manifest["stage_index"], manifest["global_step"])
            resumed = FluxTransformer2DModel.from_pretrained(os.path.join(folder, "transformer"))
        _check_room_for_a_checkpoint(resumed)
        return progress, resumed.to(transformer.device).train(), restarted
    _check_room_for_a_checkpoint(transformer)
    return Progress(), transformer, False


def _check_room_for_a_checkpoint(transformer: Any) -> None:
    """A store that cannot take one more stage checkpoint fails the attempt now, not after a stage of training
    (a retried attempt on a full disk then ends in seconds, with the same line)."""
    from fluxtune.checkpoints import check_room, state_bytes
    from fluxtune.train.reporter import run_folder

    try:
        rank = ray.train.get_context().get_world_rank()
    except Exception:  # outside a Train run (tests): nothing to write into
        return
    if rank == 0:  # rank 0 writes the checkpoints
        check_room(run_folder(), state_bytes(transformer))


def _load_data(experiment: dict[str, Any], config: dict[str, Any], rank: int, world_size: int) -> tuple[Any, Any]:
    """This worker's training stream and the bounded validation examples, read from the latent cache the driver
    prepared (its folder or URI in `config`)."""
    from fluxtune.train.datasets import trial_data

    return trial_data(config["data_source"], experiment, rank, world_size, reader=config.get("data_reader", "stream"))


def _load_model_and_data(experiment: dict[str, Any], config: dict[str, Any], rank: int, world_size: int,
                         device: Any) -> tuple[Any, Any, Any]:
    """The transformer, in its first stage's dtype on `device` (no VAE, no text encoders: the latent cache holds
    their work), and this worker's data."""
    from fluxtune.components import loaded_components
    from fluxtune.cycle import initial_weights_dtype
    from fluxtune.worker_setup import load_transformer

    train, val = _load_data(experiment, config, rank, world_size)
    dtype = initial_weights_dtype(experiment, loaded_components(), device.type)
    return load_transformer(experiment["model"], dtype, device), train, val


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train.torch
    import torch

    from fluxtune.components import loaded_components
    from fluxtune.cycle import run_cycle
    from fluxtune.flux.model import use_reliable_attention
    from fluxtune.flux.preview import ValidationPreview
    from fluxtune.train.stops import StopCheck, TrialStopped
    from fluxtune.worker_setup import build_worker_setup, model_weights_folder

    use_plugin_set(config["plugins"])  # exactly the driver's plugins, whatever this node's environment says
    experiment = config["experiment"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    use_reliable_attention(device)
    torch.manual_seed(experiment["seed"])

    transformer, train, val = _load_model_and_data(experiment, config, rank, world_size, device)
    reporter = MarkedReporter(rank, StopCheck(config.get("sweep_id"), config.get("trial_id"), rank, world_size))
    setup = build_worker_setup(experiment, train, val, reporter, loaded_components(), device, rank, world_size)
    if rank == 0:  # at evaluations: a sample grid for MLflow and masked_psnr/masked_ssim, from one sampling
        setup.preview = ValidationPreview.for_worker(experiment["model"], setup.val, reporter.attach_sample)
    progress, transformer, restarted = _resume(transformer.to(device), config.get("initial_checkpoint"))
    if restarted:
        reporter.marks = {RESUMED_FROM_KEY: progress.global_step}
    elif rank == 0:  # the starting weights (step 0: where MLflow's image slider opens; or a reused stage's end)
        setup.preview(transformer, step=progress.global_step)
    try:
        # A resumed transformer is fp32 (exact in itself); one read in bf16 keeps its exact values in its folder.
        run_cycle(experiment, transformer, setup, progress, weights_folder=model_weights_folder(experiment["model"]))
    except TrialStopped:
        return  # Tune stopped this trial (ASHA): end the run so its workers free their CPUs now
