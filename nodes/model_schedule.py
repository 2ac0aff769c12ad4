"""Where a ComfyUI model's sigmas sit on the training timestep range: sigma -> timestep for routing, and
timestep -> sigma for noising training samples, through the model's own `model_sampling` (object patches
such as ModelSamplingDiscrete included)."""
from __future__ import annotations

import comfy.model_sampling
import torch

from ..tuneqdm_core.routing import LAST_TIMESTEP


def _placement(model_sampling) -> str:
    """How a model's sigmas map onto the training timestep range the experts split.

    'discrete': the model's own timestep is already an index on the training range (SD1.x/2.x/XL, zsnr included).
    'log_sigma': EDM-style schedules (continuous EDM and V, discrete EDM) whose timestep is a function
    of log sigma outside the training range; placed by log sigma between sigma_min and sigma_max. They keep a
    `log_sigmas` buffer only for compatibility, so that buffer does not mean discrete.
    'timestep': the rest (flow matching, Stable Cascade): placed by the model's own timestep between
    its sigma_min and sigma_max ends.
    Placed schedules run from 0 at sigma_min to LAST_TIMESTEP at sigma_max, as a discrete model's timesteps do.
    """
    edm = (comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.ModelSamplingDiscreteEDM)
    if isinstance(model_sampling, edm):
        return "log_sigma"
    if (isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
            and not isinstance(model_sampling, comfy.model_sampling.StableCascadeSampling)):
        return "discrete"
    return "timestep"


def schedule_timestep(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """sigma -> t on the training timestep range the experts split (t = 0 the clean end)."""
    placement = _placement(model_sampling)
    if placement == "discrete":
        return model_sampling.timestep(sigma).float()
    lo, hi = _ends(model_sampling, placement)
    here = _coordinate(model_sampling, placement, sigma.float())
    return ((here - lo) / (hi - lo) * LAST_TIMESTEP).clamp(0.0, LAST_TIMESTEP)


def sigma_of_timestep(model_sampling, t: torch.Tensor) -> torch.Tensor:
    """Inverse of `schedule_timestep` (used to noise training samples with the model's schedule)."""
    t = t.float()
    placement = _placement(model_sampling)
    if placement == "discrete":
        return model_sampling.sigma(t)
    lo, hi = _ends(model_sampling, placement)
    here = lo + (hi - lo) * t / LAST_TIMESTEP
    if placement == "log_sigma":
        return here.exp()
    # A flow model's sigma(t) is not the inverse of its timestep(sigma) (sigma() applies the shift, the
    # timestep is sigma itself), so invert timestep() over the model's own sigma table.
    table = model_sampling.sigmas.float().sort().values
    coords = _coordinate(model_sampling, placement, table)
    return _interp(here, coords, table)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through increasing points (xp, fp), clamped at both ends."""
    x = x.to(xp.device).clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = torch.where(x1 > x0, (x - x0) / (x1 - x0), torch.zeros_like(x))
    return y0 + w * (y1 - y0)


def _coordinate(model_sampling, placement: str, sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log() if placement == "log_sigma" else model_sampling.timestep(sigma).float()


def _ends(model_sampling, placement: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The coordinate at the model's sigma_min and sigma_max ends."""
    ends = (model_sampling.sigma_min, model_sampling.sigma_max)
    return tuple(_coordinate(model_sampling, placement, torch.as_tensor(e, dtype=torch.float32)) for e in ends)
