"""Hook specifications: every way a plugin can extend fluxtune.

Each `register_*` hook is called once per process (the driver, and each Ray worker) when the registry is first
built. It receives a `register` callback and calls it once per component it provides:

    register(name, factory, params=SomeParams, doc="one line", replace=False)

`factory(params)` builds the component from its validated `params` (an instance of the `params` model, a
`fluxtune.Params` subclass). Keep implementations cheap: import torch/diffusers inside the factory, not at
module level. The return value of the hooks is ignored.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("fluxtune")

Register = Callable[..., None]


@hookspec
def register_stages(register: Register) -> None:
    """Register training stages, used by `type:` in a stage of `base.stages`.

    A stage factory returns an object with `run(ctx: fluxtune.StageContext) -> dict[str, float]`.
    Called once per process when the registry is built.
    """


@hookspec
def register_adapters(register: Register) -> None:
    """Register parameter-efficient adapters, used by `adapter: {type: …}` in an adapter stage.

    An adapter factory returns a `fluxtune.Adapter` (attach, export, merge). Called once per process.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register training losses, used by `base.loss: {type: …}`.

    A loss factory returns `loss(pred, target, batch) -> scalar tensor`. Called once per process.
    """


@hookspec
def register_timestep_samplers(register: Register) -> None:
    """Register flow-matching timestep samplers, used by `base.timesteps: {type: …}`.

    A sampler factory returns `sample(n, generator, image_seq_len) -> tensor[n]` in [0, 1].
    Called once per process.
    """


@hookspec
def register_callbacks(register: Register) -> None:
    """Register runtime callbacks, used by `base.callbacks: [{type: …}]`.

    A callback factory returns an object with any of `on_step_end(ctx, step, metrics)` and
    `on_stage_end(ctx, metrics)`; runtime events reach callbacks, never hooks. Called once per process.
    """


@hookspec
def register_search_spaces(register: Register) -> None:
    """Register named search-space fragments, used by `search.include: [name]`.

    The factory returns a mapping of dotted config path → distribution dict, merged into `search.space`.
    Called once per process.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add sub-commands to the `fluxtune` CLI; `cli` is the root `typer.Typer` app.

    Called once, in the CLI process, before the command line is parsed.
    """
