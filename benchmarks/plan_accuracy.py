"""How close is `fluxtune plan`? Measure peak memory per worker of real stages on the CPU, beside the plan.

Each configuration runs in its own process: the real `full` stage (DDP; DeepSpeed ZeRO-2 bf16 with
DS_ACCELERATOR=cpu on one gloo process) or the real `lora` stage on a preset, over random latents of the right
shapes (x0, conditioning, 512 T5 tokens). Memory is the peak of live tensor bytes over the training steps (the CPU
analogue of torch.cuda.max_memory_allocated, see tensor_memory.py), after set-up; the process's peak RSS is shown
too. The plan is `fluxtune.plan` for the same configuration with `device="cpu"` (fp32 everywhere except the
DeepSpeed bf16 module). A second table measures activations per block and token at real width (one double and
one single block, fp32 and bf16, full and frozen weights) beside the planner's constants.

    python benchmarks/plan_accuracy.py                 # every configuration (tens of minutes on 2 cores)
    python benchmarks/plan_accuracy.py --only lora     # configurations whose name contains 'lora'
    python benchmarks/plan_accuracy.py --smoke         # tiny-fill at 32 px, seconds (tests run this)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = {"full": 2, "lora": 2}  # the 2nd step is the first with optimizer states during forward and backward


def configurations(smoke: bool) -> list[dict]:
    """What the planner's constants were fitted on (the per-block table gives the block constants; these runs the
    temporaries), then configurations held out from fitting: other batch sizes, checkpointing, no dropout."""
    if smoke:
        return [dict(stage=s, preset="tiny-fill", resolution=32, batch=2) for s in ("ddp", "zero2", "lora")]
    runs = [dict(stage=s, preset="proxy-fill", resolution=r, batch=1) for s in ("ddp", "zero2", "lora")
            for r in (256, 512)]
    runs += [dict(stage="lora", preset=p, resolution=256, batch=1) for p in ("proxy-fill-4", "proxy-fill-8")]
    runs += [dict(stage="ddp", preset="proxy-fill", resolution=256, batch=2)]
    held_out = [dict(stage="zero2", preset="proxy-fill", resolution=256, batch=2),
                dict(stage="lora-nodrop", preset="proxy-fill", resolution=512, batch=1),
                dict(stage="lora", preset="proxy-fill-4", resolution=512, batch=1),
                dict(stage="lora-ckpt", preset="proxy-fill-8", resolution=512, batch=1)]
    return runs + [dict(run, held_out=True) for run in held_out]


def name(run: dict) -> str:
    return f"{run['stage']}:{run['preset']}:{run['resolution']}px:b{run['batch']}" + ("*" if run.get("held_out") else "")


def experiment(run: dict) -> dict:
    from fluxtune.config.load import load_search_text
    from stage_runs import experiment_yaml

    steps = STEPS["lora" if run["stage"].startswith("lora") else "full"]
    return load_search_text(experiment_yaml(run["stage"], run["preset"], run["resolution"], run["batch"], steps))[1]


# -- one measurement (child process) ---------------------------------------------------------------------------------

def measure(run: dict) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from fluxtune.worker_setup import load_transformer
    from stage_runs import init_single_process_group, run_stage
    from tensor_memory import TensorMemory, process_peak_rss, process_rss

    init_single_process_group("gloo")
    base = experiment(run)
    rss_before = process_rss()
    with TensorMemory() as memory:
        transformer = load_transformer(base["model"])
        memory.watch(transformer, steps=base["stages"][0]["steps"])
        _, ends = run_stage(base, transformer, torch.device("cpu"), ddp_wrapper=run["stage"] == "ddp")
    dist.destroy_process_group()
    training = {k: v for k, v in memory.peaks.items() if k != "stage end"}
    return {"run": run, "peak": max(training.values()), "phases": memory.peaks, "setup_peak": memory.setup_peak,
            "rss_peak": process_peak_rss() - rss_before, "seconds": ends[-1] - ends[0],
            "params": sum(p.numel() for p in transformer.parameters())}


# -- per block activations (child process) ---------------------------------------------------------------------------

def measure_blocks(smoke: bool) -> list[dict]:
    """Bytes a double and a single block keep for backward, per token and hidden unit, at two token counts."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from fluxtune.flux.presets import preset
    from tensor_memory import TensorMemory

    config = preset("tiny-fill" if smoke else "proxy-fill").transformer
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    d = heads * head_dim
    rows = []  # in pairs: the same block at two token counts
    for block_type, block_class in (("double", FluxTransformerBlock), ("single", FluxSingleTransformerBlock)):
        block = block_class(dim=d, num_attention_heads=heads, attention_head_dim=head_dim)
        for dtype in (torch.float32, torch.bfloat16):
            block.to(dtype)
            for trained in (True, False):
                block.requires_grad_(trained)
                for image_tokens, text_tokens in ((256, 512), (1024, 512)):
                    rows.append({"block": block_type, "dtype": str(dtype).split(".")[1], "trained": trained,
                                 "tokens": image_tokens + text_tokens,
                                 "bytes": block_activation_bytes(block, d, head_dim, image_tokens, text_tokens,
                                                                 dtype, trained, TensorMemory)})
    return rows


