"""Step throughput of each stage inside a Ray Train worker vs a bare PyTorch loop, and the stage hand-over time.

    nice .venv/bin/python benchmarks/train_stage_throughput.py [--steps 100] [--repeats 3] [--deepspeed]

The bare loop runs in this process on the same encoded tensors, the same seed-0 tiny model, the same batch order,
noise and timesteps (the stage context's generator), AdamW and clipping — only without fluxtune around it. The
stage side is `run_cycle` (full → lora) inside one TorchTrainer worker with the same thread count; its
steps_per_s and step_cpu_s are measured by the stage over its step loop. Repeats interleave the two sides; on a
setup machine wall-clock throughput swings with other people's load, so CPU seconds per step (whole process,
one torch thread) is printed beside it and is the comparison to trust there. hand-over = the lora stage's transition_s: from the full stage's last step,
through evaluation, the stage checkpoint (safetensors) and LoRA set-up, to the lora stage's first step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

THREADS = 1  # one thread each side: CPU time per step is then a fair measure on a setup machine

SPEC = """
name: bench
base:
  eval_every: 100000
  stages:
    - {{name: full, type: full, steps: {steps}, strategy: {strategy}, deepspeed: {{bf16: false}},
       optimizer: {{lr: 1.0e-4}}}}
    - name: lora
      type: lora
      steps: {steps}
      optimizer: {{lr: 1.0e-3}}
      adapter: {{type: lora, rank: 16, alpha: 16, dropout: 0.0}}
"""


def sample_arrays(n: int = 40) -> dict[str, np.ndarray]:
    from fluxtune.data.images import load_example
    from fluxtune.data.rows import read_rows
    from fluxtune.data.sample import ensure_sample_dataset

    rows = read_rows(ensure_sample_dataset(n=64, resolution=64, seed=0))[:n]
    examples = [load_example(r, 64) for r in rows]
    return {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}


def prepare_run(arrays, steps: int, strategy: str, reporter):
    from fluxtune.components import loaded_components
    from fluxtune.config.load import load_search_text
    from fluxtune.worker_setup import build_worker_setup, encode_arrays, load_bundle

    _, base = load_search_text(SPEC.format(steps=steps, strategy=strategy))
    bundle = load_bundle(base["model"])
    train = encode_arrays(bundle, {k: v[:32] for k, v in arrays.items()})
    val = encode_arrays(bundle, {k: v[32:] for k, v in arrays.items()})
    setup = build_worker_setup(base, train, val, reporter, loaded_components(), torch.device("cpu"))
    return base, bundle, setup


class Recorder:
    def __init__(self):
        self.stage_ends = []

    def log(self, step, metrics):
        pass

    def evaluation(self, step, metrics):
        pass

    def stage_end(self, step, metrics, checkpoint_dir):
        self.stage_ends.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})


def bare_loop(arrays, steps: int) -> dict[str, float]:
    """The same steps with nothing around them: batches, loss, backward, clip, AdamW."""
    from fluxtune.cycle import _stream_seed
    from fluxtune.default_plugins.adapters import LoraAdapter, LoraParams
    from fluxtune.flux.encoded import random_batches
    from fluxtune.flux.flow import flow_matching_loss

    torch.set_num_threads(THREADS)
    _, bundle, setup = prepare_run(arrays, steps, "ddp", Recorder())
    model = bundle.transformer.train()
    out = {}
    for index, name in enumerate(("full", "lora")):
        if name == "full":
            trainable = list(model.parameters())
        else:
            trainable = LoraAdapter(LoraParams(rank=16, alpha=16, dropout=0.0)).attach(model)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        generator = torch.Generator().manual_seed(_stream_seed(setup, 0, index))
        batches = random_batches(setup.train, setup.batch_size, generator)
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(batches)
            x0 = batch["x0"]
            noise = torch.randn(x0.shape, generator=generator)
            t = setup.timesteps(x0.shape[0], generator, x0.shape[1])
            loss = flow_matching_loss(model, batch, noise, t, setup.guidance, setup.loss_fn)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out[name] = (steps / (time.perf_counter() - started), (time.process_time() - cpu_started) / steps)
    return out


def ray_worker_loop(config):
    import ray.train

    from fluxtune.cycle import run_cycle

    recorder = Recorder()
    base, bundle, setup = prepare_run(config["arrays"], config["steps"], config["strategy"], recorder)
    run_cycle(base, bundle.transformer, setup)
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(recorder.stage_ends))


def in_ray_train(arrays, steps: int, strategy: str, storage: str) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(storage) / f"stages-{time.time_ns()}.json"
    TorchTrainer(
        ray_worker_loop,
        train_loop_config={"arrays": arrays, "steps": steps, "strategy": strategy, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": THREADS}),
        run_config=RunConfig(name=f"bench-{time.time_ns()}", storage_path=storage),
    ).fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deepspeed", action="store_true", help="full stage under DeepSpeed ZeRO-2 (fp32) instead of DDP")
    args = parser.parse_args()

    import ray

    from fluxtune.train.cluster import start_ray

    strategy = "deepspeed" if args.deepspeed else "ddp"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    arrays = sample_arrays()
    start_ray(None, num_cpus=THREADS + 1)  # a spare CPU, as in a trial
    bare = {"full": [], "lora": []}  # (steps/s, CPU s per step) per repeat
    staged = {"full": [], "lora": []}
    handover, engine = [], []
    with tempfile.TemporaryDirectory() as storage:
        for _ in range(args.repeats):
            for name, value in bare_loop(arrays, args.steps).items():
                bare[name].append(value)
            ends = in_ray_train(arrays, args.steps, strategy, storage)
            for end in ends:
                staged[end["stage"]].append((end["steps_per_s"], end["step_cpu_s"]))
            handover.append(ends[1]["transition_s"])
            engine += [e["engine_start_s"] for e in ends if "engine_start_s" in e]
    ray.shutdown()
    print(f"\n{args.steps} steps per stage, batch 4 at 64² on tiny-fill, {THREADS} threads, best of {args.repeats}; "
          f"full stage strategy: {strategy}")
    print(f"{'stage':<6} {'bare steps/s':>13} {'stage steps/s':>14} {'ratio':>6} {'bare CPU ms/step':>17} "
          f"{'stage CPU ms/step':>18} {'ratio':>6}")
    for name in ("full", "lora"):
        b, s = max(v[0] for v in bare[name]), max(v[0] for v in staged[name])
        bc, sc = min(v[1] for v in bare[name]), min(v[1] for v in staged[name])
        print(f"{name:<6} {b:>13.1f} {s:>14.1f} {s / b:>6.3f} {bc * 1e3:>17.1f} {sc * 1e3:>18.1f} {bc / sc:>6.3f}")
    print("ratios: stage throughput / bare throughput (CPU: bare CPU per step / stage CPU per step)")
    if engine:
        print(f"DeepSpeed engine start (import + initialize + exact fp32 masters, inside the full stage before its "
              f"first step): best {min(engine):.2f} s")
    print(f"hand-over full → lora inside the trial: best {min(handover):.3f} s, "
          f"median {float(np.median(handover)):.3f} s (all: {', '.join(f'{h:.3f}' for h in handover)})")


if __name__ == "__main__":
    main()
