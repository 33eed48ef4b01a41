"""fluxtune's modules form layers: a module imports from its own layer or lower ones, never from a higher one, and
no chain of imports among fluxtune's modules leads back to where it started.

Imports are read from the source (every `import` statement: module level, inside functions and under
TYPE_CHECKING alike), so a circle hidden in a function-level import still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fluxtune

PACKAGE = Path(fluxtune.__file__).parent

# Lowest first. A module belongs to the layer of its longest listed prefix.
LAYERS = [
    # Plain helpers every part uses: the public API, hook specs, storage, secrets redaction, what failed.
    # The worker→driver protocol (report keys, TrialReport, SweepLayout) lives beside the Train adapter that speaks
    # it, but is plain names and paths: MLflow views and `fluxtune.failures` read it too.
    ("foundation", ["fluxtune", "fluxtune.api", "fluxtune.hookspecs", "fluxtune.storage", "fluxtune.callbacks",
                    "fluxtune.serving", "fluxtune.redact", "fluxtune.failures", "fluxtune.config.errors",
                    "fluxtune.train.protocol"]),
    # The model and its data: FLUX loading and packing, rows, images, buckets, the latent cache.
    ("model and data", ["fluxtune.flux", "fluxtune.data"]),
    # What can be named in a YAML: plugins, the table of their components, the config schema and loading.
    ("plugins and config", ["fluxtune.plugins", "fluxtune.components", "fluxtune.config"]),
    # The Ray-free training cycle and what it is built from: stages, strategies, checkpoints, the planner.
    ("cycle", ["fluxtune.cycle", "fluxtune.context", "fluxtune.canonical", "fluxtune.checkpoints",
               "fluxtune.worker_setup", "fluxtune.version_contents", "fluxtune.default_plugins",
               "fluxtune.strategies", "fluxtune.plan", "fluxtune.testing"]),
    # MLflow. Below train: a worker encodes its sample grids with `tracking.samples` (and nothing of MLflow).
    ("tracking", ["fluxtune.tracking"]),
    # Ray Train: the worker group of a trial, its data, its reports.
    ("train", ["fluxtune.train"]),
    # Ray Tune + Optuna: the sweep.
    ("search", ["fluxtune.search"]),
    ("cli", ["fluxtune.cli"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fluxtune modules `name` imports. `from pkg import sub` counts as importing `pkg.sub` only (not the
    package's __init__) when `sub` is a module."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return level


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles_among_fluxtune_modules():
    assert cycles(import_graph()) == []


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in sorted(import_graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == []


def test_the_checks_see_circles_and_upward_imports():
    graph = {"fluxtune.data.rows": {"fluxtune.data.images"}, "fluxtune.data.images": {"fluxtune.data.rows"},
             "fluxtune.train.cluster": set()}
    assert cycles(graph) == [["fluxtune.data.images", "fluxtune.data.rows"]]
    assert layer_of("fluxtune.train.cluster") > layer_of("fluxtune.data.latent_cache")
    assert "fluxtune.components" in imports_of("fluxtune.config.load", PACKAGE / "config" / "load.py", all_modules())


def test_the_search_callbacks_need_no_torch_for_report_keys():
    """The driver's Tune callbacks read reports through the protocol module, not the worker's training code."""
    imported = import_graph()["fluxtune.search.callbacks"]
    assert "fluxtune.train.protocol" in imported
    assert not {"fluxtune.train.worker", "fluxtune.train.reporter"} & imported


def test_the_sweeps_driver_imports_no_torch():
    """torch (≈ 1 CPU-s per process) is imported where a trial builds its trainer and trains, not in `fluxtune
    search`: the driver only schedules, tracks and registers (registration: tests/test_models.py)."""
    import subprocess
    import sys

    script = ("import sys, fluxtune.cli.main, fluxtune.search.sweep, fluxtune.train.trial, fluxtune.search.retention; "
              "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'diffusers', 'peft', 'ray'}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "['ray']", done.stdout


def test_a_prompt_encoder_loads_no_diffusers():
    """The cache's prompt encoder actor needs only the text encoders (transformers): diffusers' imports (≈ 1.7
    CPU-s per process) are for the processes that build a transformer, a VAE or a scheduler."""
    import subprocess
    import sys

    script = ("import sys; from fluxtune.flux.encoded import load_text_bundle; "
              "bundle = load_text_bundle({'preset': 'tiny-fill', 'seed': 0}); "
              "print(bundle.text_encoder is not None, bundle.scheduler, 'diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "True None False", done.stdout
