"""`fluxtune plan FILE --gpus N --gpu-mem GB`: each stage's peak memory per GPU, whether it fits, its FLOPs. No torch."""

from __future__ import annotations

import typer
from rich.table import Table

from fluxtune.cli.console import console
from fluxtune.cli.errors import error_boundary
from fluxtune.cli.options import SetOption, SpecArgument



def _table(title: str, plans, gpu_mem: float) -> Table:
    known = [plan.total for plan in plans if plan.peak_gib is not None]
    unit, scale = ("GiB", 1.0) if not known or max(known) >= 0.1 else ("MiB", 1024.0)  # tiny-fill: KiB-MiB
    table = Table(title=f"{title} ({unit} per GPU)", title_justify="left", caption_justify="left",
                  caption="\n".join(f"{plan.name}: {plan.detail}" for plan in plans))
    for column in ("stage", "weights", "optim.", "LoRA", "grads", "activ.", "temp.", "peak", "at", "fits",
                   "TFLOP/step"):
        table.add_column(column, justify="left" if column in ("stage", "at") else "right")
    for plan in plans:
        if plan.peak_gib is None:
            table.add_row(plan.name, *["-"] * 5, "", "unknown", "", "?",
                          f"{plan.flops / 1e12:.1f}" if plan.flops else "-")
            continue
        p = plan.parts
        cell = lambda *keys: f"{sum(p.get(k, 0.0) for k in keys) * scale:.2f}" if any(k in p for k in keys) \
            else "-"  # noqa: E731
        offload = f" (+{plan.offloaded_gib * scale:.1f} CPU)" if plan.offloaded_gib else ""
        table.add_row(plan.name, cell("weights"), cell("optimizer") + offload, cell("adapter"),
                      cell("gradients", "gradient buffers", "fp32 gradients"), cell("activations"),
                      cell("step temporaries", "forward temporaries"), f"{plan.total * scale:.2f}", plan.moment,
                      "[green]yes[/]" if plan.fits(gpu_mem) else "[red]no[/]",
                      f"{plan.flops / 1e12:.1f}" if plan.flops else "-")
    return table


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def plan(
    spec: SpecArgument,
    gpus: int = typer.Option(..., "--gpus", min=1, help="GPUs (workers) per trial"),
    gpu_mem: float = typer.Option(..., "--gpu-mem", min=1.0, help="memory per GPU in GB (GiB)"),
    set_: SetOption = [],
    reference: bool = typer.Option(True, help="also show FLUX.1-Fill-dev (11.9 B) with the same stages"),
) -> None:
    """Each stage's peak memory per GPU (weights, optimizer, LoRA, gradients, activations), whether it fits, and its
    training FLOPs per step (for MFU: achieved FLOP/s ÷ 989 TFLOP/s)."""
    from fluxtune.config.load import load_search_file
    from fluxtune.flux import presets
    from fluxtune.plan import RESERVE_GIB, parameter_count, plan_stages, transformer_config

    with error_boundary(show_snippets=True):
        _, base = load_search_file(spec, overrides=set_)
        config, label, text_tokens = transformer_config(base["model"])
    resolution, batch = base["data"]["resolution"], base["data"]["batch_size"]
    head = f"{resolution}² px, micro-batch {batch}/GPU, {gpus} × {gpu_mem:g} GiB"
    plans = plan_stages(base, config, gpus, text_tokens)
    console.print(_table(f"{label}: {_count(parameter_count(config))} params, {head}", plans, gpu_mem))
    if reference and base["model"].get("preset"):
        real = presets.FLUX_FILL_DEV_TRANSFORMER
        console.print(_table(f"FLUX.1-Fill-dev: {_count(parameter_count(real))} params, {head}",
                             plan_stages(base, real, gpus, presets.FLUX_TEXT_TOKENS), gpu_mem))
    console.print(f"peak: the highest moment of a training step (at: forward, backward or optimizer step); fits = "
                  f"peak + {RESERVE_GIB:g} GiB reserve (CUDA context, allocator) ≤ --gpu-mem. Activations per block "
                  "are measured at real width (BENCHMARKS.md); parameter counts and ZeRO partitions are exact.")
    unknown = [plan for plan in plans if plan.peak_gib is None]
    for stage in unknown:
        console.print(f"[yellow]{stage.name}: unknown[/] ({stage.detail})")
