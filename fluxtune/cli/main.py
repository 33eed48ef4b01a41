"""`fluxtune` commands. Heavy imports (torch, ray, diffusers, mlflow) happen inside the commands that need them."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from fluxtune.cli.errors import EXIT_FAILED, error_boundary

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Plugin-based Ray Tune experiments for fine-tuning FLUX.1-Fill-dev.")
console = Console()


@app.command()
def validate(spec: str = typer.Argument(..., help="search or experiment YAML")) -> None:
    """Check a YAML file (schema, component names and params, search paths) without running anything."""
    from fluxtune.config.load import load_search_file

    with error_boundary(show_snippets=True):
        parsed, base = load_search_file(spec)
    space = len(parsed.search.space) if parsed.search else 0
    console.print(f"{spec}: ok ({len(base['stages'])} stages × {base['cycles']} cycles, {space} searched keys)")


@app.command()
def search(
    spec: str = typer.Argument(..., help="search YAML, e.g. searches/lora_rank.yaml"),
    address: Optional[str] = typer.Option(None, help="existing Ray cluster (default: start a local one)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray worker logs"),
) -> None:
    """Run a hyper-parameter search: Optuna samples, each trial trains on one Ray Train worker group."""
    _run(spec, address, verbose)


@app.command()
def run(
    spec: str = typer.Argument(..., help="experiment YAML (its `base` is run once; `search` is ignored)"),
    address: Optional[str] = typer.Option(None, help="existing Ray cluster (default: start a local one)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray worker logs"),
) -> None:
    """Run one experiment (the file's `base`) without a search."""
    _run(spec, address, verbose, single=True)


def _run(spec_path: str, address: str | None, verbose: bool, single: bool = False) -> None:
    from fluxtune.cli.preflight import preflight

    with error_boundary():
        checked = preflight(spec_path)
    spec = checked.spec.model_copy(update={"search": None}) if single else checked.spec
    console.print(f"{spec_path}: {checked.rows} rows from {checked.jsonl}")

    from fluxtune.cli.summary import print_summary
    from fluxtune.search.sweep import run_sweep

    with error_boundary():
        outcome = run_sweep(spec, checked.base, checked.jsonl, spec_path=spec_path, console=console,
                            address=address, verbose=verbose)
    print_summary(console, outcome, (spec.search.metric if spec.search else "val_loss"))
    if outcome.best_trial is None:
        raise typer.Exit(EXIT_FAILED)


import fluxtune.cli.plugins  # noqa: E402,F401  (adds `fluxtune plugins` to `app`)
from fluxtune.cli.models import app as models_app  # noqa: E402
app.add_typer(models_app, name="models")
from fluxtune.cli.ui import ui  # noqa: E402
app.command()(ui)


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
