"""benchmarks/gpu_check.sh, the prepared GPU check, in its CPU smoke mode: the same code path (real stages, DeepSpeed
ZeRO-2 over gloo, the plan beside each measurement) on tiny-fill, so the script is known to work before a GPU runs it.
On a GPU it is run by hand (BENCHMARKS.md), not by the test suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_measures_both_stages_beside_the_plan(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "FLUXTUNE_PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "fluxtune GPU check on CPU" in result.stdout
    rows = {row["stage"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"zero2", "lora"}
    for row in rows.values():
        assert row["preset"] == "tiny-fill" and row["step_s"] > 0 and row["samples_per_s"] > 0
        assert row["tflop_per_step"] > 0 and 0 < row["mfu"] < 1
        assert row["peak_gib"] > 0 and row["plan_gib"] > 0
        assert f"{row['stage']}:tiny-fill:32px:b2" in result.stdout


def test_gpu_check_refuses_a_machine_without_cuda_unless_smoke():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "FLUXTUNE_PYTHON": sys.executable})
    assert result.returncode != 0 and "no CUDA device" in result.stderr
