"""Hook specifications: every way a plugin can extend fluxtune.

A plugin is a module (or object) with functions marked `@fluxtune.hookimpl`, found through the entry-point
group `fluxtune` (built-ins in `fluxtune/default_plugins/` register the same way). Each `register_*` hook is
called once per process (the CLI/driver and each Ray worker) when the component table is first built, and receives a
`register` callback to call once per component it provides:

    register(name, factory, params=SomeParams, doc="one line", replace=False)

- `name`: what a YAML uses as `type:`; unique per kind (a duplicate is an error naming both plugins).
- `factory(params)`: builds the component from its validated `params`, an instance of the `params` model.
- `params`: a `fluxtune.Params` subclass (closed pydantic model) checked at `fluxtune validate` time; a plain
  pydantic model is registered as a closed subclass of itself, so a misspelt key is an error, never ignored.
- `replace=True`: deliberately take over a name another plugin (e.g. a built-in) registered first.

Keep implementations cheap: import torch/diffusers inside the factory, not at module level, because they run
in every process. The return value of the hooks is ignored. Runtime events (step end, stage end) reach
`Callback` objects, never hooks.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("fluxtune")

Register = Callable[..., None]


@hookspec
def register_stages(register: Register) -> None:
    """Register training stages, used by `type:` in an entry of `base.stages`.

    When: once per process, when the component table is built (validation in the CLI; start-up of each Ray worker).
    Arguments: `register(name, factory, params=..., doc=..., replace=False)`. The stage entry's keys other than
    `name`, `type` and `steps` are validated by `params`. `factory(params)` returns an object with
    `run(ctx: fluxtune.StageContext) -> dict[str, float]`, called once per stage per cycle in every worker.
    """


@hookspec
def register_adapters(register: Register) -> None:
    """Register parameter-efficient adapters, used by `adapter: {type: …}` in an adapter stage.

    When: once per process, when the component table is built. Arguments: `register(name, factory, params=..., ...)`.
    `factory(params)` returns a `fluxtune.Adapter` (`attach`, `export`, `merge`); stages build one per stage run
    with `ctx.adapter(spec)`.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register training losses, used by `base.loss: {type: …}`.

    When: once per process, when the component table is built. Arguments: `register(name, factory, params=..., ...)`.
    `factory(params)` returns `loss(pred, target, batch) -> scalar tensor`, built once per worker and called
    every training step (the validation loss stays plain MSE so that trials compare).
    """


@hookspec
def register_timestep_samplers(register: Register) -> None:
    """Register flow-matching timestep samplers, used by `base.timesteps: {type: …}`.

    When: once per process, when the component table is built. Arguments: `register(name, factory, params=..., ...)`.
    `factory(params)` returns `sample(n, generator, image_seq_len) -> tensor[n]` of times in [0, 1]
    (1 = pure noise), called every training step.
    """


@hookspec
def register_callbacks(register: Register) -> None:
    """Register runtime callbacks, used by `base.callbacks: [{type: …}, …]`.

    When: once per process, when the component table is built. Arguments: `register(name, factory, params=..., ...)`.
    `factory(params)` returns a `fluxtune.Callback`: any of `on_stage_start(ctx)`,
    `on_step_end(ctx, step, metrics)` and `on_stage_end(ctx, metrics) -> dict | None`. One instance per trial
    and worker, in the order listed in the YAML.
    """


@hookspec
def register_search_spaces(register: Register) -> None:
    """Register named search-space fragments, used by `search.include: [name, …]`.

    When: once per process, when the component table is built. Arguments: `register(name, factory, params=..., ...)`.
    `factory(params)` returns a mapping of dotted config path → distribution (`{type: float, low: …, high: …}`,
    as in `search.space`); it is merged under the file's own `search.space` (the file wins on a shared path)
    at validation time.
    """


@hookspec
def register_optimizers(register: Register) -> None:
    """Register optimizers, used by `optimizer: {type: …}` in a built-in stage (default `adamw`).

    When: once per process, when the component table is built. Arguments: `register(name, factory, params=..., ...)`.
    `factory(params)` returns `make(parameters, device, sharded) -> torch.optim.Optimizer`, called once per
    stage run in every worker: `device` is where the optimizer states live (the CPU under DeepSpeed optimizer
    offload), `sharded` is true when each rank steps only its ZeRO slice of the parameters (statistics over all
    parameters must then be all-reduced). Plugin stages build one with `ctx.optimizer(params, type=…, …)`.
    A `params` model with the class attribute `requires_cuda = True` is refused by `fluxtune validate` for an
    experiment that runs on CPU (`gpus_per_worker: 0`).
    """


@hookspec
def validate_experiment(experiment: dict[str, Any], model: dict[str, Any] | None) -> list[Any] | None:
    """Check a resolved experiment against the model it will train, before anything runs.

    When: in the CLI process, at `fluxtune validate`, `fluxtune search --dry-run` and before Ray starts for
    `fluxtune search`/`run`: once for the base experiment and once per corner value of each searched key
    (each choice; a range's low and high). Keep it cheap and import-light (no torch): `validate` runs it.
    Arguments: `experiment`, the resolved experiment as a dict (every component's params with defaults filled;
    `stages` a list of dicts with `name`, `type`, `steps` and the stage's params); `model`, the transformer's
    diffusers config read without weights (`num_layers` double blocks, `num_single_layers`,
    `num_attention_heads`, `attention_head_dim`, `in_channels`, …), or None when the experiment starts from a
    registered version that does not name its base. Implementations may take only the arguments they need.
    Returns: the problems found, each a message or a `(key, message)` pair whose `key` is a dotted path of the
    experiment as in `search.space` (`stages.lora.adapter.blocks`), shown at that key's YAML line; None or an
    empty list when all is well. Each problem is one line naming the plugin, and the command exits with 2.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add sub-commands to the `fluxtune` CLI.

    When: once, in the CLI process only, before the command line is parsed (so also for `fluxtune --help`:
    keep it import-light). Arguments: `cli`, the root `typer.Typer` app; add commands with `@cli.command()`.
    """
