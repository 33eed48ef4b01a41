"""Streaming the latent cache vs holding it in memory, as the rows grow: a trial's peak worker RSS and steps/s.

Every run is a real trial worker group (`trainer_for(...).fit()`, one Ray Train worker, tiny model) reading a
latent cache of N generated rows at --resolution: 64 sample examples encoded once, repeated under new line numbers
and split keys, in Parquet files of --rows-per-file rows (a size-N cache links the first files of one generated
cache). `stream` is what trials do; `memory` loads the worker's rows whole first (the path trials took before
streaming, kept for this comparison). Peak RSS: the high-water mark (VmHWM) of this cluster's RayTrainWorker
processes, polled while the trial runs. steps/s: the trial's own stage metric, stream and memory alternating in
--rounds rounds at the smallest size, medians; and, less exposed to machine load (no Ray start-up between the
two), the same training step in this process on one model, stream and memory alternating in --step-rounds short
rounds of --round-steps steps.

    nice -n 10 .venv/bin/python benchmarks/data_scale.py --sizes 1000,2000,5000,10000,20000 --memory-sizes 1000,2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np

SPEC = """
name: scale
base:
  data: {{resolution: {resolution}, batch_size: 4, val_fraction: 0.02}}
  eval_every: 100000
  sample_every: 100000
  stages: [{{name: full, type: full, steps: {steps}, optimizer: {{lr: 1.0e-4}}}}]
"""


def encoded_examples(resolution: int, count: int, work: str):
    """`count` sample examples encoded with the tiny model's VAE and text encoders (in this process)."""
    from fluxtune.data.images import load_example
    from fluxtune.data.rows import read_rows
    from fluxtune.data.sample import write_sample_dataset
    from fluxtune.worker_setup import encode_arrays, load_bundle

    rows = read_rows(write_sample_dataset(os.path.join(work, "sample"), n=count, resolution=resolution))
    examples = [load_example(r, resolution) for r in rows]
    arrays = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}
    arrays["prompt"] = np.array([r.prompt or "" for r in rows], dtype=object)
    return encode_arrays(load_bundle({"preset": "tiny-fill", "seed": 0}), arrays)


def write_generated_cache(encoded, total: int, rows_per_file: int, resolution: int, folder: str) -> None:
    """A cache of `total` rows repeating the encoded examples, in files of `rows_per_file` rows."""
    from fluxtune.data.cache_format import prompts_table, rows_table, write_parquet
    from fluxtune.data.latent_cache import CACHE_FORMAT, Preprocessing

    x0, cond = encoded.x0.numpy(), encoded.cond.numpy()
    for number, start in enumerate(range(0, total, rows_per_file)):
        lines = np.arange(start, min(start + rows_per_file, total)) + 1
        source = (lines - 1) % len(x0)
        batch = {"line": lines, "split_key": [f"generated/{line:07d}.png" for line in lines],
                 "from_val_file": np.zeros(len(lines), bool), "prompt_index": encoded.prompt_index.numpy()[source],
                 "x0": list(x0[source]), "cond": list(cond[source])}
        write_parquet(rows_table(batch, "float16", resolution), f"{folder}/rows/part-{number:05d}.parquet")
    prompts = {"prompt_index": np.arange(len(encoded.prompt_embeds)), "prompt": [""] * len(encoded.prompt_embeds),
               "prompt_embeds": list(encoded.prompt_embeds.numpy()), "pooled": list(encoded.pooled.numpy())}
    write_parquet(prompts_table(prompts, "float16"), f"{folder}/prompts/part-00000.parquet")
    Path(folder, "manifest.json").write_text(__import__("json").dumps({
        "format": CACHE_FORMAT, "key": f"generated-{total}", "rows": total, "val_file_rows": 0,
        "prompts": len(encoded.prompt_embeds), "model": {"spec": {"preset": "tiny-fill", "path": None, "seed": 0}},
        "preprocessing": Preprocessing(resolution).identity(), "vae_scale_factor": 8, "dtype": "float16"}))


