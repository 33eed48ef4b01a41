"""What a trial's processes cost: a one-trial `fluxtune search` (tiny model, full → lora, 8 steps, the latent cache
reused), with every process's CPU (utime + stime) sampled from /proc, shipped against Ray Train's own helper actors.

`ray-defaults` puts back what fluxtune leaves out of a trial on its local cluster: the preemption watcher
(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1) and the DatasetManager (a `sitecustomize` that makes
`fluxtune.train.ray_private.torch_trainer` a plain TorchTrainer in every process). The two alternate, run after run,
on one machine; prints each run, the medians and their ratio, and the Ray actors each variant started.

    .venv/bin/python benchmarks/trial_processes.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

FLUXTUNE = Path(sys.executable).with_name("fluxtune")
SPEC = """\
name: bench
base:
  data: {jsonl: sample, resolution: 32, batch_size: 2, sample_size: 16}
  eval_every: 2
  stages:
    - {name: full, type: full, steps: 4, optimizer: {lr: 1.0e-3}}
    - {name: lora, type: lora, steps: 4, adapter: {type: lora, rank: 4}}
search:
  num_samples: 1
  sampler: {type: random, seed: 3}
  space:
    stages.lora.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
tracking: {experiment: bench}
"""
RAY_DEFAULTS = """\
import fluxtune.train.ray_private as fence


def _plain(*args, **kwargs):
    from ray.train.torch import TorchTrainer

    return TorchTrainer(*args, **kwargs)


fence.torch_trainer = _plain
"""


class ProcessCpu:
    """Every process that appears while it runs: its last CPU seconds and its last command line (Ray renames
    its workers `ray::<Actor>` once they hold one)."""

    def __init__(self):
        self.seen: dict[tuple[int, int], list] = {}
        self.before = {p.name for p in Path("/proc").iterdir() if p.name.isdigit()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(1)
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or entry.name in self.before:
                    continue
                try:
                    stat = (entry / "stat").read_text()
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                cpu = (int(fields[11]) + int(fields[12])) / self._tick
                self.seen[(int(entry.name), int(fields[19]))] = [cpu, command or self.seen.get(
                    (int(entry.name), int(fields[19])), [0, ""])[1]]
            time.sleep(0.2)

    def total(self) -> float:
        return sum(cpu for cpu, _ in self.seen.values())

    def actors(self) -> Counter:
        return Counter(command.split()[0].split("(")[0].split(".")[0] for _, command in self.seen.values()
                       if command.startswith("ray::") and not command.startswith("ray::IDLE"))


def run(work: Path, env: dict[str, str]) -> tuple[float, float, Counter]:
    for folder in ("runs", "mlflow"):
        subprocess.run(["rm", "-rf", str(work / folder)], check=True)
    started = time.perf_counter()
    with ProcessCpu() as sampled:
        done = subprocess.run([str(FLUXTUNE), "search", "sweep.yaml"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return sampled.total(), time.perf_counter() - started, sampled.actors()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fluxtune-bench-"))
    (work / "sweep.yaml").write_text(SPEC)
    patch = work / "ray-defaults"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(RAY_DEFAULTS)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    variants = {"shipped": base,
                "ray-defaults": {**base, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
                                 "PYTHONPATH": os.pathsep.join(filter(None, [str(patch), base.get("PYTHONPATH")]))}}
    run(work, base)  # warm: the sample data and its latent cache
    results: dict[str, list] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, env in variants.items():
            cpu, wall, actors = run(work, env)
            results[name].append((cpu, wall, actors))
            print(f"run {repeat + 1} {name:12s} CPU {cpu:5.1f} s  wall {wall:5.1f} s", flush=True)
    medians = {name: statistics.median(cpu for cpu, _, _ in rows) for name, rows in results.items()}
    for name, rows in results.items():
        print(f"{name:12s} median CPU {medians[name]:5.1f} s, wall {statistics.median(w for _, w, _ in rows):5.1f}"
              f" s; Ray actors: {dict(sorted(rows[-1][2].items()))}")
    print(f"shipped / ray-defaults CPU: {medians['shipped'] / medians['ray-defaults']:.3f}")


if __name__ == "__main__":
    main()