def block_activation_bytes(block, d, head_dim, image_tokens, text_tokens, dtype, trained, TensorMemory) -> int:
    """Live bytes a block's forward leaves behind (what it keeps for backward, and its output). Its inputs need
    gradients (an earlier layer trains); the time embedding only when the weights train (the full stage)."""
    import torch

    hidden = torch.randn(1, image_tokens, d, dtype=dtype, requires_grad=True)
    context = torch.randn(1, text_tokens, d, dtype=dtype, requires_grad=True)
    temb = torch.randn(1, d, dtype=dtype, requires_grad=trained)
    rope = (torch.randn(image_tokens + text_tokens, head_dim), torch.randn(image_tokens + text_tokens, head_dim))
    with TensorMemory() as memory:
        memory.count_existing([*block.parameters(), hidden, context, temb, *rope])  # their views are not new memory
        before = memory.live
        out = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rope)
        kept = memory.live - before
    del out
    return kept


# -- the comparison (parent) -----------------------------------------------------------------------------------------

def child(argument: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(argument)], capture_output=True,
                            text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{argument} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def predicted_forward(run: dict) -> float:
    """The plan's bytes at the end of forward (activations at their largest), to compare with the forward phase."""
    from fluxtune.flux.presets import preset
    from fluxtune.plan import Workload
    from fluxtune.plan.stages import full_stage_step, lora_stage_step

    base, spec = experiment(run), preset(run["preset"])
    stage = base["stages"][0]
    work = Workload(base["data"]["resolution"], base["data"]["batch_size"], spec.t5_max_length)
    build = lora_stage_step if stage["type"] == "lora" else full_stage_step
    return build(stage, spec.transformer, 2 if run["stage"] == "ddp" else 1, work, "cpu")[0].forward_peak()


def predicted(run: dict):
    from fluxtune.flux.presets import preset
    from fluxtune.plan import plan_stages

    base = experiment(run)
    spec = preset(run["preset"])
    # The DDP runs hold what a worker of a multi-worker trial holds (the wrapper and its gradient buckets); DDP does
    # not partition, so its plan is the same for any number of workers above one.
    gpus = 2 if run["stage"] == "ddp" else 1
    return plan_stages(base, spec.transformer, gpus=gpus, text_tokens=spec.t5_max_length, device="cpu")[0]


def print_run(result: dict) -> None:
    from fluxtune.plan import GiB

    run, phases = result["run"], result["phases"]
    plan = predicted(run)
    result["plan"], result["plan_moment"] = plan.total * GiB, plan.moment
    cell = lambda key: f"{phases.get(key, 0) / GiB:7.3f}"  # noqa: E731
    forward = predicted_forward(run)
    result["plan_forward"] = forward
    print(f"{name(run):34} {result['params'] / 1e9:7.3f}B {result['peak'] / GiB:9.3f} {plan.total:9.3f} "
          f"{(plan.total * GiB / result['peak'] - 1) * 100:+6.1f}% {plan.moment[:8]:>8} {result['rss_peak'] / GiB:8.3f} "
          f"{cell('forward')} {forward / GiB:8.3f} {(forward / phases['forward'] - 1) * 100:+6.1f}% "
          f"{cell('backward')} {cell('step')} {result['seconds']:6.0f}", flush=True)


def print_blocks(rows: list[dict], smoke: bool) -> None:
    from fluxtune.plan import activation_bytes_per_token

    d = 32 if smoke else 3072
    print(f"\n{'block':7} {'dtype':9} {'weights':8} {'B/(token·d) at':>16} {'slope':>7} {'plan':>6}")
    for first, second in zip(rows[::2], rows[1::2]):
        slope = (second["bytes"] - first["bytes"]) / ((second["tokens"] - first["tokens"]) * d)
        plan = activation_bytes_per_token(first["block"], "full" if first["trained"] else "lora", first["dtype"])
        at = " ".join(f"{row['bytes'] / (row['tokens'] * d):6.1f}" for row in (first, second))
        print(f"{first['block']:7} {first['dtype']:9} {'trained' if first['trained'] else 'frozen':8} {at:>16} "
              f"{slope:7.1f} {plan:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny-fill at 32 px: checks the script, not the plan")
    parser.add_argument("--only", default="", help="run configurations whose name contains one of these (a,b,...; "
                                                   "'*': the held-out ones, 'blocks': the per-block table)")
    parser.add_argument("--no-blocks", action="store_true", help="skip the per-block activation table")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--replay", type=Path, help="print the tables of measurements saved with --json (no runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        argument = json.loads(args.child)
        result = measure_blocks(argument["smoke"]) if argument.get("blocks") else measure(argument)
        print(json.dumps(result))
        return
    saved = json.loads(args.replay.read_text()) if args.replay else None
    print(f"{'configuration':34} {'params':>8} {'measured':>9} {'plan':>9} {'error':>7} {'at':>8} {'RSS':>8} "
          f"{'fwd':>7} {'fwd plan':>8} {'error':>7} {'bwd':>7} {'step':>7} {'s':>6}")
    results = []
    for result in (r for r in saved if "run" in r) if saved else (
            child(run) for run in configurations(args.smoke) if any(o in name(run) for o in args.only.split(","))):
        print_run(result)
        results.append(result)
    blocks = next((r["blocks"] for r in saved if "blocks" in r), None) if saved else None
    if blocks is None and not saved and not args.no_blocks and (not args.only or "blocks" in args.only.split(",")):
        blocks = child({"blocks": True, "smoke": args.smoke})
    print("GiB per worker. measured: peak of live tensor bytes over the steps; plan: fluxtune.plan's peak and the "
          "moment it names; fwd/bwd/step: the measured peak in each phase; fwd plan: the plan at the end of forward; "
          "*: held out from fitting")
    if blocks:
        print_blocks(blocks, args.smoke)
        results.append({"blocks": blocks})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
