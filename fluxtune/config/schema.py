"""The typed, closed schema of an experiment and a search (pydantic; unknown keys fail).

Component parameters (a stage's optimizer, an adapter's rank, a loss's weights) are validated by the
component's own `Params` model from the component table, in `fluxtune.config.load`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fluxtune.api import CallbackSpec, LossSpec, TimestepSamplerSpec
from fluxtune.flux.presets import PRESET_NAMES

SCHEMA_VERSION = 1
# Names become folder names (runs/<name>, MLflow artifact folders), MLflow experiment and model names, and parts of
# dotted search paths: letters, digits, '_', '.', '-', starting with a letter or digit (no '/', no '..' path).
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
STAGE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"  # no '.': a stage name is one part of `stages.NAME.key`
ALIAS = r"^[A-Za-z0-9_-]{1,100}$"  # what MLflow accepts as an alias


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Closed):
    preset: Literal[PRESET_NAMES] | None = Field(None, description="a model built without a download: "
                                                                    + ", ".join(PRESET_NAMES))
    path: str | None = None
    seed: int = Field(0, description="initialisation seed of a preset")
    guidance: float = Field(30.0, description="guidance embedding value (FluxFillPipeline's default is 30)")
    adapter: str | None = Field(None, pattern=r"^models:/[^/@]+(@[^/@]+|/[0-9]+)$|^/",
                                description="start from a registered version: models:/NAME@ALIAS or models:/NAME/N "
                                            "(its base + adapter merged; preset/path default to its base)")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if self.adapter is not None and self.preset is None and self.path is None:
            return self  # the registered version names its base
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of 'preset' (e.g. tiny-fill) or 'path' (a FLUX.1-Fill-dev folder)")
        return self


class DataSpec(Closed):
    jsonl: str = Field("sample", description="JSONL path or URI, or 'sample' for the generated dataset")
    resolution: int = 64
    batch_size: int = Field(4, ge=1)
    val_fraction: float = Field(0.125, ge=0.0, lt=1.0)
    val_jsonl: str | None = None
    sample_size: int = Field(64, ge=4, description="rows of the generated dataset when jsonl is 'sample'")
    on_bad_rows: Literal["fail", "skip"] = Field("fail", description="skip: drop bad rows, count logged to MLflow")
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="mask grey level at or above which to inpaint")
    buckets: Literal["auto"] | list[list[int]] | None = Field(
        None, description="aspect-ratio buckets: 'auto' or [[width, height], ...] (multiples of 16, area about "
                          "resolution²); each row is cropped to the bucket nearest its aspect ratio")
    cache_dir: str | None = Field(None, description="latent cache home, a folder or a URI (s3://…); "
                                                    "default $FLUXTUNE_CACHE/latents")
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16", description="how the latent cache stores latents and prompt embeddings (read back as float32)")
    shuffle_buffer: int = Field(256, ge=0, description="rows a worker shuffles among while streaming its training "
                                                       "rows from the cache (memory: this many rows + 3 row groups)")
    val_max_rows: int = Field(64, ge=1, description="validation examples: the first N validation rows, held by every "
                                                    "worker with fixed noise")
    prompt_cache: int = Field(128, ge=1, description="distinct prompt embeddings a worker holds (least recently "
                                                     "used go; 4 MiB each at FLUX.1 size)")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v < 16 or v % 16:
            raise ValueError("must be a positive multiple of 16 (FLUX packs 8x VAE latents 2x2)")
        return v

    @field_validator("buckets")
    @classmethod
    def _buckets_fit_resolution(cls, v: Any, info: ValidationInfo) -> Any:
        from fluxtune.data.buckets import resolve_buckets

        if "resolution" in info.data:  # else resolution itself is reported
            resolve_buckets(v, info.data["resolution"])
        return v


class StageSpec(BaseModel):
    """A stage of the cycle; keys other than name/type/steps are the stage plugin's params."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=STAGE_NAME)
    type: str
    steps: int = Field(ge=1)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Schedule(Closed):
    """Which stages run in which cycle, and for how many steps (the shape of the cycle schedule).

    `first` runs in cycle 0, `each` in every later cycle (both default to every stage in order), so
    `{first: [full, lora], each: [lora]}` is "full fine-tune once, then LoRA × N". `steps` gives a stage a
    per-cycle step count (`{lora: [80, 40]}`: 80 in cycle 0, 40 after; the last value repeats).
    """

    first: list[str] | None = Field(None, min_length=1)
    each: list[str] | None = Field(None, min_length=1)
    steps: dict[str, list[Annotated[int, Field(ge=1)]]] = Field(default_factory=dict)


class Experiment(Closed):
    """One complete training run: `fluxtune run` accepts it alone, a search samples variations of it."""

    seed: int = 0
    model: ModelSpec = ModelSpec(preset="tiny-fill")
    data: DataSpec = DataSpec()
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    cycles: int = Field(1, ge=1)
    eval_every: int = Field(20, ge=1)
    sample_every: int = Field(
        1, ge=1, description="evaluations between sample-image grids and the inpainting probe (masked_psnr); both "
                             "also run at a trial's first evaluation and at every stage end")
    stages: list[StageSpec] = Field(min_length=1)
    schedule: str | Schedule | None = Field(
        None, description="the cycle schedule: inline, or the name of one of `schedules` (searchable)")
    schedules: dict[str, Schedule] = Field(default_factory=dict, description="named schedule shapes")
    loss: LossSpec = LossSpec(type="flow_matching")
    timesteps: TimestepSamplerSpec = TimestepSamplerSpec(type="logit_normal")
    callbacks: list[CallbackSpec] = Field(default_factory=list, description="runtime callbacks, in order")

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageSpec]) -> list[StageSpec]:
        seen: set[str] = set()
        for s in stages:
            if s.name in seen:
                raise ValueError(f"stage name {s.name!r} is used twice; names must be unique")
            seen.add(s.name)
        return stages



