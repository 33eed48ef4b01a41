"""`fluxtune` commands. Heavy imports (torch, ray, diffusers, mlflow) happen inside the commands that need them."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from fluxtune.cli import errors
from fluxtune.cli.console import console, quiet_libraries
from fluxtune.cli.dashboard import dashboard
from fluxtune.cli.data import app as data_app
from fluxtune.cli.errors import EXIT_FAILED, error_boundary
from fluxtune.cli.models import app as models_app
from fluxtune.cli.options import AddressOption, SetOption, SpecArgument, VerboseOption
from fluxtune.cli.plan import plan
from fluxtune.cli.plugins import list_plugins
from fluxtune.cli.ui import ui

# Typer's pretty tracebacks are off: `main` turns every exception into one line (--debug: the traceback).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plugin-based Ray Tune experiments for fine-tuning FLUX.1-Fill-dev.")


def _show_version(value: bool) -> None:
    if value:
        from fluxtune import __version__

        typer.echo(f"fluxtune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="print the full traceback of an unexpected error "
                                                        "(default: one line, the traceback saved to a file)")] = False,
) -> None:
    errors.debug = errors.debug or debug


def validate(spec: SpecArgument, set_: SetOption = []) -> None:
    """Check a YAML file (schema, components and their params, search paths, plugin checks); run nothing."""
    from fluxtune.cli.preflight import check_spec_files
    from fluxtune.config.load import load_search_file
    from fluxtune.config.schedule import describe, planned_steps

    with error_boundary(show_snippets=True):
        parsed, base = load_search_file(spec, overrides=set_)
        check_spec_files(spec, set_, parsed, base)
    space = len(parsed.search.space) if parsed.search else 0
    console.print(f"{spec}: ok ({len(base['stages'])} stages × {base['cycles']} cycles, {planned_steps(base)} steps: "
                  f"{_short(describe(base))}; {space} searched keys)", markup=False)


def search(
    spec: Annotated[str, typer.Argument(help="search YAML, e.g. searches/lora_rank.yaml")],
    set_: SetOption = [],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print sampled configurations; "
                                                            "train nothing")] = False,
    samples: Annotated[int, typer.Option(min=1, max=1000, help="with --dry-run: how many configurations "
                                                                "to show")] = 3,
    resume: Annotated[bool, typer.Option("--resume", help="continue the latest unfinished sweep of "
                                                          "this name")] = False,
    more: Annotated[int, typer.Option("--more", min=0, help="add N trials to the latest finished sweep of "
                                                            "this name")] = 0,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run a hyper-parameter search: Optuna samples, each trial trains on one Ray Train worker group."""
    if resume and more:
        typer.echo("error: --resume and --more exclude each other (resume first, then extend)", err=True)
        raise typer.Exit(2)
    if dry_run:
        _dry_run(spec, set_, samples)
        return
    _run(spec, set_, address, verbose, resume=resume, more=more)


