"""Latent cache vs encoding on the fly: build time, what a trial pays to get its data, and training steps/s.

Prints one table; compare rows as ratios (absolute seconds depend on the machine and its load).

    .venv/bin/python benchmarks/data_cache.py --n 64 --resolution 64 --steps 100

* cache build: first `ensure_cache` (Ray Data: decode tasks → VAE actor → Parquet; prompts likewise)
* cache lookup: the same call again (hash every file, find the manifest)
* per trial, on the fly: Ray Data decodes the JSONL's images, the worker loads the full model and encodes them
  (what a trial did before the cache, and what every epoch would cost without in-memory tensors)
* per trial, from cache: `read_parquet` → arrays → EncodedSet, transformer only
* steps/s: the same tiny-model training step (forward, backward, AdamW) on the EncodedSet encoded in memory and
  on the one read from the cache, interleaved in rounds so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


WARMUP_STEPS = 5


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _steps_per_s(transformer, data, steps: int, seed: int = 0) -> float:
    from fluxtune.flux.encoded import random_batches
    from fluxtune.flux.flow import flow_matching_loss

    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    batches = random_batches(data, 4, generator)
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

    from fluxtune.assemble import cached_encoded_set, encode_arrays, load_bundle, load_transformer
    from fluxtune.data.latent_cache import Preprocessing, cache_rows, ensure_cache
    from fluxtune.data.sample import write_sample_dataset
    from fluxtune.data.selection import select_rows
    from fluxtune.train.cluster import local_cpus, start_ray
    from fluxtune.train.datasets import build_datasets, collect

    data = {"resolution": args.resolution, "val_fraction": 0.0, "mask_threshold": 0.5}
    work = tempfile.mkdtemp(prefix="fluxtune-bench-")
    model = {"preset": "tiny-fill", "seed": 0} if args.vae == "tiny" else _full_size_vae_folder(work)
    jsonl = str(write_sample_dataset(os.path.join(work, "data"), n=args.n, resolution=args.resolution))
    start_ray(None, local_cpus(workers=1, cpus_per_worker=1.0, concurrent_trials=1))

    rows = cache_rows(select_rows(jsonl, {}))
    (cache, built), build_s = _timed(lambda: ensure_cache(rows, model, Preprocessing(args.resolution),
                                                          os.path.join(work, "cache")))
    assert built
    _, lookup_s = _timed(lambda: ensure_cache(cache_rows(select_rows(jsonl, {})), model,
                                              Preprocessing(args.resolution), os.path.join(work, "cache")))

    def on_the_fly():
        arrays = collect(build_datasets(jsonl, data, seed=0)["train"].iterator())
        bundle = load_bundle(model)
        return bundle.transformer, encode_arrays(bundle, arrays)

    def from_cache():
        datasets = build_datasets(str(cache.path), data, seed=0)
        rows_ = collect(datasets["train"].iterator())
        prompts = collect(datasets["prompts"].iterator())
        return load_transformer(model), cached_encoded_set(rows_, prompts, args.resolution)

    fly_s, cached_s = [], []
    for _ in range(args.rounds):
        (fly_model, fly_data), seconds = _timed(on_the_fly)
        fly_s.append(seconds)
        (cache_model, cache_data), seconds = _timed(from_cache)
        cached_s.append(seconds)
    assert fly_data.x0.shape == cache_data.x0.shape  # same tensors, exactly: tests/test_cache.py

    # One model for both, so only the data differs (two model instances differ in speed by allocation luck).
    in_memory, from_cached = [], []
    for _ in range(args.step_rounds):  # many short alternating rounds: load swings hit both sides alike
        in_memory.append(_steps_per_s(cache_model, fly_data, args.steps))
        from_cached.append(_steps_per_s(cache_model, cache_data, args.steps))

    fly, cached = statistics.median(fly_s), statistics.median(cached_s)
    memory_rate, cache_rate = statistics.median(in_memory), statistics.median(from_cached)
    print(f"\n{args.n} rows at {args.resolution}x{args.resolution}, {args.vae} VAE, {os.cpu_count()} CPUs, "
          f"medians of {args.rounds} data rounds and {args.step_rounds} step rounds\n")
    print("| measurement | value | ratio |")
    print("|---|---|---|")
    print(f"| cache build (first sweep, Ray Data) | {build_s:.2f} s | |")
    print(f"| cache lookup (later sweeps: hash files, read manifest) | {lookup_s:.2f} s | |")
    print(f"| data for one trial, encoded on the fly | {fly:.2f} s | 1.00 |")
    print(f"| data for one trial, read from the cache | {cached:.2f} s | {fly / cached:.2f}x faster |")
    print(f"| training steps/s, tensors encoded in memory | {memory_rate:.1f} | 1.00 |")
    print(f"| training steps/s, tensors read from the cache | {cache_rate:.1f} | {cache_rate / memory_rate:.3f} |")


if __name__ == "__main__":
    main()