class Condition(Closed):
    """A test on one config value; every given operator must hold."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    eq: Any = None
    ne: Any = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    in_: list[Any] | None = Field(None, alias="in")

    @model_validator(mode="after")
    def _some_operator(self) -> "Condition":
        if not self.model_fields_set:
            raise ValueError("give at least one of eq, ne, gt, ge, lt, le, in")
        return self

    def holds(self, value: Any) -> bool:
        given = self.model_fields_set
        checks = {
            "eq": lambda: value == self.eq, "ne": lambda: value != self.ne,
            "gt": lambda: value is not None and value > self.gt, "ge": lambda: value is not None and value >= self.ge,
            "lt": lambda: value is not None and value < self.lt, "le": lambda: value is not None and value <= self.le,
            "in_": lambda: value in (self.in_ or []),
        }
        return all(checks[name]() for name in given)


class _Dist(Closed):
    # Define-by-run condition: sample this key only when these keys (searched earlier, or base values) pass.
    when: dict[str, Condition] = Field(default_factory=dict)

    def corners(self) -> list[Any]:
        """The extreme values a sampler can draw (every choice of a categorical): what validation tries."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


class FloatDist(_Dist):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> "FloatDist":
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntDist(_Dist):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "IntDist":
        _check_range(self.low, self.high, self.log, self.step if self.step != 1 else None)
        return self


class CategoricalDist(_Dist):
    type: Literal["categorical"]
    choices: list[bool | int | float | str | None] = Field(min_length=1)


MAX_GRID_POINTS = 1e12


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if not all(math.isfinite(v) for v in (low, high, high - low, step or 0.0)):
        raise ValueError("low, high and step must be finite numbers, and high - low too (a sampler draws in it)")
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    if step is not None and (high - low) / step > MAX_GRID_POINTS:  # Optuna's decimal arithmetic gives up beyond
        raise ValueError(f"step {step} cuts [{low}, {high}] into more than {MAX_GRID_POINTS:.0e} values")
    if log and low <= 0:
        raise ValueError("a log distribution needs low > 0")
    if log and step is not None:
        raise ValueError("Optuna cannot combine log and step: give one")


Distribution = Annotated[Union[FloatDist, IntDist, CategoricalDist], Field(discriminator="type")]


class SamplerSpec(Closed):
    type: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    seed: int | None = 0
    startup_trials: int | None = Field(None, ge=1, description="TPE/CMA-ES: random trials before modelling")


class SchedulerSpec(Closed):
    """When to stop a trial early, judged on `metric` at eval points (`time` is the global step)."""

    type: Literal["asha", "median", "fifo"] = "asha"
    grace_period: int = Field(20, ge=1, description="steps before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="asha: keep 1/reduction_factor at each rung")
    min_samples: int = Field(3, ge=1, description="median: trials needed at a step before comparing")


class SearchSpec(Closed):
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(4, ge=1)
    max_concurrent: int = Field(1, ge=1)
    sampler: SamplerSpec = SamplerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    space: dict[str, Distribution] = Field(default_factory=dict)
    reuse_stages: bool = Field(False, description="run an identical stage prefix once and share its checkpoint")
    max_failures: int = Field(1, ge=0, description="times a trial's Train workers are restarted after one dies or "
                                                   "raises, each time from its last stage checkpoint")
    include: list[str] = Field(default_factory=list, description="registered search-space fragments to merge")


class TrackingSpec(Closed):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow")
    experiment: str | None = Field(None, pattern=NAME, description="MLflow experiment; default the search name")
    register_as: str | None = Field(None, pattern=NAME,
                                    description="registered model name for the best trial's adapter")
    alias: str = Field("candidate", pattern=ALIAS)
    register_top: int = Field(1, ge=1, description="register the best N trials; only the best gets `alias`")
    upload_checkpoints: bool = Field(False, description="also upload full transformers (GBs) to MLflow; else by URI")

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.lower() == "latest" or (v[:1] in "vV" and v[1:].isdigit()):
            raise ValueError(f"{v!r} is reserved by MLflow (latest, v1, v2, …): choose another alias")
        return v


class CheckpointsSpec(Closed):
    keep: Literal["needed", "all"] = Field(
        "needed", description="needed: prune the transformer weights that resume, stage reuse and registration no "
                              "longer need, as the sweep goes; all: keep every stage checkpoint whole")


class SearchFile(Closed):
    version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=NAME)
    base: Experiment
    search: SearchSpec | None = None
    tracking: TrackingSpec = TrackingSpec()
    storage_path: str | None = Field(None, description="Ray storage for trial checkpoints; default ./runs")
    checkpoints: CheckpointsSpec = CheckpointsSpec()