def run(
    spec: Annotated[str, typer.Argument(help="experiment YAML: a search file's `base`, or a sweep's best.yaml")],
    set_: SetOption = [],
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run one experiment (the file's `base`) without a search."""
    _run(spec, set_, address, verbose, single=True)


def _short(text: str, limit: int = 300) -> str:
    """A schedule of thousands of cycles is described by its start, not in half a megabyte."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _dry_run(spec_path: str, overrides: list[str], n: int) -> None:
    from fluxtune.components import loaded_components
    from fluxtune.config.load import load_search_file
    from fluxtune.config.resolved import resolve_trial
    from fluxtune.config.schedule import describe, planned_steps
    from fluxtune.search.space import grid_size, sample_configs

    from fluxtune.cli.preflight import check_spec_files

    with error_boundary(show_snippets=True):
        parsed, base = load_search_file(spec_path, overrides=overrides)
        check_spec_files(spec_path, overrides, parsed, base)
        if not parsed.search or not parsed.search.space:
            console.print(f"{spec_path}: ok; no search space: `fluxtune run` trains the base "
                          f"({planned_steps(base)} steps: {_short(describe(base))})", markup=False)
            return
        search_spec = parsed.search
        extra = f", grid of {grid_size(search_spec)}" if search_spec.sampler.type == "grid" else ""
        console.print(f"{spec_path}: ok; {search_spec.sampler.type} sampler, {search_spec.scheduler.type} "
                      f"scheduler, {search_spec.num_samples} trials{extra}. First {n} sampled configurations:",
                      markup=False)
        for i, values in enumerate(sample_configs(search_spec, base, n)):
            trial = resolve_trial(base, values, loaded_components())
            sampled = ", ".join(f"{k}={v!r}" for k, v in values.items())
            console.print(_short(f"  [{i}] {sampled}", 1000), markup=False)
            console.print(f"      {trial.planned_steps} steps: {_short(trial.description)}", markup=False)


def _run(spec_path: str, overrides: list[str], address: str | None, verbose: bool, single: bool = False,
         resume: bool = False, more: int = 0) -> None:
    from fluxtune.cli.preflight import preflight
    from fluxtune.redact import redact_text

    quiet_libraries(verbose)
    with error_boundary():
        checked = preflight(spec_path, overrides)
    spec = checked.spec
    if single:  # the base alone, once; how often its workers are restarted still follows the file
        from fluxtune.config.schema import SearchSpec

        restarts = {"max_failures": spec.search.max_failures} if spec.search else {}
        spec = spec.model_copy(update={"search": SearchSpec(num_samples=1, max_concurrent=1, **restarts)})
    console.print(redact_text(f"{spec_path}: {checked.rows} rows from {checked.jsonl}"), markup=False)

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


# Every command, registered one way: a function per command, a Typer app per command group.
for command in (validate, search, run, plan, ui, dashboard):
    app.command()(command)
app.command("plugins")(list_plugins)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")


def _command_name(argv: list[str]) -> str:
    """`data check` from `fluxtune --debug data check x.jsonl`: the words before the first argument."""
    words = [a for a in argv if not a.startswith("-")]
    groups = {"data", "models"}
    return " ".join(words[:2] if words and words[0] in groups else words[:1])


def _wants_help_only(argv: list[str]) -> bool:
    return not argv or any(a in ("--help", "-h", "--version") for a in argv)


def _load_plugins(argv: list[str]) -> None:
    """Plugins add commands before the command line is parsed. A broken one is bad input (one line naming it,
    exit 2), except for `--help` and `--version`, which still answer (with a warning) so the user can see
    what is installed and how to disable it."""
    from fluxtune.plugins import plugin_manager

    try:
        pm, _ = plugin_manager()
        for impl in pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli=app)
            except Exception as exc:  # noqa: BLE001 - a plugin's bug is named, not shown as a traceback
                from fluxtune.config.errors import InputError
                from fluxtune.failures import exception_line

                raise InputError.single(f"plugin {impl.plugin_name!r}", f"register_commands failed: "
                                        f"{exception_line(exc)}; disable it with "
                                        f"FLUXTUNE_DISABLE_PLUGINS={impl.plugin_name}") from exc
    except Exception as exc:  # noqa: BLE001 - every plugin failure is the user's installation
        if _wants_help_only(argv):
            errors.report_input_error(exc, prefix="warning")
            return
        raise SystemExit(errors.handle(exc, _command_name(argv))) from None


def main() -> None:
    """The console script: plugins, then the command, every exception mapped to its one line and exit code."""
    # Typer 0.29 vendors click: its exception classes are reachable only there (tests/test_cli_errors.py fails
    # if that moves, since usage errors would then print Typer's boxed panels again).
    from typer._click import exceptions as click

    argv = sys.argv[1:]
    quiet_libraries()  # `-v` of run/search shows the libraries' chatter again
    # Read before parsing, so an error while plugins load or options parse also honours it.
    errors.debug = bool(os.environ.get("FLUXTUNE_DEBUG")) or "--debug" in argv
    _load_plugins(argv)
    try:
        code = app(standalone_mode=False, prog_name="fluxtune")  # usage errors come here, shown as one line
    except click.NoArgsIsHelpError as exc:
        exc.show()
        code = 0
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "fluxtune"
        code = errors.report_usage_error(exc.format_message(), command)
    except click.ClickException as exc:  # e.g. a file option that cannot be opened
        errors.report_input_error(exc)
        code = exc.exit_code
    except typer.Abort:
        code = errors.handle(KeyboardInterrupt(), "")
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the boundary: nothing leaves as a traceback
        code = errors.handle(exc, _command_name(argv))
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
