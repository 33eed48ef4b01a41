"""The full stage under DeepSpeed ZeRO (DS_ACCELERATOR=cpu, gloo): same training as plain AdamW; in bf16 its fp32
master weights start from the exact fp32 weights (not their bf16 rounding) and the stage checkpoint is gathered
from them, so a LoRA delta merged in between survives bit for bit. Runs for real: in-process with one rank, and
through Ray Train with two CPU workers (the shared two-worker run of tests/two_workers.py)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fluxtune.components import loaded_components
from fluxtune.config.load import load_search_text
from fluxtune.cycle import run_cycle
from fluxtune.data.images import load_example
from fluxtune.data.rows import read_rows
from fluxtune.worker_setup import build_worker_setup, encode_arrays, load_bundle

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SPEC = """
name: ds
base:
  eval_every: 4
  stages:
    - {{name: full, type: full, steps: {steps}, strategy: {strategy}, gradient_accumulation_steps: {accumulation},
       deepspeed: {{bf16: {bf16}, zero_stage: {zero}, offload_optimizer: {offload}}}, optimizer: {{lr: 1.0e-3}},
       lr_scheduler: cosine, warmup_steps: 2}}
"""

NO_STEP = "1.0e-30"  # an update far below every weight's last bit: the weights must come out bit for bit
HANDOFF = """
name: handoff
base:
  eval_every: 100
  stages:
    - {{name: full, type: full, steps: 1, strategy: deepspeed, deepspeed: {{zero_stage: {zero}}},
       optimizer: {{lr: {no_step}}}}}
    - {{name: lora, type: lora, steps: 2, precision: bf16, optimizer: {{lr: 1.0e-2}},
       adapter: {{type: lora, rank: 4, alpha: 8, dropout: 0.0, targets: [attn.to_q, attn.to_v, ff.net.2]}}}}
    - {{name: again, type: full, steps: 1, strategy: deepspeed, deepspeed: {{zero_stage: {zero}}},
       optimizer: {{lr: {no_step}}}}}
"""


class ListReporter:
    """Keeps each stage checkpoint's tensors (and the LoRA export's), read with safetensors at the stage end."""

    def __init__(self):
        self.evaluations, self.stage_ends = [], []

    def log(self, step, metrics):
        pass

    def evaluation(self, step, metrics):
        self.evaluations.append((step, metrics))

    def stage_end(self, step, metrics, checkpoint_dir):
        saved, adapter = None, None
        if checkpoint_dir is not None:
            from safetensors.torch import load_file

            from fluxtune.flux.weights import read_streamed, weight_files

            folder = checkpoint_dir / "transformer"
            saved = dict(read_streamed(folder, list(weight_files(folder))))
            lora = checkpoint_dir / "exports" / "adapter" / "pytorch_lora_weights.safetensors"
            adapter = load_file(str(lora)) if lora.exists() else None
        self.stage_ends.append((step, metrics, saved, adapter))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_arrays(sample_jsonl):
    """The first 24 sample examples at 64 px: rows 0-19 train (split across ranks), 20-23 validate."""
    examples = [load_example(r, 64) for r in read_rows(sample_jsonl)[:24]]
    return {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}


@pytest.fixture(scope="module")
def arrays(sample_jsonl):
    return load_arrays(sample_jsonl)


def run_experiment(arrays, spec, transformer=None, rank=0, world_size=1):
    """The experiment from the seed-0 tiny model (or `transformer`); returns (final live model, reporter)."""
    _, base = load_search_text(spec)
    bundle = load_bundle(base["model"])
    train = encode_arrays(bundle, {k: v[rank:20:world_size] for k, v in arrays.items()})
    val = encode_arrays(bundle, {k: v[20:] for k, v in arrays.items()})
    reporter = ListReporter()
    setup = build_worker_setup(base, train, val, reporter, loaded_components(), torch.device("cpu"), rank, world_size)
    return run_cycle(base, bundle.transformer if transformer is None else transformer, setup), reporter


def train_full_stage(arrays, strategy, bf16=False, steps=8, rank=0, world_size=1, zero=2, offload=False,
                     accumulation=1):
    return run_experiment(arrays, SPEC.format(steps=steps, strategy=strategy, bf16=str(bf16).lower(), zero=zero,
                                              offload=str(offload).lower(), accumulation=accumulation),
                          rank=rank, world_size=world_size)


def off_the_bf16_grid(seed: int = 1):
    """The tiny model with every weight moved to an fp32 value bf16 cannot hold (and none at zero)."""
    model = load_bundle({"preset": "tiny-fill"}).transformer
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator) + 1e-3)
    exact = {n: p.detach().clone() for n, p in model.named_parameters()}
    rounded = sum(int((v.bfloat16().float() != v).sum()) for v in exact.values())
    assert rounded > 0.95 * sum(v.numel() for v in exact.values())  # bf16 would change almost every value
    return model, exact


def lora_delta(adapter: dict[str, torch.Tensor], weight: str, scale: float) -> torch.Tensor | None:
    """(B @ A) · alpha/rank for a base weight name, from the exported diffusers LoRA file."""
    stem = "transformer." + weight.removesuffix(".weight")
    if f"{stem}.lora_A.weight" not in adapter:
        return None
    return (adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]) * scale


def check_handoff(model, reporter, exact) -> dict[str, float]:
    """full (bf16 DeepSpeed, no step) → lora (bf16 base) → full again: every hand-off exact in fp32."""
    (_, _, first, _), (_, _, merged, adapter), (_, _, again, _) = reporter.stage_ends
    assert all(torch.equal(first[n], exact[n]) for n in exact), "masters were rounded to bf16"
    moved = 0
    for name, before in first.items():
        delta = lora_delta(adapter, name, scale=8 / 4)
        expected = before if delta is None else before + delta
        assert torch.equal(merged[name], expected), name  # canonical fp32 W + fp32 delta, not bf16(W) + delta
        moved += int(delta is not None and not torch.equal(expected.bfloat16().float(), expected))
    assert moved > 0  # a delta bf16 would have rounded away
    assert all(torch.equal(again[n], merged[n]) for n in merged), "the second full stage lost the LoRA delta"
    # the live model is the engine's own bf16 module, stripped of DeepSpeed, equal to the rounded masters
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, again[n].bfloat16())
               for n, p in model.named_parameters())
    return {"moved": moved}


@pytest.fixture(scope="module")
def one_rank_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage, offload, accumulation, steps", [(2, False, 1, 8), (3, False, 1, 8),
                                                                      (2, True, 1, 8), (2, False, 2, 5)],
                         ids=["zero2", "zero3", "zero2-offload", "zero2-accumulate2"])
def test_zero_fp32_trains_exactly_like_plain_adamw(arrays, one_rank_group, zero_stage, offload, accumulation, steps):
    """With a warm-up + cosine schedule, and with accumulation: DeepSpeed's own (gradient_accumulation_steps in its
    config) equals the DDP loop's."""
    plain, plain_report = train_full_stage(arrays, "ddp", accumulation=accumulation, steps=steps)
    zero, zero_report = train_full_stage(arrays, "deepspeed", zero=zero_stage, offload=offload,
                                         accumulation=accumulation, steps=steps)
    diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), zero.parameters()))
    assert diff < 1e-5, diff
    assert zero_report.stage_ends[0][1]["val_loss"] == pytest.approx(plain_report.stage_ends[0][1]["val_loss"],
                                                                    abs=1e-5)
    # mid-stage validation ran on the engine's weights
    assert [s for s, *_ in zero_report.evaluations] == [4]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_masters_are_the_exact_fp32_weights_and_the_checkpoint_is_gathered_from_them(arrays, one_rank_group,
                                                                                           zero_stage):
    model, exact = off_the_bf16_grid()
    spec = HANDOFF.format(zero=zero_stage, no_step=NO_STEP).split("    - {name: lora")[0]  # the first stage alone
    live, report = run_experiment(arrays, spec, transformer=model)
    _, metrics, saved, _ = report.stage_ends[0]
    assert all(torch.equal(saved[n], exact[n]) for n in exact)
    assert np.isfinite(metrics["val_loss"])
    # the live model: the engine's module itself (no fresh copy), bf16, free of ZeRO's hooks and attributes
    assert live is model
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, exact[n].bfloat16()) for n, p in live.named_parameters())
    assert not any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) or
                   any(a.startswith(("ds_", "_hp_", "_z3")) for a in vars(p)) for p in live.parameters())
    live.zero_grad()
    live(**{k: v.bfloat16() if v.is_floating_point() and not k.endswith("_ids") else v
            for k, v in tiny_inputs().items()}).sample.float().square().mean().backward()
    assert all(p.grad is not None for p in live.parameters())  # plain autograd again