def cache_of_size(generated: str, rows: int, rows_per_file: int, folder: str) -> str:
    """The first rows of the generated cache as a cache of its own (its files linked, not copied)."""
    import json

    os.makedirs(f"{folder}/rows")
    for number in range(-(-rows // rows_per_file)):
        os.symlink(f"{generated}/rows/part-{number:05d}.parquet", f"{folder}/rows/part-{number:05d}.parquet")
    os.symlink(f"{generated}/prompts", f"{folder}/prompts")
    manifest = json.loads(Path(generated, "manifest.json").read_text())
    Path(folder, "manifest.json").write_text(json.dumps({**manifest, "rows": rows, "key": f"generated-{rows}"}))
    return folder


class PeakWorkerRss:
    """Polls the peak RSS (VmHWM) of the RayTrainWorker processes of one local Ray cluster (by session)."""

    def __init__(self, session: int):
        self.session, self.peak_kib, self._stop = session, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakWorkerRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        from fluxtune.train.local_ray import session_pids

        while not self._stop.wait(0.1):
            for pid in session_pids(self.session):
                try:
                    if b"RayTrainWorker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
                self.peak_kib = max(self.peak_kib, hwm)


def run_trial(base: dict, cache: str, reader: str, session: int, storage: str, name: str) -> dict:
    from fluxtune.plugins import plugin_set
    from fluxtune.train.trial import TrialSettings, trainer_for

    settings = TrialSettings(sweep_id="scale", base=base, jsonl=cache, storage_path=storage, plugins=plugin_set())
    started = time.perf_counter()
    with PeakWorkerRss(session) as rss:
        result = trainer_for(base, settings, name, data_reader=reader).fit()
    return {"peak_mib": rss.peak_kib / 1024, "steps_per_s": result.metrics["steps_per_s"],
            "step_cpu_ms": 1000 * result.metrics["step_cpu_s"], "wall_s": time.perf_counter() - started}


def random_examples(resolution: int, count: int):
    """`count` examples of random tensors shaped like the tiny model's (no VAE, no text encoders: machines
    without them, e.g. the GPU check)."""
    from types import SimpleNamespace

    import torch

    from fluxtune.flux import presets

    generator = torch.Generator().manual_seed(0)
    tokens, width = (resolution // 16) ** 2, presets.TINY_FILL_TRANSFORMER["joint_attention_dim"]
    return SimpleNamespace(x0=torch.randn(count, tokens, 64, generator=generator),
                           cond=torch.randn(count, tokens, 320, generator=generator),
                           prompt_index=torch.zeros(count, dtype=torch.long),
                           prompt_embeds=torch.randn(1, presets.TINY_T5_MAX_LENGTH, width, generator=generator),
                           pooled=torch.randn(1, presets.TINY_FILL_TRANSFORMER["pooled_projection_dim"],
                                              generator=generator))


def in_process_steps_per_s(cache: str, base: dict, rounds: int, steps: int, device: str = "cpu"
                           ) -> dict[str, tuple[float, float]]:
    """{reader: (median steps/s, median CPU ms per step)} of one model trained in this process, stream and memory
    alternating in short rounds. CPU time per step (the whole process: the stream's reading thread included) is
    the figure a loaded machine disturbs least."""
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxtune.flux import presets
    from fluxtune.flux.encoded import random_batches
    from fluxtune.flux.flow import flow_matching_loss
    from fluxtune.train.datasets import trial_data

    if device == "cpu":
        torch.set_num_threads(1)  # what a 1-CPU Ray worker gets
    device = torch.device(device)
    stream, _ = trial_data(cache, base)
    stream.to(device)
    memory, _ = trial_data(cache, base, reader="memory")
    memory = memory.to(device)  # the in-memory path holds its tensors on the device
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**presets.TINY_FILL_TRANSFORMER).to(device).train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-4)
    mse = lambda pred, target, batch: (pred - target).pow(2).mean()  # noqa: E731

    def rate(batches) -> tuple[float, float]:
        generator = torch.Generator(device=device).manual_seed(0)
        next(batches)  # the stream's first batch waits for its shuffle buffer: once per stage, not per step
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(batches)
            noise = torch.randn(batch["x0"].shape, generator=generator, device=device)
            t = torch.rand(batch["x0"].shape[0], generator=generator, device=device)
            loss = flow_matching_loss(transformer, batch, noise, t, 30.0, mse)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - started), 1000 * (time.process_time() - cpu_started) / steps

    rates: dict[str, list[tuple[float, float]]] = {"stream": [], "memory": []}
    for r in range(rounds):
        rates["stream"].append(rate(stream.batches(4, r)))
        rates["memory"].append(rate(random_batches(memory, 4, torch.Generator(device=device).manual_seed(r))))
    return {reader: (statistics.median(x for x, _ in values), statistics.median(y for _, y in values))
            for reader, values in rates.items()}


