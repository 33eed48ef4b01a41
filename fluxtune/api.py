"""The contract between fluxtune and its plugins (built-in ones included).

Only typing lives here so that importing it stays cheap: hook implementations run in the driver and in
every Ray worker. The concrete `StageContext` is built in `fluxtune.context` inside the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base class for a component's parameters: closed, so a misspelt key fails validation."""

    model_config = ConfigDict(extra="forbid")


class ComponentSpec(BaseModel):
    """`{type: name, ...params}` naming a registered component of `kind`.

    Use the subclasses as fields of a `Params` model (e.g. `adapter: AdapterSpec`); fluxtune then checks the
    name against the component table and the params against that component's own model at validation time.
    """

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[str] = ""
    type: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AdapterSpec(ComponentSpec):
    kind: ClassVar[str] = "adapter"


class LossSpec(ComponentSpec):
    kind: ClassVar[str] = "loss"


class TimestepSamplerSpec(ComponentSpec):
    kind: ClassVar[str] = "timestep_sampler"


class CallbackSpec(ComponentSpec):
    kind: ClassVar[str] = "callback"


class Loss(Protocol):
    """`loss(pred, target, batch) -> scalar tensor`; `batch` carries e.g. the packed mask for region weighting."""

    def __call__(self, pred: Any, target: Any, batch: dict[str, Any]) -> Any: ...


class TimestepSampler(Protocol):
    """`sample(n, generator, image_seq_len) -> tensor[n]` of flow-matching times in [0, 1]."""

    def __call__(self, n: int, generator: Any, image_seq_len: int) -> Any: ...


@runtime_checkable
class Adapter(Protocol):
    """A parameter-efficient adapter attached to the frozen transformer for a stage."""

    def attach(self, transformer: Any) -> list[Any]:
        """Add the adapter layers and return the parameters to train (the base stays frozen)."""

    def export(self, transformer: Any, out_dir: Path) -> None:
        """Write the trained adapter in the formats people load it with."""

    def merge(self, transformer: Any) -> Any:
        """Fold the adapter into the base weights and return the plain transformer, all params trainable."""


class Callback(Protocol):
    """Runtime events of a stage; implement any subset (a missing method is simply not called).

    - `on_stage_start(ctx)`: before the stage's first step.
    - `on_step_end(ctx, step, metrics)`: after each logged step (`step` counts from 0 within the stage; metric
      values may be tensors: converting one to float syncs the device, so do it every N steps, not every step).
    - `on_stage_end(ctx, metrics) -> dict | None`: after the stage's final evaluation; returned numbers are added
      to the stage's reported metrics.
    Raising stops the trial with that error. One instance serves every stage and cycle of a trial (per worker).
    """

    def on_stage_start(self, ctx: "StageContext") -> None: ...
    def on_step_end(self, ctx: "StageContext", step: int, metrics: dict[str, Any]) -> None: ...
    def on_stage_end(self, ctx: "StageContext", metrics: dict[str, float]) -> dict[str, float] | None: ...


class StageContext(Protocol):
    """Everything a stage needs, so a third-party stage never imports fluxtune internals.

    - `name`, `cycle`, `steps`: which stage this is and how many optimisation steps it runs.
    - `transformer`: the live (unwrapped) FluxTransformer2DModel; a stage may replace it (e.g. after merging).
    - `device`, `rank`, `world_size`: the worker's place in the group.
    - `batches(skip=0)`: an endless iterator of training batches (dicts of tensors on `device`), the same every
      time the stage runs; `skip` starts at that batch (mid-stage resume) without reading the skipped ones.
    - `training_loss(model, batch, generator)`: the flow-matching loss of one batch (noise, timesteps, loss plugin).
    - `optimizer(params, lr, weight_decay=0, betas=(0.9, 0.999), eps=1e-8)`: the optimizer (AdamW) for them.
    - `distribute(module)`: wrap for data-parallel training across the group (identity for one worker).
    - `adapter(spec)`: instantiate a registered adapter from its YAML spec.
    - `log(step, metrics)`: per-step metrics (buffered, tensors welcome: no device sync per step); also
      reaches the `on_step_end` of the experiment's callbacks.
    - `maybe_evaluate(step)`: at eval points, the deterministic validation of `transformer`, reported to the
      search scheduler; `step` counts this stage's optimizer updates from 1 (as in `log`), and the stage's last
      step is left to the stage-end evaluation. `evaluate()` runs it now.
    - `export_dir`: a folder whose content is saved with the stage checkpoint and logged as artifacts
      (the checkpoint itself, the transformer as safetensors, is written by fluxtune at the stage end).
    """

    name: str
    cycle: int
    steps: int
    transformer: Any
    device: Any
    rank: int
    world_size: int
    export_dir: Path

    def batches(self, skip: int = 0) -> Iterator[dict[str, Any]]: ...
    def training_loss(self, model: Any, batch: dict[str, Any], generator: Any = None) -> Any: ...
    def optimizer(self, params: Any, lr: float, weight_decay: float = 0.0, betas: Any = (0.9, 0.999),
                  eps: float = 1e-8) -> Any: ...
    def distribute(self, module: Any) -> Any: ...
    def adapter(self, spec: dict[str, Any]) -> Adapter: ...
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def maybe_evaluate(self, step: int) -> dict[str, float] | None: ...
    def evaluate(self) -> dict[str, float]: ...


class Stage(Protocol):
    """A training stage: `run(ctx)` trains `ctx.transformer` for `ctx.steps` steps and returns final metrics."""

    def run(self, ctx: StageContext) -> dict[str, float]: ...


Factory = Callable[[Params], Any]
