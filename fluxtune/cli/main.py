"""`fluxtune` commands. Heavy imports (torch, ray, diffusers, mlflow) happen inside the commands that need them."""

from __future__ import annotations

import sys

from typing import Optional

import typer
from rich.console import Console

from fluxtune.cli.errors import EXIT_FAILED, error_boundary

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Plugin-based Ray Tune experiments for fine-tuning FLUX.1-Fill-dev.")
# Lines naming files stay whole for grep and logs; tables get room when the output is a file or a pipe.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


SET_HELP = "override a key of the file: --set base.stages.lora.steps=10 (repeatable; the value is YAML)"


@app.command()
def validate(
    spec: str = typer.Argument(..., help="search or experiment YAML"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check a YAML file (schema, component names and params, search paths) without running anything."""
    from fluxtune.config.load import load_search_file
    from fluxtune.config.schedule import describe, planned_steps

    with error_boundary(show_snippets=True):
        parsed, base = load_search_file(spec, overrides=set_)
    space = len(parsed.search.space) if parsed.search else 0
    console.print(f"{spec}: ok ({len(base['stages'])} stages × {base['cycles']} cycles, "
                  f"{planned_steps(base)} steps: {describe(base)}; {space} searched keys)")


@app.command()
def search(
    spec: str = typer.Argument(..., help="search YAML, e.g. searches/lora_rank.yaml"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print sampled configurations; train nothing"),
    samples: int = typer.Option(3, help="with --dry-run: how many configurations to show"),
    resume: bool = typer.Option(False, "--resume", help="continue the latest unfinished sweep of this name"),
    more: int = typer.Option(0, "--more", min=0, help="add N trials to the latest finished sweep of this name"),
    address: Optional[str] = typer.Option(None, help="existing Ray cluster (default: start a local one)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray worker logs"),
) -> None:
    """Run a hyper-parameter search: Optuna samples, each trial trains on one Ray Train worker group."""
    if resume and more:
        typer.echo("error: --resume and --more exclude each other (resume first, then extend)", err=True)
        raise typer.Exit(2)
    if dry_run:
        _dry_run(spec, set_, samples)
        return
    _run(spec, set_, address, verbose, resume=resume, more=more)


@app.command()
def run(
    spec: str = typer.Argument(..., help="experiment YAML: a search file's `base`, or a sweep's best.yaml"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    address: Optional[str] = typer.Option(None, help="existing Ray cluster (default: start a local one)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray worker logs"),
) -> None:
    """Run one experiment (the file's `base`) without a search."""
    _run(spec, set_, address, verbose, single=True)


def _dry_run(spec_path: str, overrides: list[str], n: int) -> None:
    from fluxtune.config.load import load_search_file, sample_experiment
    from fluxtune.config.schedule import describe, planned_steps
    from fluxtune.registry import registry
    from fluxtune.search.space import grid_size, sample_configs

    with error_boundary(show_snippets=True):
        parsed, base = load_search_file(spec_path, overrides=overrides)
        if not parsed.search or not parsed.search.space:
            console.print(f"{spec_path}: ok; no search space: `fluxtune run` trains the base "
                          f"({planned_steps(base)} steps: {describe(base)})")
            return
        search_spec = parsed.search
        extra = f", grid of {grid_size(search_spec)}" if search_spec.sampler.type == "grid" else ""
        console.print(f"{spec_path}: ok; {search_spec.sampler.type} sampler, {search_spec.scheduler.type} "
                      f"scheduler, {search_spec.num_samples} trials{extra}. First {n} sampled configurations:")
        for i, values in enumerate(sample_configs(search_spec, base, n)):
            experiment = sample_experiment(base, values, registry())
            console.print(f"  [{i}] " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
            console.print(f"      {planned_steps(experiment)} steps: {describe(experiment)}")


def _run(spec_path: str, overrides: list[str], address: str | None, verbose: bool, single: bool = False,
         resume: bool = False, more: int = 0) -> None:
    from fluxtune.cli.preflight import preflight

    with error_boundary():
        checked = preflight(spec_path, overrides)
    spec = checked.spec.model_copy(update={"search": None}) if single else checked.spec
    console.print(f"{spec_path}: {checked.rows} rows from {checked.jsonl}")

    from fluxtune.cli.summary import print_summary
    from fluxtune.search.sweep import run_sweep

    with error_boundary():
        outcome = run_sweep(spec, checked.base, checked.jsonl, spec_path=spec_path, console=console,
                            address=address, verbose=verbose, resume=resume, more=more)
    print_summary(console, outcome, (spec.search.metric if spec.search else "val_loss"))
    if outcome.fault:  # the store took no more writes: stopped, resumable
        raise typer.Exit(EXIT_FAILED)
    if outcome.interrupted:
        raise typer.Exit(130)
    if outcome.best_trial is None:
        raise typer.Exit(EXIT_FAILED)


import fluxtune.cli.plugins  # noqa: E402,F401  (adds `fluxtune plugins` to `app`)
from fluxtune.cli.data import app as data_app  # noqa: E402

app.add_typer(data_app, name="data")
from fluxtune.cli.models import app as models_app  # noqa: E402
app.add_typer(models_app, name="models")
from fluxtune.cli.ui import ui  # noqa: E402
app.command()(ui)
from fluxtune.cli.plan import plan  # noqa: E402
app.command()(plan)


def main() -> None:
    from fluxtune.plugins import plugin_manager

    try:  # a broken plugin is reported like bad input (one line, exit 2), before the command line is parsed
        with error_boundary():
            pm, _ = plugin_manager()
            pm.hook.register_commands(cli=app)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    app()


if __name__ == "__main__":
    main()
