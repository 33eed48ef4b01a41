"""Running one real stage on a preset over random latents, for the memory and speed benchmarks.

The stage is the registered one (`full` under DDP or DeepSpeed, `lora`), driven through a real RunContext exactly as
`run_cycle` drives it; only the data is random (latents, conditioning and prompt embeddings of the right shapes:
memory and time do not depend on the values). A `StepClock` context records when each optimizer step ended.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

STAGES = {
    "ddp": "{name: s, type: full, steps: STEPS, strategy: ddp}",
    "zero2": "{name: s, type: full, steps: STEPS, strategy: deepspeed, deepspeed: {zero_stage: 2, bf16: true}}",
    "zero2-ckpt": "{name: s, type: full, steps: STEPS, strategy: deepspeed, deepspeed: {zero_stage: 2, bf16: true}, "
                  "gradient_checkpointing: true}",
    "lora": "{name: s, type: lora, steps: STEPS, adapter: {type: lora, rank: 64}}",
    "lora-ckpt": "{name: s, type: lora, steps: STEPS, adapter: {type: lora, rank: 64}, gradient_checkpointing: true}",
    "lora-nodrop": "{name: s, type: lora, steps: STEPS, adapter: {type: lora, rank: 64, dropout: 0.0}}",
}


def experiment_yaml(stage: str, preset: str, resolution: int, batch: int, steps: int) -> str:
    return (f"name: benchmark\nbase:\n  model: {{preset: {preset}}}\n  eval_every: 100000\n"
            f"  data: {{resolution: {resolution}, batch_size: {batch}}}\n  stages:\n"
            f"    - {STAGES[stage].replace('STEPS', str(steps))}\n")


def init_single_process_group(backend: str) -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend, rank=0, world_size=1)


def random_latents(spec: Any, resolution: int, count: int, device: Any):
    """(train EncodedSet of `count` examples, one validation example): random values, the real shapes."""
    import torch

    from fluxtune.flux.encoded import EncodedSet
    from fluxtune.flux.packing import latent_image_ids, text_ids

    tokens = (resolution // 16) ** 2
    generator = torch.Generator().manual_seed(0)

    def encoded(n: int) -> EncodedSet:
        return EncodedSet(
            x0=torch.randn(n, tokens, 64, generator=generator), cond=torch.randn(n, tokens, 320, generator=generator),
            prompt_index=torch.zeros(n, dtype=torch.long),
            prompt_embeds=torch.randn(1, spec.t5_max_length, spec.transformer["joint_attention_dim"],
                                      generator=generator),
            pooled=torch.randn(1, spec.transformer["pooled_projection_dim"], generator=generator),
            img_ids=latent_image_ids(resolution, resolution), txt_ids=text_ids(spec.t5_max_length)).to(device)

    return encoded(count), encoded(1)


class NullReporter:
    def log(self, step, metrics): pass
    def evaluation(self, step, metrics): pass
    def stage_end(self, step, metrics, checkpoint_dir): pass


def run_stage(base: dict[str, Any], transformer: Any, device: Any, ddp_wrapper: bool = False,
              on_step: Any = None) -> tuple[Any, list[float]]:
    """Run the experiment's single stage on `transformer`; returns (final transformer, time of each step's end).

    `ddp_wrapper`: wrap in DistributedDataParallel even in one process (what every worker of a multi-worker trial
    holds). `on_step(step)` runs after each optimizer step (after a device synchronisation).
    """
    import tempfile
    from pathlib import Path

    import torch

    from fluxtune.components import loaded_components
    from fluxtune.context import RunContext
    from fluxtune.cycle import stage_params
    from fluxtune.flux.presets import preset
    from fluxtune.worker_setup import build_worker_setup

    spec = base["stages"][0]
    train, val = random_latents(preset(base["model"]["preset"]), base["data"]["resolution"],
                                2 * base["data"]["batch_size"], device)
    setup = build_worker_setup(base, train, val, NullReporter(), loaded_components(), device)
    stage = loaded_components().get("stage", spec["type"]).build(stage_params(spec))
    ends: list[float] = []

    class Context(RunContext):
        def distribute(self, module):
            if ddp_wrapper:
                return torch.nn.parallel.DistributedDataParallel(module)
            return super().distribute(module)

        def log(self, step, metrics):
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            if on_step is not None:
                on_step(step)
            super().log(step, metrics)

    with tempfile.TemporaryDirectory() as scratch:
        ctx = Context(setup=setup, name=spec["name"], cycle=0, steps=spec["steps"], transformer=transformer,
                      export_dir=Path(scratch) / "exports", first_global_step=0, stream_seed=0)
        ctx.export_dir.mkdir()
        started = time.perf_counter()
        stage.run(ctx)
    return ctx.transformer, [started] + ends
