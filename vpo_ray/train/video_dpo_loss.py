"""The Diffusion-DPO loss on a video transformer, written once (training, benchmark and tests use it).

For a pair (x_w preferred, x_l dispreferred) under one prompt c, one timestep t and one
noise e shared by both (Diffusion-DPO, train.py), with the model's per-sample error

    err(m, x) = mean over latent elements of (m(x_t, c, t) - target(x, e, t))^2

and the same for the frozen reference, the loss is

    inside = -beta/2 * [(err(m, x_w) - err(m, x_l)) - (err(ref, x_w) - err(ref, x_l))]
    loss   = -log sigmoid(inside)

`inside` is the implicit reward margin of the pair (> 0: the model prefers x_w more than
the reference does); its sign averaged over pairs is the implicit accuracy. The noisy
input and the target come from the diffusers scheduler itself: `add_noise`, and for
v-prediction (CogVideoX) `get_velocity`, for epsilon-prediction the noise.
"""
from __future__ import annotations

from typing import Callable, Optional


def sample_timesteps(scheduler, n: int, generator, sampling: str = "uniform", logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29):
    """`n` integer timesteps in [0, num_train_timesteps): uniform, or diffusers' logit_normal/mode density."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    total = int(scheduler.config.num_train_timesteps)
    if sampling == "uniform":  # Diffusion-DPO train.py: torch.randint(0, num_train_timesteps)
        return torch.randint(0, total, (n,), generator=generator)
    u = compute_density_for_timestep_sampling(sampling, n, logit_mean=logit_mean, logit_std=logit_std,
                                              mode_scale=mode_scale, generator=generator)
    return (u * total).long().clamp_(0, total - 1)


def noised_pair(scheduler, chosen, rejected, noise, timesteps):
    """(noisy inputs, targets, timesteps), each 2B long: chosen first, rejected second, noise and t shared."""
    import torch

    x0 = torch.cat([chosen, rejected])
    eps = torch.cat([noise, noise]).to(x0.dtype)
    t = torch.cat([timesteps, timesteps]).to(x0.device)
    noisy = scheduler.add_noise(x0, eps, t)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        target = scheduler.get_velocity(x0, eps, t)
    elif kind == "epsilon":
        target = eps
    else:
        raise ValueError(f"scheduler prediction_type {kind!r}: Diffusion-DPO here supports v_prediction and epsilon")
    return noisy, target, t


def per_sample_error(pred, target):
    """Mean squared error per sample over every latent element, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_dpo_loss(model_pred, ref_pred, target, beta: float) -> dict:
    """The loss and its parts; first half of the batch is the chosen videos, second half the rejected."""
    import torch.nn.functional as F

    err = per_sample_error(model_pred, target)
    ref_err = per_sample_error(ref_pred.detach(), target)
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    return {"loss": -F.logsigmoid(inside).mean(), "margin": inside.detach(), "err_w": err_w.detach(),
            "err_l": err_l.detach(), "ref_err_w": ref_w, "ref_err_l": ref_l}


# ---------------------------------------------------------------------------- the transformer call

def rotary_embeddings(pipe, latents, device):
    """CogVideoX's 3D RoPE for latents (B, F, C, H, W), from the pipeline's own helper; None if unused."""
    transformer = pipe.transformer
    if not getattr(transformer.config, "use_rotary_positional_embeddings", False):
        return None
    scale = pipe.vae_scale_factor_spatial
    return pipe._prepare_rotary_positional_embeddings(latents.shape[-2] * scale, latents.shape[-1] * scale,
                                                      latents.shape[1], device)


def predict(transformer, noisy, prompt_embeds, timesteps, rotary=None):
    """One forward of a CogVideoX transformer (latents B, F, C, H, W); `transformer` may be an engine."""
    return transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=timesteps,
                       image_rotary_emb=rotary, return_dict=False)[0]


def pair_loss(policy: Callable, reference: Callable, scheduler, chosen, rejected, prompt_embeds, generator,
              beta: float, rotary=None, timesteps=None, sampling: Optional[dict] = None, dtype=None) -> dict:
    """Draw t and noise from `generator`, run policy (with grad) and reference (without), return the loss dict.

    `policy(noisy, embeds, t, rotary)` and `reference(...)` return predictions; `timesteps`
    fixes t instead of drawing it (evaluation). Both videos of a pair share t and noise.
    Noising and targets are computed in fp32; the model gets its input in `dtype`.
    """
    import torch

    b = chosen.shape[0]
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, b, generator, **(sampling or {}))
    chosen, rejected = chosen.float(), rejected.float()
    noise = torch.randn(chosen.shape, generator=generator, dtype=torch.float32).to(chosen.device)
    noisy, target, t = noised_pair(scheduler, chosen, rejected, noise, timesteps)
    noisy = noisy.to(dtype or prompt_embeds.dtype)
    embeds = torch.cat([prompt_embeds, prompt_embeds])
    pred = policy(noisy, embeds, t, rotary)
    with torch.no_grad():
        ref_pred = reference(noisy, embeds, t, rotary)
    return diffusion_dpo_loss(pred, ref_pred, target, beta)
