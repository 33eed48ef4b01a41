"""Host memory of the stage hand-off at FLUX.1's real width: before (a fresh fp32 model per rank, save_pretrained)
against now (a bf16 live model, the canonical fp32 values streamed from the last checkpoint, a LoRA delta added,
the next checkpoint written tensor by tensor).

Each case runs in its own process; the figure is its peak resident memory above what the process held once the
live model existed, so the ratio compares the transient cost of the two hand-offs side by side.

    python benchmarks/weights_handoff.py [--single-blocks 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import fluxtune  # noqa: F401  (first: it keeps bitsandbytes' import-time kernel warning out of the output)

# FLUX.1-Fill-dev's widths (3072 hidden, 4096 T5, 768 CLIP, 384 input channels) with few blocks.
CONFIG = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=0, num_single_layers=1,
              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
              guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def start_measuring() -> float:
    """Reset the peak resident size (Linux clear_refs 5) and return the current one, in MiB."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def extra_since(baseline: float) -> float:
    return _status("VmHWM") - baseline


def build(config: dict, dtype):
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxtune.canonical import cast

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cast(FluxTransformer2DModel(**config), dtype)


def case_before(config: dict, folder: Path) -> dict:
    """What the DeepSpeed stage end did: every rank built a fresh fp32 model from the full masters, rank 0 saved
    it with save_pretrained."""
    import torch

    live = build(config, torch.bfloat16)
    baseline = start_measuring()
    masters = {n: p.detach().float() + 1e-3 for n, p in live.named_parameters()}  # the gathered fp32 values
    fresh = type(live).from_config(live.config)
    fresh.load_state_dict(masters)
    del masters
    fresh.save_pretrained(folder / "before", safe_serialization=True)
    return {"extra_mib": extra_since(baseline)}


def case_now(config: dict, folder: Path) -> dict:
    """Now: the live model stays bf16; the last checkpoint (fp32, on disk) is read one tensor at a time, a LoRA
    delta added, and the next checkpoint streamed out."""
    import torch

    from fluxtune.canonical import LiveWeights, MergedWeights, SavedWeights, cast, save_weights_folder, shapes
    from fluxtune.checkpoints import Progress, write_stage_checkpoint

    live = build(config, torch.float32)
    save_weights_folder(folder / "previous", live, LiveWeights(live).tensors())  # the previous checkpoint
    live = cast(live, torch.bfloat16)
    rank = 64
    deltas = {}
    for name, p in live.named_parameters():
        if p.dim() == 2 and "attn" in name:
            b, a = torch.randn(p.shape[0], rank) * 1e-3, torch.randn(rank, p.shape[1]) * 1e-3
            deltas[name] = (lambda b=b, a=a: b @ a)
    baseline = start_measuring()
    merged = MergedWeights(SavedWeights(folder / "previous", shapes(live), torch.device("cpu")), deltas)
    write_stage_checkpoint(folder / "now", live, Progress(), "lora", None, {}, weights=merged.tensors())
    return {"extra_mib": extra_since(baseline)}


def run_case(name: str, config: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, __file__, "--case", name, "--folder", folder,
                              "--config", json.dumps(config)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--single-blocks", type=int, default=1)
    parser.add_argument("--case")
    parser.add_argument("--folder")
    parser.add_argument("--config")
    args = parser.parse_args()
    if args.case:
        case = {"before": case_before, "now": case_now}[args.case]
        print(json.dumps(case(json.loads(args.config), Path(args.folder))))
        return
    config = {**CONFIG, "num_single_layers": args.single_blocks}
    import torch

    params = sum(p.numel() for p in build(config, torch.bfloat16).parameters())
    before, now = run_case("before", config), run_case("now", config)
    print(f"FLUX.1 widths, {args.single_blocks} single block(s): {params / 1e6:.0f} M parameters "
          f"({params * 4 / 2**20:.0f} MiB fp32)")
    print(f"{'hand-off':<62} {'extra host MiB':>14}")
    print(f"{'before: fresh fp32 model per rank + save_pretrained':<62} {before['extra_mib']:>14.0f}")
    print(f"{'now: stream checkpoint → + LoRA delta → streamed checkpoint':<62} {now['extra_mib']:>14.0f}")
    print(f"ratio now / before: {now['extra_mib'] / before['extra_mib']:.3f}")


if __name__ == "__main__":
    main()
