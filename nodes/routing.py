"""Sampling-time expert routing for ComfyUI: a keyed APPLY_MODEL wrapper on the MODEL.

ComfyUI's quantized layers never see the timestep. The wrapper receives the current sigma and the
BaseModel (executor.class_obj), converts sigma to the 0..999 training timestep through the model's
own `model_sampling` (object patches such as ModelSamplingDiscrete included), and routes each sample
of the batch to its expert for the duration of that one call. Because it sits on the MODEL, stock
KSampler, KSamplerAdvanced and SamplerCustomAdvanced route exactly like the Expert-Routed Sampler.

The wrapper also carries the scales a MODEL clone samples with, so clones that share modules
never write into them: the scales are activated for one call and restored after it. In the same way it
hands the running clone's LoRA-type patches to the quantized layers as adapters (lora.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_sampling
import torch

from ..tuneqdm_core import ScaleSet, expert_of_timestep, get_router
from ..tuneqdm_core.routing import NUM_TRAIN_TIMESTEPS
from . import lora

LAST_TIMESTEP = float(NUM_TRAIN_TIMESTEPS - 1)  # a discrete model's sigma_max end; others are stretched to match

WRAPPER_KEY = "tuneqdm"
ROUTING_MODES = ("timestep intervals", "custom boundaries", "fixed expert")


def _placement(model_sampling) -> str:
    """How a model's sigmas map onto the 0..999 expert scale.

    'discrete': the model's own timestep is already a 0..999 index (SD1.x/2.x/XL, zsnr included).
    'log_sigma': EDM-style schedules (continuous EDM and V, discrete EDM) whose timestep is a function
    of log sigma outside 0..999; placed by log sigma between sigma_min and sigma_max. They keep a
    `log_sigmas` buffer only for compatibility, so that buffer does not mean discrete.
    'timestep': the rest (flow matching, Stable Cascade): placed by the model's own timestep between
    its sigma_min and sigma_max ends.
    Placed schedules run from 0 at sigma_min to 999 at sigma_max, as a discrete model's timesteps do.
    """
    edm = (comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.ModelSamplingDiscreteEDM)
    if isinstance(model_sampling, edm):
        return "log_sigma"
    if (isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
            and not isinstance(model_sampling, comfy.model_sampling.StableCascadeSampling)):
        return "discrete"
    return "timestep"


def schedule_timestep(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """sigma -> t on the 0..999 scale the experts were split on (t = 0 the clean end)."""
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


@dataclass(frozen=True)
class RoutingPolicy:
    """How a timestep picks an expert: uniform intervals, custom cut points, or one fixed expert."""

    boundaries: tuple[float, ...] | None = None
    fixed_expert: int | None = None

    @classmethod
    def from_inputs(cls, mode: str, boundaries: str, fixed_expert: int) -> "RoutingPolicy":
        if mode == "timestep intervals":
            return cls()
        if mode == "fixed expert":
            return cls(fixed_expert=int(fixed_expert))
        if mode == "custom boundaries":
            try:
                cuts = tuple(float(v) for v in boundaries.replace(";", ",").split(",") if v.strip())
            except ValueError:
                raise ValueError(f"boundaries must be comma-separated timesteps like '250, 500, 750', got {boundaries!r}") from None
            return cls(boundaries=cuts)
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {mode!r}")

    def experts(self, t: torch.Tensor, num_experts: int) -> torch.Tensor:
        if self.fixed_expert is not None:
            if not 0 <= self.fixed_expert < num_experts:
                raise ValueError(f"fixed expert {self.fixed_expert} does not exist: this model has experts 0..{num_experts - 1}")
            return torch.full((t.numel(),), self.fixed_expert, dtype=torch.long)
        return expert_of_timestep(t.cpu(), num_experts, self.boundaries)


@dataclass
class RoutingLog:
    """What the wrapper routed, one entry per model call: (timesteps, experts) of the batch."""

    calls: list[tuple[list[float], list[int]]] = field(default_factory=list)

    def summary(self, num_experts: int) -> str:
        """Every call, timesteps to one decimal (cond and uncond of one step appear as two calls when the
        sampler runs them separately)."""
        lines, counts = [], [0] * num_experts
        for i, (ts, es) in enumerate(self.calls, 1):
            for e in es:
                counts[e] += 1
            lines.append(f"call {i}: t={', '.join(f'{t:.1f}' for t in ts)} -> expert {', '.join(map(str, es))}")
        used = [e for e in range(num_experts) if counts[e]]
        head = (f"{len(lines)} model calls routed over {num_experts} experts; experts used: {used}; "
                f"unused: {[e for e in range(num_experts) if not counts[e]]}")
        return "\n".join([head] + lines)


class ExpertRouting:
    """The APPLY_MODEL wrapper. Immutable once built; clones share it (deepcopy returns itself)."""

    def __init__(self, scales: ScaleSet | None = None, policy: RoutingPolicy = RoutingPolicy(),
                 log: RoutingLog | None = None) -> None:
        self.scales = scales
        self.policy = policy
        self.log = log
        self._scales_on: dict[torch.device, ScaleSet] = {}
        self._adapters: dict[tuple, dict] = {}

    def with_changes(self, **changes) -> "ExpertRouting":
        kw = dict(scales=self.scales, policy=self.policy, log=self.log)
        kw.update(changes)
        return ExpertRouting(**kw)

    def __deepcopy__(self, memo) -> "ExpertRouting":
        return self

    def _scales_for(self, device: torch.device) -> ScaleSet | None:
        if self.scales is None:
            return None
        if self.scales.device == device:
            return self.scales
        if device not in self._scales_on:
            self._scales_on[device] = self.scales.to(device)
        return self._scales_on[device]

    def __call__(self, executor, x, t, *args, **kwargs):
        base_model = executor.class_obj
        router = get_router(base_model.diffusion_model)
        timesteps = schedule_timestep(base_model.model_sampling, t)
        experts = self.policy.experts(timesteps, router.num_experts)
        if self.log is not None:
            self.log.calls.append(([float(v) for v in timesteps.cpu()], experts.tolist()))
        scales = self._scales_for(x.device)
        adapters = self._adapters_for(base_model, x.device)
        with router.route(experts=experts.to(x.device), scales=None if scales is None else scales.tensors,
                          adapters=adapters):
            return executor(x, t, *args, **kwargs)

    def _adapters_for(self, base_model, device: torch.device) -> dict | None:
        """The running clone's LoRA-type patches on quantized layers (ModelPatcher.pre_run names the
        clone on the model), converted once per set of patches."""
        patcher = getattr(base_model, "current_patcher", None)
        if patcher is None or patcher.model is not base_model:
            return None
        wrappers = getattr(patcher, "weight_wrapper_patches", {})
        dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()
        key = (patcher.patches_uuid, tuple(sorted((k, tuple(map(id, v))) for k, v in wrappers.items())), device, dtype)
        if key not in self._adapters:
            if len(self._adapters) >= 4:
                self._adapters.clear()  # bounded: each entry holds a LoRA's tensors on `device`
            found = lora.adapters_for(patcher, base_model.diffusion_model, device, dtype)
            lora.log_applied(lora.count(found), "at call time")
            self._adapters[key] = found
        return self._adapters[key] or None
