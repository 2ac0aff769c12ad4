"""The training objective of a ComfyUI model: the core's denoising loss (tuneqdm_core.objective) with the
model's own `model_sampling` as its schedule, the model's sigma of each training timestep, and ComfyUI's
conditioning. Used by Train TuneQDM Scales and by the headless trainer (tuneqdm_train)."""
from __future__ import annotations

from typing import Any

import torch

from ..tuneqdm_core.objective import ErrorFn, Noise, denoising_loss
from ..tuneqdm_core.train import LossFn
from .model_schedule import sigma_of_timestep


def cond_kwargs(base: Any, pair: list, x: torch.Tensor, device: torch.device) -> dict:
    """The keyword arguments `base.apply_model` takes for one [context, options] conditioning pair."""
    context, options = pair
    params = dict(options, cross_attn=context.to(device).clone(), device=device, noise=x)
    conds = base.extra_conds(**params)
    # Clones: conditioning made under inference mode must not reach autograd as inference tensors.
    return {k: c.process_cond(batch_size=x.shape[0], device=device).cond.clone() for k, c in conds.items()}


def model_objective(base: Any, conds: list, device: torch.device, error_of: ErrorFn, noise: Noise) -> LossFn:
    """The per-sample loss of `base` (a ComfyUI BaseModel) for train_scales: `conds[i]` is the [context,
    options] pair of conditioning index i, `noise(x0, t)` the noise for a batch."""
    ms = base.model_sampling

    def denoise(xt: torch.Tensor, sigma: torch.Tensor, cond_index: int) -> torch.Tensor:
        kwargs = cond_kwargs(base, conds[cond_index], xt, device)
        return base.apply_model(xt, sigma, transformer_options={}, **kwargs)

    return denoising_loss(ms, lambda t: sigma_of_timestep(ms, t), denoise, noise, error_of, device)
