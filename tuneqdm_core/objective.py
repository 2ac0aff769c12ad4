"""The training objective: noise a clean sample to its timestep's sigma with the model's own schedule,
denoise it, and score the error in the model's own prediction space (eps, v or flow).

The schedule is duck-typed (`Schedule`): ComfyUI's `model_sampling` objects fit it as they are (the
nodes' adapter passes them in), and `PredictionSchedule` is the plain-torch one for the three prediction
types. The error on the denoised estimate is divided by d(denoised)/d(output), so a schedule needs no
prediction-type switch here: for eps it gives output - noise, for v output - (alpha noise - sigma x0),
for flow output - (noise - x0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .errors import SettingError
from .routing import NUM_TRAIN_TIMESTEPS
from .train import LossFn

ErrorFn = Callable[[torch.Tensor], torch.Tensor]
"""Prediction-space error -> elementwise loss."""

ERROR_FUNCTIONS: dict[str, ErrorFn] = {
    "MSE": lambda err: err.pow(2),
    "L1": lambda err: err.abs(),
    "Huber": lambda err: torch.nn.functional.huber_loss(err, torch.zeros_like(err), reduction="none"),
    "SmoothL1": lambda err: torch.nn.functional.smooth_l1_loss(err, torch.zeros_like(err), reduction="none"),
}

Denoise = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(noisy x_t, sigma (B,), conditioning index) -> the model's denoised estimate of x0."""
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x0, timesteps) -> the noise for that batch (on the CPU: its seed stream decides, not the device)."""


class Schedule(Protocol):
    """What the objective reads of a schedule (ComfyUI's model_sampling has these methods)."""

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor) -> torch.Tensor: ...

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor: ...


def error_function(name: str) -> ErrorFn:
    if name not in ERROR_FUNCTIONS:
        raise SettingError(f"loss function {name!r}: one of {', '.join(ERROR_FUNCTIONS)}")
    return ERROR_FUNCTIONS[name]


def prediction_error(schedule: Schedule, sigma: torch.Tensor, xt: torch.Tensor, denoised: torch.Tensor,
                     x0: torch.Tensor) -> torch.Tensor:
    """The error of `denoised` in the schedule's prediction space: (denoised - x0) / d(denoised)/d(output)
    (the denoised estimate is affine in the model's output)."""
    slope = (schedule.calculate_denoised(sigma, torch.ones_like(xt), xt)
             - schedule.calculate_denoised(sigma, torch.zeros_like(xt), xt))
    return (denoised - x0) / slope


def denoising_loss(schedule: Schedule, sigma_of: Callable[[torch.Tensor], torch.Tensor], denoise: Denoise,
                   noise: Noise, error_of: ErrorFn, device: torch.device | str) -> LossFn:
    """The per-sample loss train_scales takes: each sample of x0 noised to `sigma_of(t)` with `schedule`,
    denoised by `denoise`, scored by `error_of` in the prediction space and averaged over its elements."""

    def loss_fn(x0: torch.Tensor, t: torch.Tensor, cond_index: int) -> torch.Tensor:
        eps = noise(x0, t)
        x0 = x0.to(device)
        sigma = sigma_of(t).to(device)
        xt = schedule.noise_scaling(sigma, eps.to(device), x0)
        denoised = denoise(xt, sigma, cond_index).float()
        return error_of(prediction_error(schedule, sigma, xt, denoised, x0)).flatten(1).mean(1)

    return loss_fn


PREDICTIONS = ("eps", "v", "flow")


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


@dataclass(frozen=True)
class PredictionSchedule:
    """A plain-torch schedule of one prediction type.

    eps and v: variance-exploding form x_t = x0 + sigma noise (the model sees x_t scaled to unit variance),
    sigma from the training timestep through `sigmas` (one per timestep, e.g. from alphas_cumprod).
    flow: x_t = (1 - sigma) x0 + sigma noise with sigma = t / NUM_TRAIN_TIMESTEPS (rectified flow).
    """

    prediction: str
    sigmas: torch.Tensor | None = None  # eps and v: sigma of each training timestep, increasing
    sigma_data: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise SettingError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.prediction != "flow" and (self.sigmas is None or self.sigmas.numel() != NUM_TRAIN_TIMESTEPS):
            raise SettingError(f"an {self.prediction} schedule needs {NUM_TRAIN_TIMESTEPS} sigmas, one per timestep")

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, prediction: str = "eps") -> "PredictionSchedule":
        return cls(prediction, ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma of (fractional) training timesteps: log sigma linear between the table's entries."""
        t = t.float().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        if self.prediction == "flow":
            return t / NUM_TRAIN_TIMESTEPS
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=NUM_TRAIN_TIMESTEPS - 1)
        w = t - lo
        log_sigmas = self.sigmas.log()
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigma, noise)
        if self.prediction == "flow":
            return s * noise + (1.0 - s) * latent_image
        return noise * s + latent_image

    def calculate_input(self, sigma: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """What the network sees for x_t: eps and v, x_t at unit variance (sqrt(a) x0 + sqrt(1 - a) noise
        for alphas_cumprod a); flow, x_t itself."""
        if self.prediction == "flow":
            return xt
        return xt / (_per_sample(sigma, xt) ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigma, model_output)
        if self.prediction == "v":
            d2 = self.sigma_data ** 2
            return model_input * d2 / (s ** 2 + d2) - model_output * s * self.sigma_data / (s ** 2 + d2) ** 0.5
        return model_input - model_output * s

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the model should output for x_t = noise_scaling(sigma, noise, x0)."""
        s = _per_sample(sigma, x0)
        if self.prediction == "eps":
            return noise
        if self.prediction == "flow":
            return noise - x0
        d2 = self.sigma_data ** 2
        return (self.sigma_data * noise - s * x0 / self.sigma_data) / (s ** 2 + d2) ** 0.5
