"""`fluxtune plan FILE --gpus N --gpu-mem GB`: memory per GPU of each stage, and whether it fits. No torch."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from fluxtune.cli.errors import error_boundary


def _table(title: str, plans, gpu_mem: float) -> Table:
    largest = max(plan.total for plan in plans)
    unit, scale = ("GiB", 1.0) if largest >= 0.1 else ("MiB", 1024.0)  # the tiny model's sizes are KiB-MiB
    table = Table(title=f"{title} ({unit} per GPU)", title_justify="left", caption_justify="left",
                  caption="\n".join(f"{plan.name}: {plan.detail}" for plan in plans))
    for column in ("stage", "weights", "grads", "optim.", "LoRA", "activ.", "total", "fits"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for plan in plans:
        p = plan.parts
        cell = lambda key: f"{p[key] * scale:.2f}" if key in p else "-"  # noqa: E731
        offload = f" (+{plan.offloaded_gib * scale:.1f} CPU)" if plan.offloaded_gib else ""
        table.add_row(plan.name, cell("weights"), cell("gradients"), cell("optimizer") + offload,
                      cell("lora states"), cell("activations"), f"{plan.total * scale:.2f}",
                      "[green]yes[/]" if plan.fits(gpu_mem) else "[red]no[/]")
    return table


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def plan(
    spec: str = typer.Argument(..., help="search or experiment YAML"),
    gpus: int = typer.Option(..., "--gpus", min=1, help="GPUs (workers) per trial"),
    gpu_mem: float = typer.Option(..., "--gpu-mem", min=1.0, help="memory per GPU in GB (GiB)"),
    reference: bool = typer.Option(True, help="also show FLUX.1-Fill-dev (11.9 B) with the same stages"),
) -> None:
    """Estimate each stage's memory per GPU (weights, gradients, optimizer, LoRA, activations) and say if it fits."""
    from fluxtune.config.load import load_search_file
    from fluxtune.flux import presets
    from fluxtune.plan import DEFAULT_TEXT_TOKENS, RESERVE_GIB, parameter_count, plan_stages, transformer_config

    with error_boundary(show_snippets=True):
        _, base = load_search_file(spec)
        config, label, text_tokens = transformer_config(base["model"])
    console = Console()
    resolution, batch = base["data"]["resolution"], base["data"]["batch_size"]
    head = f"{resolution}² px, batch {batch}/GPU, {gpus} × {gpu_mem:g} GiB"
    console.print(_table(f"{label}: {_count(parameter_count(config))} params, {head}",
                         plan_stages(base, config, gpus, text_tokens), gpu_mem))
    if reference and base["model"].get("preset"):
        real = presets.FLUX_FILL_DEV_TRANSFORMER
        console.print(_table(f"FLUX.1-Fill-dev: {_count(parameter_count(real))} params, {head}",
                             plan_stages(base, real, gpus, DEFAULT_TEXT_TOKENS), gpu_mem))
    console.print(f"fits = total + {RESERVE_GIB:g} GiB reserve (CUDA context, allocator) ≤ --gpu-mem. Activations are "
                  "an estimate calibrated on FLUX.1-Fill-dev; weights/gradients/optimizer follow ZeRO exactly.")
