"""Helpers for testing a fluxtune plugin in-process, on the tiny but real FLUX.1-Fill model.

    import fluxtune.testing as ft

    def test_my_stage_learns():
        with ft.registered_plugin(my_plugin_module):
            run = ft.run_tiny(STAGES_YAML)
        assert run.val_loss < run.initial_val_loss

Imports torch and diffusers (unlike `import fluxtune`): use it in tests, not in plugin modules.
"""

from __future__ import annotations

import os
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fluxtune.config.errors import InputError  # what tiny_experiment and run_tiny raise for a bad experiment

TINY_EXAMPLES = 24  # 20 to train on, 4 held out: enough to see a loss fall, fast to encode
TINY_RESOLUTION = 32


def tiny_model(seed: int = 0) -> Any:
    """The tiny FLUX.1-Fill bundle (transformer, VAE, text encoders) with the real channel layout."""
    from fluxtune.flux.model import build_tiny_fill

    return build_tiny_fill(seed=seed)


@contextmanager
def registered_plugin(plugin: Any, name: str | None = None) -> Iterator[Any]:
    """Register `plugin` (a module or object with `@fluxtune.hookimpl` functions) for the `with` block.

    Yields the rebuilt component table (`fluxtune.components.Components`); the plugin is unregistered afterwards,
    also when the block raises.
    """
    from fluxtune.components import loaded_components
    from fluxtune.plugins import add_plugin, plugin_manager, remove_plugin

    if plugin_manager()[0].is_registered(plugin):  # installed, so already loaded from its entry point
        yield loaded_components()
        return
    name = name or getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
    add_plugin(plugin, name)
    try:
        yield loaded_components()
    finally:
        remove_plugin(name)


def tiny_experiment(base_yaml: str) -> dict[str, Any]:
    """Validate the YAML body of a `base:` experiment (as in a search file) and return it normalised (every
    component's params with defaults filled: what `validate_experiment` hooks receive).

    Raises `InputError` (also `fluxtune.testing.InputError`) with every problem: `.problems[i].key` such as
    `base.loss.delta`, `.message`, `.one_line()`."""
    from fluxtune.config.load import load_search_text

    text = "name: plugin-test\nbase:\n" + textwrap.indent(textwrap.dedent(base_yaml).strip("\n"), "  ") + "\n"
    _, base = load_search_text(text, path="<tiny experiment>")
    return base


class RecordingReporter:
    """A Reporter that keeps everything: `steps` [(global step, metrics)] from `ctx.log`, `evaluations` [(global
    step, metrics)] from `maybe_evaluate`, `stage_ends` [(global step, metrics, kept checkpoint or None)].

    With `keep_checkpoints`, each stage checkpoint is copied to `keep_checkpoints/stage-<n>/` (n counts stage ends
    from 0 across cycles): `transformer/` (fp32 diffusers model folder), `exports/` (the stage's `ctx.export_dir`,
    e.g. `adapter/`), `progress.json` (cycle, next stage_index, global_step, finished_stage, metrics, files)."""

    def __init__(self, keep_checkpoints: Path | None = None):
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.evaluations: list[tuple[int, dict[str, float]]] = []
        self.stage_ends: list[tuple[int, dict[str, Any], Path | None]] = []
        self.keep = keep_checkpoints

    def log(self, global_step: int, metrics: dict[str, Any]) -> None:
        self.steps.append((global_step, {k: float(v) for k, v in metrics.items()}))

    def evaluation(self, global_step: int, metrics: dict[str, float]) -> None:
        self.evaluations.append((global_step, dict(metrics)))

    def stage_end(self, global_step: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        kept = None
        if checkpoint_dir is not None and self.keep is not None:
            import shutil

            kept = Path(self.keep) / f"stage-{len(self.stage_ends)}"
            shutil.copytree(checkpoint_dir, kept)  # the cycle deletes its scratch folder after reporting
        self.stage_ends.append((global_step, dict(metrics), kept))


@dataclass
class TinyRun:
    experiment: dict[str, Any]
    transformer: Any
    reporter: RecordingReporter
    initial_val_loss: float
    setup: Any = field(repr=False)  # the run's `fluxtune.context.WorkerSetup`

    @property
    def shared(self) -> Any:
        return self.setup  # the name before `setup`, kept for one release

    @property
    def val_loss(self) -> float:
        return self.reporter.stage_ends[-1][1]["val_loss"]


def tiny_data(seed: int = 0, cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, validation) arrays of the generated sample dataset at the tiny resolution."""
    import numpy as np

    from fluxtune.data.images import load_example
    from fluxtune.data.rows import read_rows
    from fluxtune.data.sample import ensure_sample_dataset

    rows = read_rows(ensure_sample_dataset(n=TINY_EXAMPLES, resolution=TINY_RESOLUTION, seed=seed,
                                           cache_dir=cache_dir))
    examples = [load_example(r, TINY_RESOLUTION) for r in rows]
    arrays = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}
    arrays["prompt"] = np.array([r.prompt or "" for r in rows], dtype=object)
    held_out = len(rows) - len(rows) // 6
    return ({k: v[:held_out] for k, v in arrays.items()}, {k: v[held_out:] for k, v in arrays.items()})


def run_tiny(base_yaml: str, keep_checkpoints: Path | None = None, seed: int = 0) -> TinyRun:
    """Run the experiment in this process (no Ray, no MLflow) on the tiny model and tiny sample data.

    `base_yaml` is the body of `base:` (stages, loss, callbacks, …); `data`/`model` default to the tiny ones.
    Every plugin it names must be registered (installed, or inside `registered_plugin`). `keep_checkpoints`: a
    folder to keep each stage checkpoint in (see `RecordingReporter`); `seed`: of the generated data.
    """
    import torch

    from fluxtune.components import loaded_components
    from fluxtune.context import evaluate
    from fluxtune.cycle import run_cycle
    from fluxtune.worker_setup import build_worker_setup, encode_arrays

    experiment = tiny_experiment(base_yaml)
    torch.manual_seed(experiment["seed"])
    bundle = tiny_model(seed=experiment["model"].get("seed", 0))
    train, val = tiny_data(seed=seed)
    reporter = RecordingReporter(keep_checkpoints)
    setup = build_worker_setup(experiment, encode_arrays(bundle, train), encode_arrays(bundle, val), reporter,
                               loaded_components(), torch.device("cpu"))
    initial = evaluate(bundle.transformer, setup)["val_loss"]
    transformer = run_cycle(experiment, bundle.transformer, setup)
    return TinyRun(experiment, transformer, reporter, initial, setup)


__all__ = ["InputError", "RecordingReporter", "TinyRun", "registered_plugin", "run_tiny", "tiny_data", "tiny_experiment",
           "tiny_model"]
