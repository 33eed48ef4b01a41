"""The training recipe of the built-in stages: learning-rate schedules, gradient accumulation and optimizers.

The stage loop is checked against a plain torch loop written out here (same weights after N updates), DDP
accumulation on two Ray Train workers (the shared run of tests/two_workers.py) against one process with the whole
batch, and every registered optimizer builds, steps, and is searchable; a CUDA-only one is refused for a CPU
experiment.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import run_in_process
from fluxtune.components import loaded_components
from fluxtune.config.load import load_search_text, sample_experiment
from fluxtune.context import RunContext, WorkerSetup
from fluxtune.default_plugins.optim import TrainingParams, lr_factor, train_steps
from fluxtune.flux.flow import flow_matching_loss

MICRO = 2  # examples per micro-batch


class Steps:
    def __init__(self):
        self.logged = []

    def log(self, step, metrics):
        self.logged.append({k: float(v) for k, v in metrics.items()})

    def evaluation(self, step, metrics):
        pass

    def stage_end(self, step, metrics, checkpoint_dir):
        pass


class PinnedNoise(RunContext):
    """fluxtune's stage context with each example's noise and time fixed in the data, so a batch's loss does not
    depend on how the batch is split into micro-batches (the real context draws them per call)."""

    def batches(self):
        data, rank, world = self.setup.train, self.setup.rank, self.setup.world_size
        while True:  # the global batch of an update: this rank's micro-batches, in order
            for start in range(rank * MICRO, len(data["x0"]), world * MICRO):
                yield rows(data, start, start + MICRO)

    def training_loss(self, model, batch, generator=None):
        return flow_matching_loss(model, batch, batch["noise"], batch["t"], 30.0,
                                  lambda pred, target, _: (pred.float() - target.float()).pow(2).mean())


def rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows start:stop of a batch; the positions and the 0-dim token grid (height, width) belong to the batch."""
    return {k: v if k in ("img_ids", "txt_ids") or not v.dim() else v[start:stop] for k, v in batch.items()}


def pinned_data(count: int) -> dict[str, torch.Tensor]:
    from fluxtune.testing import tiny_data, tiny_model
    from fluxtune.worker_setup import encode_arrays

    train, _ = tiny_data()
    encoded = encode_arrays(tiny_model(), {k: v[:count] for k, v in train.items()})
    data = encoded.batch(torch.arange(count))
    generator = torch.Generator().manual_seed(5)
    data["noise"] = torch.randn(data["x0"].shape, generator=generator)
    data["t"] = torch.rand(count, generator=generator)
    return data


def stage_context(data, steps, rank=0, world_size=1) -> PinnedNoise:
    from fluxtune.testing import tiny_model

    setup = WorkerSetup(train=data, val=None, batch_size=MICRO, guidance=30.0, loss_fn=None, timesteps=None,
                        reporter=Steps(), components=loaded_components(), device=torch.device("cpu"), rank=rank,
                        world_size=world_size, eval_every=10**9)
    return PinnedNoise(setup=setup, name="full", cycle=0, steps=steps, transformer=tiny_model().transformer,
                       export_dir=Path("."), first_global_step=0, stream_seed=0)


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "cosine", "linear"])
def test_schedules_are_diffusers_curves(schedule):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=3, num_training_steps=10)
    ours = lr_factor(schedule, warmup_steps=3, total_steps=10)
    for step in range(10):
        assert ours(step) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12), step
        optimizer.step()
        reference.step()


def test_scheduled_accumulating_updates_equal_a_plain_torch_loop():
    updates, accumulate, warmup, base_lr = 4, 2, 2, 2.0e-3
    data = pinned_data(updates * accumulate * MICRO)
    params = TrainingParams.model_validate({
        "optimizer": {"lr": base_lr, "weight_decay": 0.01}, "lr_scheduler": "cosine", "warmup_steps": warmup,
        "gradient_accumulation_steps": accumulate, "max_grad_norm": 0.05, "precision": "fp32"})
    ctx = stage_context(data, updates)
    model = ctx.transformer
    train_steps(ctx, model, list(model.parameters()), params)

    # the same recipe written out: the update's gradient is the mean over its micro-batches, clipped as a whole
    plain = stage_context(data, updates)
    reference = plain.transformer
    optimizer = torch.optim.AdamW(reference.parameters(), lr=base_lr, weight_decay=0.01)
    batches = plain.batches()
    losses = []
    for update in range(updates):
        warm = update / warmup if update < warmup else None
        factor = warm if warm is not None else 0.5 * (1 + math.cos(math.pi * (update - warmup) / (updates - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = base_lr * factor
        total = 0.0
        for _ in range(accumulate):
            loss = plain.training_loss(reference, next(batches))
            (loss / accumulate).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / accumulate)

    logged = ctx.setup.reporter.logged
    assert [m["loss"] for m in logged] == pytest.approx(losses, rel=1e-6)
    assert [m["lr"] for m in logged] == pytest.approx([0.0, base_lr / 2, base_lr, base_lr / 2])  # warm-up, cosine
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), name
    untrained = stage_context(data, 1).transformer
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), untrained.parameters()))


RECIPE = {"lr": 1.0e-3, "eps": 1.0e-3}  # an eps near the gradients' size: the update sees their scale


UPDATES, ACCUMULATE = 2, 2


