"""The GPU check: step time, samples/s, MFU and peak memory of the real-width proxies, beside `fluxtune plan`.

Run by benchmarks/gpu_check.sh (which sets up the machine's Python). For each proxy (proxy-fill, -4, -8) it runs the
real `full` stage (DeepSpeed ZeRO-2 bf16; once more with gradient checkpointing) and the real `lora` stage (frozen
bf16 base) at 512 and 1024 px on one GPU, over random latents: WARMUP steps, then TIMED steps timed between device
synchronisations. Peak memory is torch.cuda.max_memory_allocated over the steps (reset at the first forward, so
model building and engine start are not counted), read at the last step (the hand-off after it is not either).
MFU = the plan's FLOPs per step ÷ step time ÷ 989 TFLOP/s (dense bf16, H100/H200).

--smoke runs the same code on the CPU on tiny-fill at 32 px (DeepSpeed with DS_ACCELERATOR=cpu over gloo): what the
tests run, so the script is known to work the day a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

WARMUP, TIMED = 3, 5


def cases(smoke: bool) -> list[dict]:
    if smoke:
        return [dict(preset="tiny-fill", stage=s, resolution=32, batch=2) for s in ("zero2", "lora")]
    out = []
    for preset in ("proxy-fill", "proxy-fill-4", "proxy-fill-8"):
        for stage in ("zero2", "lora"):
            out += [dict(preset=preset, stage=stage, resolution=512, batch=2),
                    dict(preset=preset, stage=stage, resolution=1024, batch=1)]
    out.append(dict(preset="proxy-fill-8", stage="zero2-ckpt", resolution=1024, batch=1))
    return out


class Weights:
    """Each preset's initial weights, made once (seeded, on the CPU in fp32: the slow part) and copied into a fresh
    transformer in the case's dtype on the device for every case (DeepSpeed and peft change the module they get)."""

    def __init__(self):
        self.name, self.state = None, None

    def transformer(self, name: str, dtype, device):
        import torch
        from diffusers import FluxTransformer2DModel

        from fluxtune.flux.model import build_preset
        from fluxtune.flux.presets import preset

        if name != self.name:
            self.name, self.state = None, None  # free the previous preset's weights first
            self.state = build_preset(name, parts=("transformer",)).transformer.state_dict()
            self.name = name
        with torch.device("meta"):
            model = FluxTransformer2DModel(**preset(name).transformer)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in self.state.items()}, assign=True)
        return model.train()


def run_case(case: dict, device, warmup: int, timed: int, weights: Weights) -> dict:
    import torch

    from fluxtune.config.load import load_search_text
    from fluxtune.flux.presets import preset
    from fluxtune.plan import mfu, plan_stages
    from stage_runs import experiment_yaml, run_stage

    steps = warmup + timed
    _, base = load_search_text(experiment_yaml(case["stage"], case["preset"], case["resolution"], case["batch"], steps))
    spec = preset(case["preset"])
    plan = plan_stages(base, spec.transformer, gpus=1, text_tokens=spec.t5_max_length, device=device.type)[0]
    cuda = device.type == "cuda"
    # the dtype policy: bf16 module under DeepSpeed bf16, frozen bf16 base for LoRA on GPU; fp32 on the CPU
    dtype = torch.bfloat16 if cuda else torch.float32
    transformer = weights.transformer(case["preset"], dtype, device)
    memory = Peak(cuda)
    transformer.register_forward_pre_hook(lambda module, args: memory.start())
    with memory:
        _, ends = run_stage(base, transformer, device, on_step=lambda step: memory.read(step == steps - 1))
    seconds = (ends[-1] - ends[warmup]) / timed  # ends[k]: the end of step k - 1 (ends[0]: the stage's start)
    del transformer
    if cuda:
        torch.cuda.empty_cache()
    return {**case, "step_s": seconds, "samples_per_s": case["batch"] / seconds,
            "mfu": mfu(plan.flops, seconds), "peak_gib": memory.peak / 2**30, "plan_gib": plan.total,
            "plan_moment": plan.moment, "tflop_per_step": plan.flops / 1e12}


class Peak:
    """Peak allocated bytes from the first forward to the last step: CUDA's counter, or live tensors on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.started, self.peak = cuda, False, 0
        if not cuda:
            from tensor_memory import TensorMemory

            self.tracker = TensorMemory()

    def __enter__(self):
        if not self.cuda:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.cuda:
            self.tracker.__exit__(*exc)

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.tracker.reset_peak("training")

    def read(self, last: bool) -> None:
        if last:
            if self.cuda:
                import torch

                self.peak = torch.cuda.max_memory_allocated()
            else:
                self.peak = self.tracker.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny-fill, 32 px: checks the script")
    parser.add_argument("--only", default="", help="run cases whose name contains this (e.g. proxy-fill-8)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if not args.smoke and not torch.cuda.is_available():  # before the model stack's imports: refused at once
        raise SystemExit("no CUDA device: run with --smoke on a CPU machine")
    from stage_runs import init_single_process_group

    device = torch.device("cpu" if args.smoke else "cuda")
    from fluxtune.flux.model import use_reliable_attention

    use_reliable_attention(device)  # as the Train workers do
    init_single_process_group("gloo" if args.smoke else "nccl")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    warmup, timed = (1, 2) if args.smoke else (WARMUP, TIMED)
    print(f"fluxtune GPU check on {name}, torch {torch.__version__}: {warmup} warm-up + {timed} timed steps per case")
    print(f"{'case':38} {'step s':>8} {'samples/s':>10} {'TFLOP':>8} {'MFU':>6} {'peak GiB':>9} {'plan GiB':>9} "
          f"{'plan/peak':>9}")
    results, started, weights = [], time.perf_counter(), Weights()
    for case in cases(args.smoke):
        label = f"{case['stage']}:{case['preset']}:{case['resolution']}px:b{case['batch']}"
        if args.only not in label:
            continue
        result = run_case(case, device, warmup, timed, weights)
        results.append(result)
        print(f"{label:38} {result['step_s']:8.3f} {result['samples_per_s']:10.2f} {result['tflop_per_step']:8.2f} "
              f"{result['mfu'] * 100:5.1f}% {result['peak_gib']:9.3f} {result['plan_gib']:9.3f} "
              f"{result['plan_gib'] / result['peak_gib']:9.2f}", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
