"""One Ray Train worker group per trial vs one TorchTrainer.fit per stage (each fit costs seconds before any
work).

Runs the same full → lora schedule on the tiny model both ways, side by side in one process and one local Ray,
and prints wall times, their ratio, and the in-group stage hand-over time (last full step → first lora step).

    .venv/bin/python benchmarks/worker_group_per_trial.py [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from fluxtune.config.load import load_search_text
from fluxtune.data.sample import ensure_sample_dataset
from fluxtune.plugins import plugin_set
from fluxtune.train.cluster import local_cpus, start_ray
from fluxtune.train.datasets import prepare_sweep_data
from fluxtune.train.trial import TrialSettings, trainer_for

SPEC = """
name: bench
base:
  eval_every: 1000
  stages:
    - {{name: full, type: full, steps: {steps}}}
    - {{name: lora, type: lora, steps: {steps}, adapter: {{type: lora, rank: 8}}}}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    _, base = load_search_text(SPEC.format(steps=args.steps))
    jsonl = str(ensure_sample_dataset())
    start_ray(None, local_cpus(1, 1.0, 1))
    source = prepare_sweep_data(jsonl, base).source  # trials read the latent cache, as in a sweep
    storage = tempfile.mkdtemp(prefix="fluxtune-bench-")
    settings = TrialSettings(sweep_id="bench", base=base, jsonl=source, storage_path=storage, plugins=plugin_set())

    one_group, per_stage, transitions = [], [], []
    for r in range(args.repeats):
        started = time.perf_counter()
        result = trainer_for(base, settings, f"group-{r}").fit()
        one_group.append(time.perf_counter() - started)
        transitions.append(result.metrics["transition_s"])

        started = time.perf_counter()
        for stage in base["stages"]:
            trainer_for({**base, "stages": [stage]}, settings, f"stage-{r}-{stage['name']}").fit()
        per_stage.append(time.perf_counter() - started)

    best_group, best_stage = min(one_group), min(per_stage)
    print(f"\nschedule: full {args.steps} steps → lora {args.steps} steps, tiny model, 1 CPU worker; "
          f"best of {args.repeats}")
    print(f"| layout | wall s | ratio |")
    print(f"|---|---|---|")
    print(f"| one worker group per trial (fluxtune) | {best_group:.2f} | 1.00 |")
    print(f"| one TorchTrainer.fit per stage | {best_stage:.2f} | {best_stage / best_group:.2f} |")
    print(f"\nin-group hand-over (last full step → first lora step): "
          f"{', '.join(f'{t * 1000:.0f} ms' for t in transitions)}")
    print(f"per-stage layout pays ≈ {best_stage - best_group:.1f} s more per extra stage boundary")


if __name__ == "__main__":
    main()
