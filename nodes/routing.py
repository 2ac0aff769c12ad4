"""Sampling-time expert routing for ComfyUI: a keyed APPLY_MODEL wrapper on the MODEL.

ComfyUI's quantized layers never see the timestep. The wrapper receives the current sigma and the
BaseModel (executor.class_obj), converts sigma to the 0..999 training timestep through the model's
own `model_sampling` (object patches such as ModelSamplingDiscrete included), and routes each sample
of the batch to its expert for the duration of that one call. Because it sits on the MODEL, stock
KSampler, KSamplerAdvanced and SamplerCustomAdvanced route exactly like the Expert-Routed Sampler.

The wrapper also carries the scales a MODEL clone samples with, so clones that share modules
never write into them: the scales are activated for one call and restored after it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tuneqdm_core import ScaleSet, expert_of_timestep, get_router

WRAPPER_KEY = "tuneqdm"
ROUTING_MODES = ("timestep intervals", "custom boundaries", "fixed expert")


def schedule_timestep(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """sigma -> t on the 0..999 scale the experts were split on (t = 0 the clean end).

    Discrete (eps / v) models: their own timestep. Others (flow matching, EDM): the position of the
    model's timestep between its sigma_min and sigma_max ends, stretched to 0..1000.
    """
    t = model_sampling.timestep(sigma).float()
    if hasattr(model_sampling, "log_sigmas"):
        return t
    lo, hi = _timestep_range(model_sampling)
    return ((t - lo) / (hi - lo) * 1000.0).clamp(0.0, 999.999)


def sigma_of_timestep(model_sampling, t: torch.Tensor) -> torch.Tensor:
    """Inverse of `schedule_timestep` (used to noise training samples with the model's schedule)."""
    t = t.float()
    if hasattr(model_sampling, "log_sigmas"):
        return model_sampling.sigma(t)
    lo, hi = _timestep_range(model_sampling)
    return model_sampling.sigma(lo + (hi - lo) * t / 1000.0)


def _timestep_range(model_sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own timesteps at its sigma_min and sigma_max ends."""
    ends = (model_sampling.sigma_min, model_sampling.sigma_max)
    return tuple(model_sampling.timestep(torch.as_tensor(e)).float() for e in ends)


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
        lines, counts, last = [], [0] * num_experts, None
        for ts, es in self.calls:
            if (ts, es) == last:
                continue  # cond and uncond batches of one step
            last = (ts, es)
            for e in es:
                counts[e] += 1
            lines.append(f"call {len(lines) + 1}: t={', '.join(f'{t:.0f}' for t in ts)} -> expert "
                         f"{', '.join(map(str, es))}")
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
            self.log.calls.append(([round(float(v), 1) for v in timesteps.cpu()], experts.tolist()))
        scales = self._scales_for(x.device)
        with router.route(experts=experts.to(x.device), scales=None if scales is None else scales.tensors):
            return executor(x, t, *args, **kwargs)
