"""Latent cache vs encoding on the fly: build time, what a trial pays to get its data, training steps/s, and what
storing the cache in float16 costs in validation loss.

Prints one table; compare rows as ratios (absolute seconds depend on the machine and its load).

    .venv/bin/python benchmarks/data_cache.py --n 64 --resolution 64 --steps 100

* cache build: first `ensure_cache` (Ray Data: decode tasks → VAE actor → Parquet; prompts likewise)
* cache lookup: the same call again (hash every file, find the manifest)
* per trial, on the fly: the worker decodes the JSONL's images, loads the full model and encodes them
  (what a trial would do without the cache, and what every epoch would cost without stored tensors)
* per trial, from cache: index the cache, read the bounded validation set, open the training stream (what a
  trial's worker does: `trial_data`), transformer only
* steps/s: the same tiny-model training step (forward, backward, AdamW) on the set encoded in memory and on
  batches streamed from the cache, interleaved in rounds so machine load hits both alike
* val_loss: the same weights (initial, and after --steps steps) scored on the validation rows of a float32 cache
  and of a float16 cache of the same data (the default stores float16)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch


WARMUP_STEPS = 5


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _steps_per_s(transformer, batches, steps: int, seed: int = 0) -> float:
    from fluxtune.flux.flow import flow_matching_loss

    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    mse = lambda pred, target, batch, t=None: (pred - target).pow(2).mean()  # noqa: E731
    start = 0.0
    for step in range(steps + WARMUP_STEPS):
        if step == WARMUP_STEPS:  # first steps allocate optimizer state and caches: not the steady rate
            start = time.perf_counter()
        batch = next(batches)
        noise = torch.randn(batch["x0"].shape, generator=generator)
        t = torch.rand(batch["x0"].shape[0], generator=generator)
        loss = flow_matching_loss(transformer, batch, noise, t, 30.0, mse)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def _val_loss(transformer, val, seed: int = 0) -> float:
    """The trials' validation loss (fixed noise and t, plain MSE) of `transformer` on these examples."""
    from fluxtune.context import _mse
    from fluxtune.flux.encoded import ValidationSet
    from fluxtune.flux.flow import flow_matching_loss

    total, count = 0.0, 0
    with torch.no_grad():
        for batch, noise, t in ValidationSet.build(val, seed).batches(8):
            total += float(flow_matching_loss(transformer, batch, noise, t, 30.0, _mse)) * len(t)
            count += len(t)
    return total / count


# FLUX.1-dev vae/config.json (architecture only; weights are random here, nothing is downloaded).
FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}


