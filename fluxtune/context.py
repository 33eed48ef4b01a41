"""The concrete StageContext handed to stage plugins (see `fluxtune.api.StageContext` for the contract)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from fluxtune.callbacks import CallbackList
from fluxtune.flux.encoded import BucketedSet, EncodedSet, ValidationSet, random_batches
from fluxtune.flux.flow import flow_matching_loss


class Reporter(Protocol):
    """Where a running cycle sends what it measures (Ray/Tune/MLflow in a trial; a list in tests)."""

    def log(self, global_step: int, metrics: dict[str, Any]) -> None: ...
    def evaluation(self, global_step: int, metrics: dict[str, float]) -> None: ...
    def stage_end(self, global_step: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


@dataclass
class WorkerSetup:
    """What every stage of a trial shares on one worker, built once: data, loss, timesteps, reporter, the
    component table, device and rank."""

    train: Any  # a TrainingStream (trials: streamed from the latent cache) or an EncodedSet/BucketedSet (in memory)
    val: ValidationSet
    batch_size: int
    guidance: float
    loss_fn: Any
    timesteps: Any
    reporter: Reporter
    components: Any
    device: torch.device
    rank: int = 0
    world_size: int = 1
    eval_every: int = 20
    sample_every: int = 1  # evaluations between validation previews (first evaluation and stage ends: always)
    seed: int = 0
    evaluations: int = 0  # how many this worker has run (the sample-grid cadence counts them)
    preview: Any = None  # rank 0: inpaints a few validation examples: grid + masked scores (fluxtune.flux.preview)


@dataclass
class RunContext:
    setup: WorkerSetup
    name: str
    cycle: int
    steps: int
    transformer: Any
    export_dir: Path
    first_global_step: int
    stream_seed: int
    callbacks: CallbackList = field(default_factory=CallbackList)  # base.callbacks; step_end from log()
    # The canonical fp32 weights the stage starts from (fluxtune.canonical); None: the live module, fp32.
    weights: Any = None
    # Set by a stage whose result is not simply its live fp32 module (a DeepSpeed engine's masters, a LoRA delta
    # merged into a bf16 base): where the stage checkpoint reads the trained fp32 weights from.
    trained_weights: Any = None
    first_step_at: float | None = field(default=None, init=False)  # stage transition timing
    last_step_at: float | None = field(default=None, init=False)
    _generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator(device="cpu").manual_seed(self.stream_seed)

    @property
    def shared(self) -> WorkerSetup:
        return self.setup  # the name before `setup`, kept for one release: stage plugins may read it

    # -- where we are
    @property
    def device(self) -> torch.device:
        return self.setup.device

    @property
    def rank(self) -> int:
        return self.setup.rank

    @property
    def world_size(self) -> int:
        return self.setup.world_size

    # -- data and loss
    def batches(self, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This stage's endless batches on `device`, from batch `skip` on: the same ones every time the stage
        runs (a restarted stage replays them; `skip` resumes one mid-stage without reading what it skips)."""
        train = self.setup.train
        if isinstance(train, (EncodedSet, BucketedSet)):  # held in memory: tests and benchmarks
            batches = random_batches(train, self.setup.batch_size, self._generator)
            for _ in range(skip):
                next(batches)
            return batches
        return train.batches(self.setup.batch_size, self._data_seed(), skip)

    def _data_seed(self) -> int:
        # The same on every rank (the ranks of a stage share one permutation of the units and take disjoint
        # shares of it), different for every stage of every cycle and every experiment seed.
        text = f"{self.setup.seed}\0{self.cycle}\0{self.name}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")

    def training_loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        generator = generator or self._generator
        x0 = batch["x0"]
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = self.setup.timesteps(x0.shape[0], generator, x0.shape[1]).to(x0.device)
        return flow_matching_loss(model, batch, noise, t, self.setup.guidance, self.setup.loss_fn)

    # -- optimisation helpers
    def optimizer(self, params: Any, type: str = "adamw", **settings: Any):
        """A registered optimizer over `params`, e.g. `ctx.optimizer(params, lr=1e-4)` (AdamW) or
        `ctx.optimizer(params, type="prodigy")`; settings are validated by that optimizer's params model."""
        return self.build_optimizer(params, {"type": type, **settings})

    def build_optimizer(self, params: Any, spec: dict[str, Any], device: torch.device | None = None,
                        sharded: bool = False):
        """`device`: where its states live (default the worker's); `sharded`: each rank steps a ZeRO slice."""
        make = self.setup.components.get("optimizer", spec.get("type", "adamw")).build(spec)
        return make(params, device=device or self.device, sharded=sharded)

    def distribute(self, module: Any) -> Any:
        if self.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def adapter(self, spec: Any) -> Any:
        if hasattr(spec, "model_dump"):
            spec = {"type": spec.type, **spec.params()}
        return self.setup.components.get("adapter", spec["type"]).build(spec)

    # -- reporting
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.last_step_at = time.perf_counter()
        step = self.first_global_step + step
        prefixed = {f"{self.name}/cycle{self.cycle}/{k}": v for k, v in metrics.items()}
        self.setup.reporter.log(step, {**metrics, **prefixed})
        self.callbacks.step_end(self, step - self.first_global_step, metrics)

    def maybe_evaluate(self, step: int, model: Any = None) -> dict[str, float] | None:
        """At eval points, score `model` (default the live transformer; a stage whose weights live in an engine
        passes a view of them) and report it."""
        if step == self.steps or (self.first_global_step + step) % self.setup.eval_every:
            return None  # the stage end is evaluated by the cycle
        metrics = evaluate(self.transformer if model is None else model, self.setup)
        self.setup.reporter.evaluation(self.first_global_step + step, metrics)
        return metrics

    def evaluate(self, model: Any = None) -> dict[str, float]:
        """Evaluate now (e.g. an adapter's own score before merging it); counts as a stage-end evaluation."""
        return evaluate(self.transformer if model is None else model, self.setup, stage_end=True)


def _mse(pred: torch.Tensor, target: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).mean()


@torch.no_grad()
def evaluate(transformer: Any, setup: WorkerSetup, stage_end: bool = False) -> dict[str, float]:
    """Deterministic validation loss: fixed noise and t per held-out example, dropout off.

    Always plain MSE on the velocity, whatever the training loss, so trials with different losses compare.
    The validation preview (sample grid and masked scores; sampling: far dearer than the loss) runs at the first evaluation,
    every `sample_every`-th one and at stage ends.
    """
    with_samples = stage_end or setup.evaluations % setup.sample_every == 0
    setup.evaluations += 1
    val = setup.val
    was_training = transformer.training
    transformer.eval()
    total, count = 0.0, 0
    # bf16 weights (a DeepSpeed module, a LoRA stage's base) take fp32 inputs under bf16 autocast, as in training.
    bf16 = any(p.dtype == torch.bfloat16 for p in transformer.parameters())
    with torch.autocast(device_type=setup.device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch, noise, t in val.batches(setup.batch_size):  # one image size per batch (aspect-ratio buckets)
            loss = flow_matching_loss(transformer, batch, noise, t, setup.guidance, _mse)
            total += float(loss) * len(t)
            count += len(t)
        transformer.train(was_training)
        metrics = {"val_loss": total / max(count, 1)}
        if setup.preview is not None and with_samples:  # its grid rides to MLflow with the next report
            metrics.update(setup.preview(transformer))
    return metrics