def two_worker_check(folder, sample_jsonl):
    """For tests/two_workers.py: DDP with accumulation on each rank of a two-worker run; rank 0 saves the weights."""
    return ddp_accumulation, {"out": str(folder / "ddp.safetensors")}


def ddp_accumulation(config: dict, rank: int, world: int) -> dict:
    from safetensors.torch import save_file

    data = pinned_data(UPDATES * ACCUMULATE * MICRO * world)
    ctx = stage_context(data, UPDATES, rank, world)
    model = ctx.transformer
    params = TrainingParams.model_validate({"optimizer": RECIPE, "gradient_accumulation_steps": ACCUMULATE,
                                            "max_grad_norm": None, "precision": "fp32"})
    ddp = ctx.distribute(model)
    reductions = []

    def counting_allreduce(state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        reductions.append(bucket.index())
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    train_steps(ctx, ddp, list(model.parameters()), params)
    if rank == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, config["out"])
    return {"world": world, "reductions": reductions, "weights": config["out"] if rank == 0 else None}


def test_ddp_accumulation_on_two_workers_equals_one_process_with_the_whole_batch(two_train_workers):
    from safetensors.torch import load_file

    from two_workers import records_of

    first, _ = records_of(two_train_workers, "test_training_recipe")
    world, weights = first["world"], load_file(first["weights"])

    # one process, one batch of all 2 workers × 2 micro-batches per update
    data = pinned_data(UPDATES * ACCUMULATE * MICRO * world)
    ctx = stage_context(data, UPDATES)
    per_update = ACCUMULATE * MICRO * world
    batches = [rows(data, u * per_update, (u + 1) * per_update) for u in range(UPDATES)]
    ctx.batches = lambda: iter(batches)
    params = TrainingParams.model_validate({"optimizer": RECIPE, "max_grad_norm": None, "precision": "fp32"})
    train_steps(ctx, ctx.transformer, list(ctx.transformer.parameters()), params)
    for name, p in ctx.transformer.named_parameters():
        assert torch.allclose(p, weights[name], rtol=0, atol=1e-5), name  # 1% of one update
    # gradients crossed the wire once per update (no_sync on the other micro-batches), every bucket each time
    buckets = len(set(first["reductions"]))
    assert world == 2 and len(first["reductions"]) == UPDATES * buckets


OPTIMIZERS = {"adamw": {"lr": 1e-2}, "adamw8bit": {"lr": 1e-2}, "adafactor": {"lr": 1e-2},
              "prodigy": {"d0": 1e-2}}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_built_in_optimizer_builds_and_steps(name):
    model = torch.nn.Linear(64, 128)  # 8192 weights: bitsandbytes keeps 8-bit states from 4096 up
    make = loaded_components().get("optimizer", name).build(OPTIMIZERS[name])
    optimizer = make(model.parameters(), device=torch.device("cpu"), sharded=False)
    before = model.weight.detach().clone()
    for _ in range(3):
        model(torch.randn(8, 64)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(before, model.weight) and torch.isfinite(model.weight).all()
    assert loaded_components().get("optimizer", name).provenance.plugin == "fluxtune.default_plugins.optimizers"


def test_optimizer_and_schedule_are_searchable_and_type_defaults_to_adamw():
    spec, base = load_search_text("""
name: t
base:
  stages:
    - {name: lora, type: lora, steps: 10, optimizer: {lr: 1.0e-4}, adapter: {type: lora, rank: 4}}
search:
  space:
    stages.lora.optimizer.type: {type: categorical, choices: [adamw, adafactor, prodigy]}
    stages.lora.lr_scheduler: {type: categorical, choices: [constant, cosine, linear, constant_with_warmup]}
    stages.lora.warmup_steps: {type: int, low: 0, high: 5}
    stages.lora.gradient_accumulation_steps: {type: int, low: 1, high: 4}
""")
    assert base["stages"][0]["optimizer"] == {"type": "adamw", "lr": 1e-4, "weight_decay": 0.0,
                                              "betas": (0.9, 0.999), "eps": 1e-8}
    sampled = sample_experiment(base, {"stages.lora.optimizer.type": "prodigy", "stages.lora.lr_scheduler": "cosine",
                                       "stages.lora.warmup_steps": 3}, loaded_components())
    stage = sampled["stages"][0]
    assert stage["optimizer"]["type"] == "prodigy" and stage["optimizer"]["lr"] == 1.0  # prodigy's own defaults
    assert (stage["lr_scheduler"], stage["warmup_steps"]) == ("cosine", 3)


CPU_8BIT = """name: eightbit
base:
  gpus_per_worker: {gpus}
  stages:
    - name: full
      type: full
      steps: 10
      optimizer: {{type: adamw8bit, lr: 1.0e-5}}
"""


def test_validate_refuses_the_cuda_only_optimizer_on_cpu_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "eightbit.yaml"
    path.write_text(CPU_8BIT.format(gpus=0))
    code, err = run_in_process(["validate", str(path)], monkeypatch, capsys)
    problems = [line for line in err.splitlines() if line.startswith("error:")]  # each with its YAML snippet
    assert code == 2 and len(problems) == 1, err
    assert f"{path}:8:" in problems[0] and "base.stages[0].optimizer.type" in problems[0]
    assert "adamw8bit" in problems[0] and "CUDA" in problems[0] and "Traceback" not in err
    path.write_text(CPU_8BIT.format(gpus=1))
    code, err = run_in_process(["validate", str(path)], monkeypatch, capsys)
    assert code == 0, err