def _full_size_vae_folder(work: str) -> dict:
    """A model folder: the tiny transformer and text encoders with a full-size FLUX VAE."""
    from diffusers import AutoencoderKL

    from fluxtune.flux.model import build_tiny_fill, save_bundle

    bundle = build_tiny_fill(seed=0)
    torch.manual_seed(0)
    bundle.vae = AutoencoderKL(**FLUX_VAE).requires_grad_(False).eval()
    folder = os.path.join(work, "model")
    save_bundle(bundle, folder)
    return {"path": folder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the per-trial data timings")
    parser.add_argument("--step-rounds", type=int, default=20, help="alternating rounds of --steps steps each")
    parser.add_argument("--vae", choices=["tiny", "full"], default="tiny",
                        help="full: FLUX.1's real VAE architecture (84 M params, random weights), so encoding "
                             "costs what it costs with the real model")
    args = parser.parse_args()

    from fluxtune.data.images import load_examples_batch
    from fluxtune.data.latent_cache import Preprocessing, cache_rows, ensure_cache
    from fluxtune.data.rows import read_rows
    from fluxtune.data.sample import write_sample_dataset
    from fluxtune.data.selection import select_rows
    from fluxtune.flux.encoded import random_batches
    from fluxtune.train.cluster import local_cpus, start_ray
    from fluxtune.train.datasets import trial_data
    from fluxtune.worker_setup import encode_arrays, load_bundle, load_transformer

    data = {"resolution": args.resolution, "val_fraction": 0.25, "mask_threshold": 0.5}
    work = tempfile.mkdtemp(prefix="fluxtune-bench-")
    model = {"preset": "tiny-fill", "seed": 0} if args.vae == "tiny" else _full_size_vae_folder(work)
    jsonl = str(write_sample_dataset(os.path.join(work, "data"), n=args.n, resolution=args.resolution))
    start_ray(None, local_cpus(workers=1, cpus_per_worker=1.0, concurrent_trials=1))

    rows = cache_rows(select_rows(jsonl, {}))
    home = os.path.join(work, "cache")
    (cache, built), build_s = _timed(lambda: ensure_cache(rows, model, Preprocessing(args.resolution), home))
    assert built
    _, lookup_s = _timed(lambda: ensure_cache(cache_rows(select_rows(jsonl, {})), model,
                                              Preprocessing(args.resolution), home))
    (full, _), _ = _timed(lambda: ensure_cache(rows, model, Preprocessing(args.resolution, dtype="float32"), home))
    experiment = {"seed": 0, "model": model, "data": data}

    def on_the_fly():
        listed = read_rows(jsonl)
        decoded = load_examples_batch({"image": [r.image for r in listed], "mask": [r.mask for r in listed],
                                       "output": [r.output for r in listed]}, args.resolution)
        decoded["prompt"] = np.array([r.prompt or "" for r in listed], dtype=object)
        bundle = load_bundle(model)
        return bundle.transformer, encode_arrays(bundle, decoded)

    def from_cache():
        stream, val = trial_data(str(cache.path), experiment)
        return load_transformer(model), stream

    fly_s, cached_s = [], []
    for _ in range(args.rounds):
        (fly_model, fly_data), seconds = _timed(on_the_fly)
        fly_s.append(seconds)
        (cache_model, stream), seconds = _timed(from_cache)
        cached_s.append(seconds)

    # One model for both, so only the data differs (two model instances differ in speed by allocation luck).
    in_memory, streamed = [], []
    for r in range(args.step_rounds):  # many short alternating rounds: load swings hit both sides alike
        in_memory.append(_steps_per_s(cache_model, random_batches(fly_data, 4, torch.Generator().manual_seed(r)),
                                      args.steps))
        streamed.append(_steps_per_s(cache_model, stream.batches(4, r), args.steps))

    # float16 vs float32 cache: the same validation rows, the same weights.
    _, val16 = trial_data(str(cache.path), experiment)
    full32, val32 = trial_data(str(full.path), {**experiment, "data": {**data, "cache_dtype": "float32"}})
    fresh = load_transformer(model)
    losses = [(_val_loss(fresh, val32), _val_loss(fresh, val16))]
    _steps_per_s(fresh, full32.batches(4, 0), args.steps)  # trained on the float32 cache
    losses.append((_val_loss(fresh, val32), _val_loss(fresh, val16)))

    fly, cached = statistics.median(fly_s), statistics.median(cached_s)
    memory_rate, stream_rate = statistics.median(in_memory), statistics.median(streamed)
    print(f"\n{args.n} rows at {args.resolution}x{args.resolution}, {args.vae} VAE, {os.cpu_count()} CPUs, "
          f"medians of {args.rounds} data rounds and {args.step_rounds} step rounds\n")
    print("| measurement | value | ratio |")
    print("|---|---|---|")
    print(f"| cache build (first sweep, Ray Data) | {build_s:.2f} s | |")
    print(f"| cache lookup (later sweeps: hash files, read manifest) | {lookup_s:.2f} s | |")
    print(f"| data for one trial, encoded on the fly | {fly:.2f} s | 1.00 |")
    print(f"| data for one trial, from the cache (index, validation set, stream) | {cached:.2f} s | "
          f"{fly / cached:.2f}x faster |")
    print(f"| training steps/s, tensors encoded in memory | {memory_rate:.1f} | 1.00 |")
    print(f"| training steps/s, batches streamed from the cache | {stream_rate:.1f} | {stream_rate / memory_rate:.3f} |")
    for label, (loss32, loss16) in zip(("initial weights", f"after {args.steps} steps"), losses):
        print(f"| val_loss, {label}: float32 cache / float16 cache | {loss32:.6f} / {loss16:.6f} | "
              f"{abs(loss16 - loss32) / loss32:.1e} relative |")


if __name__ == "__main__":
    main()