def same_batches_on(cache: str, base: dict, device: str, count: int = 3) -> bool:
    """Whether the stream gives the same batches on `device` as on the CPU."""
    import torch

    from fluxtune.train.datasets import trial_data

    here, _ = trial_data(cache, base)
    there, _ = trial_data(cache, base)
    there.to(torch.device(device))
    for a, b in zip(list(islice(here.batches(4, 1), count)), list(islice(there.batches(4, 1), count))):
        if set(a) != set(b) or not all(torch.equal(a[k], b[k].cpu()) for k in a):
            return False
        if b["x0"].device.type != torch.device(device).type:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000,20000")
    parser.add_argument("--memory-sizes", default="1000,2000", help="sizes also run with the in-memory reader")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="alternating stream/memory rounds for steps/s")
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--step-rounds", type=int, default=20, help="in-process alternating rounds for steps/s")
    parser.add_argument("--round-steps", type=int, default=50)
    parser.add_argument("--device", default="cpu", help="device of the in-process rounds (cuda: a GPU check)")
    parser.add_argument("--no-trials", action="store_true", help="only the in-process rounds (no Ray needed)")
    parser.add_argument("--random-rows", action="store_true",
                        help="random tensors instead of encoded sample images (no VAE or text encoders needed)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    memory_sizes = [int(s) for s in args.memory_sizes.split(",") if s]

    if args.no_trials:  # no Ray, no component table: the experiment keys the data path reads
        base = {"seed": 0, "model": {"preset": "tiny-fill", "seed": 0},
                "data": {"resolution": args.resolution, "batch_size": 4, "val_fraction": 0.02}}
    else:
        from fluxtune.config.load import load_search_text
        from fluxtune.train.cluster import start_ray

        _, base = load_search_text(SPEC.format(resolution=args.resolution, steps=args.steps))
    work = tempfile.mkdtemp(prefix="fluxtune-scale-")
    try:
        generated = f"{work}/generated"
        started = time.perf_counter()
        examples = (random_examples if args.random_rows else
                    lambda resolution, count: encoded_examples(resolution, count, work))(args.resolution, 64)
        write_generated_cache(examples, max(sizes), args.rows_per_file, args.resolution, generated)
        print(f"generated {max(sizes)} rows in {time.perf_counter() - started:.0f} s", flush=True)
        smallest = min(sizes)
        if args.no_trials:
            cache = cache_of_size(generated, smallest, args.rows_per_file, f"{work}/cache-{smallest}")
            if args.device != "cpu":
                print(f"stream batches on {args.device} equal those on the CPU: "
                      f"{same_batches_on(cache, base, args.device)}", flush=True)
            rates = in_process_steps_per_s(cache, base, args.step_rounds, args.round_steps, args.device)
            print(f"\n{smallest} rows at {args.resolution}x{args.resolution}, tiny model, batch 4, {args.device}, "
                  f"{args.step_rounds} alternating rounds of {args.round_steps} steps (medians)")
            for reader, (rate, cpu_ms) in rates.items():
                print(f"| {reader} | {rate:.1f} steps/s | {cpu_ms:.2f} CPU ms per step |")
            print(f"steps/s stream / memory: {rates['stream'][0] / rates['memory'][0]:.3f}")
            return
        local = start_ray(None, 2)
        results: dict[tuple[int, str], list[dict]] = {}
        for size in sizes:
            cache = cache_of_size(generated, size, args.rows_per_file, f"{work}/cache-{size}")
            for reader in ["stream"] + (["memory"] if size in memory_sizes else []):
                results.setdefault((size, reader), []).append(
                    run_trial(base, cache, reader, local.session, f"{work}/runs", f"{reader}-{size}"))
                print(size, reader, results[(size, reader)][-1], flush=True)
        for r in range(args.rounds - 1):  # more alternating rounds for steps/s at the smallest size
            for reader in ("stream", "memory"):
                results[(smallest, reader)].append(run_trial(base, f"{work}/cache-{smallest}", reader, local.session,
                                                             f"{work}/runs", f"{reader}-{smallest}-{r}"))
                print(smallest, reader, results[(smallest, reader)][-1], flush=True)
        in_process = in_process_steps_per_s(f"{work}/cache-{smallest}", base, args.step_rounds, args.round_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(size: int, reader: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(size, reader)])

    base_rss = median(smallest, "stream", "peak_mib")
    print(f"\ntiny model, {args.resolution}x{args.resolution}, batch 4, {args.steps} steps, 1 Ray Train worker, "
          f"{os.cpu_count()} CPUs; medians (steps/s at {smallest} rows over {args.rounds} alternating rounds)\n")
    print("| rows | reader | peak worker RSS MiB | RSS vs stream at smallest | steps/s | step CPU ms |")
    print("|---|---|---|---|---|---|")
    for (size, reader) in results:
        print(f"| {size} | {reader} | {median(size, reader, 'peak_mib'):.0f} | "
              f"{median(size, reader, 'peak_mib') / base_rss:.2f} | {median(size, reader, 'steps_per_s'):.1f} | "
              f"{median(size, reader, 'step_cpu_ms'):.1f} |")
    tenfold = [s for s in sizes if s >= 10 * smallest]
    if tenfold:
        growth = median(tenfold[0], "stream", "peak_mib") / base_rss - 1
        print(f"\nstream RSS growth over {tenfold[0] // smallest}x the rows: {growth:+.1%} (goal ≤ +15%)")
    if (smallest, "memory") in results:
        ratio = median(smallest, "stream", "steps_per_s") / median(smallest, "memory", "steps_per_s")
        print(f"steps/s stream / memory at {smallest} rows, in trials: {ratio:.3f} (goal ≥ 0.95)")
    (stream_rate, stream_cpu), (memory_rate, memory_cpu) = in_process["stream"], in_process["memory"]
    print(f"in one process at {smallest} rows ({args.step_rounds} alternating rounds of {args.round_steps} steps): "
          f"steps/s stream / memory {stream_rate:.1f} / {memory_rate:.1f} = {stream_rate / memory_rate:.3f}; "
          f"CPU ms per step {stream_cpu:.2f} / {memory_cpu:.2f}, i.e. steps per CPU-second "
          f"{memory_cpu / stream_cpu:.3f} (goal ≥ 0.95)")


if __name__ == "__main__":
    main()
