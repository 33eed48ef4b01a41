"""Stage reuse on `searches/lora_rank.yaml`: the same sweep with `reuse_stages` off and on.

FIFO instead of the file's ASHA, so both runs train the same trials to the end. Every trial of lora_rank starts with the same full fine-tune (same config, data, seed): with reuse it runs once
and later trials start from its checkpoint. Both sweeps run through the real CLI in a temporary folder; the
figures come from `runs/<sweep>/sweep.json` (training steps actually run, steps reused) and wall time.

    .venv/bin/python benchmarks/search_stage_reuse.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLUXTUNE = Path(sys.executable).with_name("fluxtune")
SPEC = Path(__file__).resolve().parents[1] / "searches" / "lora_rank.yaml"


def run_sweep(workdir: Path, reuse: bool) -> tuple[dict, float]:
    workdir.mkdir(parents=True)
    # FIFO: every trial runs to the end, so the step counts compare like for like (ASHA would stop trials at
    # points that differ between the two runs).
    args = [str(FLUXTUNE), "search", str(SPEC), "--set", f"search.reuse_stages={str(reuse).lower()}",
            "--set", "search.scheduler={type: fifo}"]
    started = time.perf_counter()
    done = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    [sweep_json] = (workdir / "runs").glob("*/sweep.json")
    return json.loads(sweep_json.read_text()), wall


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for reuse in (False, True):
            sweep_json, wall = run_sweep(Path(tmp) / f"reuse-{reuse}", reuse)
            trials = list(sweep_json["trials"].values())
            rows.append((reuse, len(trials), sum(t["steps"] - t["reused_steps"] for t in trials),
                         sum(t["reused_steps"] for t in trials), min(t["val_loss"] for t in trials), wall))
    base_steps, base_wall = rows[0][2], rows[0][5]
    print("| reuse_stages | trials | steps trained | steps reused | steps vs off | best val_loss | wall s | wall vs off |")
    print("|---|---|---|---|---|---|---|---|")
    for reuse, n, steps, reused, best, wall in rows:
        print(f"| {str(reuse).lower()} | {n} | {steps} | {reused} | {steps / base_steps:.2f} | {best:.4f} | "
              f"{wall:.0f} | {wall / base_wall:.2f} |")


if __name__ == "__main__":
    main()