def tiny_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, 384, generator=g), "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([30.0]), "pooled_projections": torch.randn(1, 32, generator=g),
            "encoder_hidden_states": torch.randn(1, 8, 32, generator=g), "txt_ids": torch.zeros(8, 3),
            "img_ids": torch.zeros(16, 3)}


def test_full_lora_full_keeps_the_lora_delta_exact_into_the_masters(arrays, one_rank_group):
    model, exact = off_the_bf16_grid()
    live, report = run_experiment(arrays, HANDOFF.format(zero=2, no_step=NO_STEP), transformer=model)
    check_handoff(live, report, exact)


def two_worker_check(folder, sample_jsonl):
    """For tests/two_workers.py: ZeRO-2 and DDP, then the bf16 hand-off, on each rank of a two-worker run."""
    return two_rank_zero2_and_handoff, load_arrays(sample_jsonl)


def two_rank_zero2_and_handoff(arrays, rank, world):
    ddp, _ = train_full_stage(arrays, "ddp", rank=rank, world_size=world)
    zero, _ = train_full_stage(arrays, "deepspeed", rank=rank, world_size=world)
    diff = max((a - b).abs().max().item() for a, b in zip(ddp.parameters(), zero.parameters()))
    model, exact = off_the_bf16_grid()
    live, report = run_experiment(arrays, HANDOFF.format(zero=2, no_step=NO_STEP), transformer=model,
                                  rank=rank, world_size=world)
    handoff = check_handoff(live, report, exact) if rank == 0 else None  # raises on failure: the run stops
    flat = torch.cat([p.detach().float().flatten() for p in live.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return {"world": world, "zero_vs_ddp": diff, "handoff": handoff,
            "live_ranks_agree": bool(torch.equal(gathered[0], gathered[1])),
            "live_dtype": str(next(live.parameters()).dtype),
            "checkpoints": [saved is not None for *_, saved, _ in report.stage_ends]}


def test_two_ray_train_workers_zero2_equals_ddp_and_hand_off_exactly(two_train_workers):
    """ZeRO-2 across 2 Ray Train workers (optimizer states sharded) gives the DDP result; the bf16 hand-off
    (rank 0 reads each canonical tensor, broadcasts it) is exact on both ranks."""
    from two_workers import records_of

    records = records_of(two_train_workers, "test_deepspeed")
    for record in records:
        assert record["world"] == 2
        assert record["zero_vs_ddp"] < 1e-5, record
        assert record["live_ranks_agree"] and record["live_dtype"] == "torch.bfloat16"
    assert records[0]["handoff"]["moved"] > 0  # rank 0 checked every hand-off tensor
    assert records[0]["checkpoints"] == [True] * 3 and records[1]["checkpoints"] == [False] * 3  # rank 0 writes
