"""What the plugin system costs: CLI start-up and component-table build with the example plugins installed, and the
per-step cost of runtime callbacks. Prints one table; compare rows as ratios (the machine may be loaded).

    .venv/bin/python benchmarks/plugins.py --repeats 5 --steps 60

* `fluxtune --help`: wall time of the console script (a fresh process) with built-ins only, and with the three
  example packages of plugins/ pip-installed (into a temporary --target on PYTHONPATH).
* component table build: `build_plugin_manager()` + `build_components()` in a fresh process (entry-point scan, imports,
  every register_* hook), same two settings.
* training steps/s of the tiny model through `run_cycle` with no callbacks, with `nan_guard` (syncs once every
  10 steps) and with a no-op `on_step_end` callback, in rounds with a rotating order (after a warm-up round)
  so machine load hits all alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLUXTUNE = Path(sys.executable).with_name("fluxtune")
EXAMPLES = ("fluxtune-ema", "fluxtune-dora", "fluxtune-masked-l1")
BUILD = ("import time; t = time.perf_counter(); from fluxtune.plugins import build_plugin_manager; "
         "from fluxtune.components import build_components; build_components(*build_plugin_manager()); "
         "print(time.perf_counter() - t)")


def install_examples(tmp: Path) -> Path:
    for name in EXAMPLES:
        shutil.copytree(REPO / "plugins" / name, tmp / "src" / name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(tmp / "site"), *[str(tmp / "src" / n) for n in EXAMPLES]], check=True)
    return tmp / "site"


def wall(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def startup_rows(repeats: int) -> list[tuple[str, float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        site = install_examples(Path(tmp))
        plain = {k: v for k, v in os.environ.items() if not k.startswith("FLUXTUNE_")}
        settings = {"built-ins only": plain, "+ 3 example plugins": {**plain, "PYTHONPATH": str(site)}}
        help_s = {k: [] for k in settings}
        build_s = {k: [] for k in settings}
        for _ in range(repeats):
            for label, env in settings.items():
                help_s[label].append(wall([str(FLUXTUNE), "--help"], env))
                out = subprocess.run([sys.executable, "-c", BUILD], env=env, check=True, capture_output=True, text=True)
                build_s[label].append(float(out.stdout))
    rows = []
    for what, samples in (("fluxtune --help, wall s", help_s), ("component table build, s", build_s)):
        base = statistics.median(samples["built-ins only"])
        for label, values in samples.items():
            rows.append((f"{what}: {label}", statistics.median(values), statistics.median(values) / base))
    return rows


class NoOp:
    def on_step_end(self, ctx, step, metrics):
        pass


def callback_rows(repeats: int, steps: int) -> list[tuple[str, float, float]]:
    import torch

    import fluxtune
    import fluxtune.testing as ft
    from fluxtune.components import loaded_components
    from fluxtune.cycle import run_cycle
    from fluxtune.worker_setup import build_worker_setup, encode_arrays

    class NoOpPlugin:
        @fluxtune.hookimpl
        def register_callbacks(self, register):
            register("noop", lambda params: NoOp())

    variants = {"no callbacks": "[]", "nan_guard (every 10)": "[{type: nan_guard}]",
                "no-op on_step_end": "[{type: noop}]"}
    with ft.registered_plugin(NoOpPlugin(), name="noop"):
        bundle = ft.tiny_model()
        train, val = ft.tiny_data()
        train, val = encode_arrays(bundle, train), encode_arrays(bundle, val)
        rates: dict[str, list[float]] = {k: [] for k in variants}
        labels = list(variants)
        for round_ in range(repeats + 1):  # round 0 warms up (allocator, autograd) and is not counted
            order = labels[round_ % len(labels):] + labels[:round_ % len(labels)]  # rotate: no fixed position
            for label in order:
                callbacks = variants[label]
                experiment = ft.tiny_experiment(f"eval_every: 100000\ncallbacks: {callbacks}\n"
                                                f"stages: [{{name: full, type: full, steps: {steps}}}]")
                setup = build_worker_setup(experiment, train, val, ft.RecordingReporter(), loaded_components(),
                                           torch.device("cpu"))
                reporter = setup.reporter
                run_cycle(experiment, ft.tiny_model().transformer, setup)
                if round_:
                    rates[label].append(reporter.stage_ends[-1][1]["steps_per_s"])
    base = statistics.median(rates["no callbacks"])
    return [(f"steps/s: {label}", statistics.median(v), statistics.median(v) / base) for label, v in rates.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    rows = startup_rows(args.repeats) + callback_rows(args.repeats, args.steps)
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement'.ljust(width)} | {'median':>9} | ratio")
    print(f"{'-' * width}-|-{'-' * 9}-|------")
    for label, value, ratio in rows:
        print(f"{label.ljust(width)} | {value:9.3f} | {ratio:5.2f}")


if __name__ == "__main__":
    main()
