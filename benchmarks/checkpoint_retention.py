"""What a sweep leaves on disk: `searches/lora_rank.yaml` with `checkpoints: {keep: all}` and with the default
`keep: needed`, side by side; and what verifying a checkpoint's content hash costs.

Both sweeps run through the real CLI in a temporary folder, with the file's own settings (TPE, ASHA, stage
reuse); the figures come from the files left under `runs/<sweep>/` (bytes, transformer weight files) and the
registered version (MLflow's artifacts: does it hold a copy of its base?). Weight files are then scaled to
FLUX.1-Fill-dev (11.9 B parameters: 47.6 GB per fp32 checkpoint). The hash row times sha256 over a file of
`--hash-mib` MiB, read once from the page cache (the writer's case) and once after dropping it where allowed.

`--small` trains each stage a few steps at 32 px, FIFO (no ASHA rung to reach): the checkpoints (the tiny model's weights, whatever the
resolution or step count) and the files a sweep leaves are the same kind and size, in a fraction of the time.

    .venv/bin/python benchmarks/checkpoint_retention.py [--hash-mib 1024] [--skip-sweeps] [--small]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLUXTUNE = Path(sys.executable).with_name("fluxtune")
SPEC = Path(__file__).resolve().parents[1] / "searches" / "lora_rank.yaml"
FLUX_FP32_BYTES = 11_902_391_360 * 4
SMALL = {"resolution: 64, batch_size: 4": "resolution: 32, batch_size: 2", "eval_every: 20": "eval_every: 4",
         "steps: 40,": "steps: 4,", "      steps: 60\n": "      steps: 4\n",
         "{type: asha, grace_period: 60, reduction_factor: 2}": "{type: fifo}"}  # no rung in 8 steps


def tree(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors" and "transformer" in p.parts]
    return sum(p.stat().st_size for p in files), len(weights)


def run_sweep(workdir: Path, keep: str, small: bool) -> dict:
    workdir.mkdir(parents=True)
    spec = workdir / "lora_rank.yaml"
    text = SPEC.read_text()
    for old, new in (SMALL.items() if small else ()):
        assert old in text, old
        text = text.replace(old, new)
    spec.write_text(text + f"checkpoints: {{keep: {keep}}}\n")
    started = time.perf_counter()
    done = subprocess.run([str(FLUXTUNE), "search", str(spec)], cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    [sweep] = (workdir / "runs").glob("lora-rank-*")
    trials = len(list((sweep / "train").iterdir()))
    runs_bytes, weights = tree(sweep)
    registry_bytes, registry_weights = tree(workdir / "mlflow" / "artifacts")
    return {"keep": keep, "trials": trials, "bytes": runs_bytes, "weights": weights, "wall": wall,
            "registry_bytes": registry_bytes, "registry_weights": registry_weights}


def hash_rate(mib: int) -> tuple[float, float | None]:
    """GB/s of sha256 over a file: from the page cache, and from disk (None when caches cannot be dropped)."""
    from fluxtune.checkpoints import file_hash

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = Path(tmp) / "weights.bin"
        with open(path, "wb") as handle:
            for _ in range(mib):
                handle.write(os.urandom(1 << 20))
        rates = []
        for cold in (False, True):
            if cold:
                try:
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                except OSError:
                    rates.append(None)
                    continue
            started = time.perf_counter()
            file_hash(str(path))
            rates.append(mib * (1 << 20) / (time.perf_counter() - started) / 1e9)
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hash-mib", type=int, default=1024)
    parser.add_argument("--skip-sweeps", action="store_true")
    parser.add_argument("--small", action="store_true", help="a few steps per stage at 32 px (same checkpoints)")
    args = parser.parse_args()
    warm, cold = hash_rate(args.hash_mib)
    print("| sha256 over | GB/s | s per 24 GB (bf16) | s per 48 GB (fp32) |")
    print("|---|---|---|---|")
    for label, rate in (("page cache (as the writer hashes)", warm), ("disk (caches dropped)", cold)):
        if rate is not None:
            print(f"| {label} | {rate:.2f} | {24 / rate:.0f} | {48 / rate:.0f} |")
    if args.skip_sweeps:
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_sweep(Path(tmp) / keep, keep, args.small) for keep in ("all", "needed")]
    base = rows[0]["bytes"] / rows[0]["trials"]
    print()
    print("| checkpoints.keep | trials | runs/ bytes | bytes per trial | vs all | transformer weight files | "
          "FLUX.1-Fill-dev fp32 | registry bytes | weight files in registry | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_trial = r["bytes"] / r["trials"]
        print(f"| {r['keep']} | {r['trials']} | {r['bytes']:,} | {per_trial:,.0f} | {per_trial / base:.2f} | "
              f"{r['weights']} | {r['weights'] * FLUX_FP32_BYTES / 1e9:.0f} GB | {r['registry_bytes']:,} | "
              f"{r['registry_weights']} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
