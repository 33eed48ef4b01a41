"""The rectified-flow training step for FLUX.1-Fill, written out plainly.

x_t = (1 - t) * x0 + t * noise, and the transformer predicts the velocity noise - x0 from x_t, the Fill
conditioning, the prompt embedding and t in [0, 1] (the model multiplies t by 1000 itself).
"""

from __future__ import annotations

import torch

from fluxtune.flux.packing import transformer_inputs


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predict_velocity(transformer, noisy: torch.Tensor, batch: dict[str, torch.Tensor], t: torch.Tensor,
                     guidance: float) -> torch.Tensor:
    """One transformer call with the exact inputs FluxFillPipeline feeds it at time t."""
    size = noisy.shape[0]
    return transformer(
        hidden_states=transformer_inputs(noisy, batch["cond"]),
        timestep=t.to(noisy),
        guidance=torch.full((size,), guidance, device=noisy.device, dtype=noisy.dtype),
        pooled_projections=batch["pooled"],
        encoder_hidden_states=batch["prompt_embeds"],
        txt_ids=batch["txt_ids"],
        img_ids=batch["img_ids"],
        return_dict=False,
    )[0]


def flow_matching_loss(transformer, batch: dict[str, torch.Tensor], noise: torch.Tensor, t: torch.Tensor,
                       guidance: float, loss_fn) -> torch.Tensor:
    x0 = batch["x0"]
    pred = predict_velocity(transformer, noisy_latents(x0, noise, t), batch, t, guidance)
    # The loss sees t too, for time-dependent weighting schemes.
    return loss_fn(pred, velocity_target(x0, noise), {**batch, "t": t})
