"""The `ema` stage: the average follows the weights at the given decay, and the stage trains the tiny model."""

import torch

import fluxtune
import fluxtune.testing as ft
import fluxtune_ema


def test_ema_update_is_the_exponential_average():
    average, weights = [torch.zeros(3)], [torch.ones(3)]
    fluxtune_ema.ema_update(average, weights, decay=0.9)
    fluxtune_ema.ema_update(average, weights, decay=0.9)
    assert torch.allclose(average[0], torch.full((3,), 1 - 0.9**2))


def test_stage_is_registered_with_its_params_validated():
    with ft.registered_plugin(fluxtune_ema) as components:
        entry = components.get("stage", "ema")
        assert entry.params is fluxtune_ema.EmaParams
        base = ft.tiny_experiment("stages: [{name: refine, type: ema, steps: 5, decay: 0.5}]")
    assert base["stages"][0]["decay"] == 0.5 and base["stages"][0]["optimizer"]["lr"] == 1.0e-4


class WeightRecorder:
    """A test plugin whose callback records the weights at the stage start and after every step."""

    def __init__(self):
        self.snapshots = []

    def snapshot(self, ctx):
        self.snapshots.append([p.detach().clone() for p in ctx.transformer.parameters()])

    @fluxtune.hookimpl
    def register_callbacks(self, register):
        recorder = self

        class Record:
            def on_stage_start(self, ctx):
                recorder.snapshot(ctx)

            def on_step_end(self, ctx, step, metrics):
                recorder.snapshot(ctx)

        register("record_weights", lambda params: Record())


def test_the_stage_learns_and_ends_on_the_average_of_the_weights(tmp_path):
    recorder = WeightRecorder()
    with ft.registered_plugin(fluxtune_ema), ft.registered_plugin(recorder):
        run = ft.run_tiny("""
            eval_every: 100
            callbacks: [{type: record_weights}]
            stages: [{name: refine, type: ema, steps: 30, decay: 0.8, start: 5, optimizer: {lr: 2.0e-3}}]
        """, keep_checkpoints=tmp_path)
    assert run.val_loss < 0.9 * run.initial_val_loss
    initial, *steps = recorder.snapshots
    assert len(steps) == 30
    expected = [w.clone() for w in initial]
    for index, weights in enumerate(steps):
        fluxtune_ema.ema_update(expected, weights, 0.8 if index >= 5 else 0.0)
    final = list(run.transformer.parameters())
    assert all(torch.allclose(f, e, atol=1e-6) for f, e in zip(final, expected))
    assert not all(torch.equal(f, last) for f, last in zip(final, steps[-1]))  # not just the last iterate
    _, metrics, checkpoint = run.reporter.stage_ends[-1]
    assert metrics["ema_decay"] == 0.8
    assert (checkpoint / "transformer" / "diffusion_pytorch_model.safetensors").exists()
