"""TPE + ASHA against an exhaustive grid over the same space, on the tiny model.

Target (issue 6): TPE + ASHA reaches within 2% of the grid's best validation loss while spending at most
40% of the grid's training steps. Both sweeps run through the real CLI (`fluxtune search`, real Ray, Optuna,
MLflow) in a temporary folder; the figures come from each sweep's `runs/<sweep>/sweep.json`.

    .venv/bin/python benchmarks/search_budget.py [--tpe-samples 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLUXTUNE = Path(sys.executable).with_name("fluxtune")

SPACE = """\
name: budget
base:
  data: {jsonl: sample, resolution: 64, batch_size: 4}
  eval_every: 10
  stages:
    - {name: full, type: full, steps: 20, optimizer: {lr: 3.0e-4}}
    - {name: lora, type: lora, steps: 60, optimizer: {lr: 1.0e-3}, adapter: {type: lora, rank: 16, alpha: 16}}
search:
  num_samples: 9
  reuse_stages: false
  sampler: {type: grid, seed: 0}
  scheduler: {type: fifo}
  space:
    stages.lora.optimizer.lr: {type: categorical, choices: [3.0e-4, 1.0e-3, 3.0e-3]}
    stages.lora.adapter.rank: {type: categorical, choices: [4, 16, 64]}
tracking: {experiment: budget}
"""


def run_sweep(workdir: Path, overrides: list[str]) -> tuple[dict, float]:
    workdir.mkdir(parents=True)
    (workdir / "space.yaml").write_text(SPACE)
    args = [str(FLUXTUNE), "search", "space.yaml"] + [a for o in overrides for a in ("--set", o)]
    started = time.perf_counter()
    done = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"sweep failed ({' '.join(args)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    [record] = (workdir / "runs").glob("*/sweep.json")
    return json.loads(record.read_text()), wall


def summary(record: dict) -> dict:
    trials = [t for t in record["trials"].values() if t["val_loss"] is not None]
    return {"trials": len(trials), "steps": sum(t["steps"] - t["reused_steps"] for t in trials),
            "best": min(t["val_loss"] for t in trials)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tpe-samples", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grid, grid_wall = run_sweep(Path(tmp) / "grid", [])
        tpe, tpe_wall = run_sweep(Path(tmp) / "tpe", [
            "search.sampler={type: tpe, seed: 0, startup_trials: 2}",
            f"search.num_samples={args.tpe_samples}",
            "search.scheduler={type: asha, grace_period: 30, reduction_factor: 3}"])
    g, t = summary(grid), summary(tpe)
    print("| search | trials | training steps | steps vs grid | best val_loss | gap to grid best | wall s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| grid (exhaustive, FIFO) | {g['trials']} | {g['steps']} | 1.00 | {g['best']:.4f} | 0.00% | {grid_wall:.0f} |")
    gap = (t["best"] - g["best"]) / g["best"] * 100
    print(f"| TPE + ASHA | {t['trials']} | {t['steps']} | {t['steps'] / g['steps']:.2f} | {t['best']:.4f} | "
          f"{gap:+.2f}% | {tpe_wall:.0f} |")
    ok = gap <= 2.0 and t["steps"] <= 0.4 * g["steps"]
    print(f"\ntarget (within 2% of the grid's best with ≤ 40% of its steps): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
