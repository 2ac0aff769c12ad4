"""Timestep-aware expert routing (TAS): the timestep range, the policies that map a timestep to an
expert, and the per-forward routing state of a quantized model.

A quantized model owns one `ExpertRouter`, shared by its layers. Whoever runs the model (a sampler
wrapper, the trainer, a test) states the current timesteps, or explicit expert indices, for the
duration of one forward; each layer then reads the expert of every sample. Keeping this state on an
object owned by the model, never in a module-level global, means two quantized models in one
process cannot see each other's routing.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch

from .adapters import Adapter
from .errors import RoutingError, SettingError

NUM_TRAIN_TIMESTEPS = 1000
"""The training timestep range: t in [0, NUM_TRAIN_TIMESTEPS), t = 0 the clean end. Experts split it."""
LAST_TIMESTEP = float(NUM_TRAIN_TIMESTEPS - 1)
"""The noisy end of the range (a discrete schedule's sigma_max); continuous schedules are placed on 0..this."""
TIMESTEP_RANGE = f"0..{NUM_TRAIN_TIMESTEPS - 1}"  # for messages and tooltips


def sample_timesteps(n: int, generator: torch.Generator) -> torch.Tensor:
    """n training timesteps, uniform in [0, NUM_TRAIN_TIMESTEPS)."""
    return torch.rand(n, generator=generator) * float(NUM_TRAIN_TIMESTEPS)


def expert_of_timestep(t: torch.Tensor, num_experts: int,
                       boundaries: Sequence[float] | None = None) -> torch.Tensor:
    """Expert index per timestep, t on the training range (t = 0 is the clean end).

    Default: uniform intervals, e = clamp(floor(t * N / NUM_TRAIN_TIMESTEPS), 0, N - 1). With `boundaries`
    (N - 1 increasing cut points), e is the number of cut points <= t.
    """
    t = torch.as_tensor(t).reshape(-1).float()
    if boundaries is None:
        e = torch.floor(t * num_experts / NUM_TRAIN_TIMESTEPS)
        return e.clamp_(0, num_experts - 1).long()
    check_boundaries(boundaries, num_experts)
    cuts = torch.as_tensor(list(boundaries), dtype=torch.float32, device=t.device)
    return torch.searchsorted(cuts, t, right=True)


def check_boundaries(boundaries: Sequence[float], num_experts: int) -> None:
    """Cut points that do not increase are a bad setting; a count that does not fit the experts, a
    policy that does not fit the model."""
    cuts = list(boundaries)
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise SettingError(f"{num_experts} experts need {num_experts - 1} increasing boundaries, got {cuts}")
    if len(cuts) != num_experts - 1:
        raise RoutingError(f"{num_experts} experts need {num_experts - 1} increasing boundaries, got {cuts}")


def uniform_boundaries(num_experts: int) -> list[float]:
    return [NUM_TRAIN_TIMESTEPS * i / num_experts for i in range(1, num_experts)]


INTERVALS, CUSTOM, FIXED = "timestep intervals", "custom boundaries", "fixed expert"
ROUTING_MODES = (INTERVALS, CUSTOM, FIXED)


@dataclass(frozen=True)
class RoutingPolicy:
    """How a timestep picks an expert: uniform intervals, custom cut points, or one fixed expert."""

    boundaries: tuple[float, ...] | None = None
    fixed_expert: int | None = None

    def __post_init__(self) -> None:
        if self.boundaries is not None and self.fixed_expert is not None:
            raise SettingError("a routing policy has boundaries or a fixed expert, not both")
        if self.boundaries is not None:
            object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))

    @property
    def mode(self) -> str:
        if self.fixed_expert is not None:
            return FIXED
        return INTERVALS if self.boundaries is None else CUSTOM

    @classmethod
    def from_inputs(cls, mode: str, boundaries: str, fixed_expert: int) -> "RoutingPolicy":
        """A policy from a mode name and its text/int settings (as a sampler's widgets give them)."""
        if mode == INTERVALS:
            return cls()
        if mode == FIXED:
            return cls(fixed_expert=int(fixed_expert))
        if mode == CUSTOM:
            try:
                cuts = tuple(float(v) for v in boundaries.replace(";", ",").split(",") if v.strip())
            except ValueError:
                raise SettingError(f"boundaries must be comma-separated timesteps like '250, 500, 750', "
                                   f"got {boundaries!r}") from None
            return cls(boundaries=cuts)
        raise SettingError(f"routing must be one of {ROUTING_MODES}, got {mode!r}")

    def check(self, num_experts: int) -> None:
        """Raise RoutingError naming why this policy cannot route a model with `num_experts` experts."""
        if self.fixed_expert is not None and not 0 <= self.fixed_expert < num_experts:
            raise RoutingError(f"fixed expert {self.fixed_expert} does not exist: this model has experts "
                               f"0..{num_experts - 1}")
        if self.boundaries is not None:
            check_boundaries(self.boundaries, num_experts)

    def experts(self, t: torch.Tensor, num_experts: int) -> torch.Tensor:
        """The expert of each timestep (on the CPU)."""
        self.check(num_experts)
        t = torch.as_tensor(t).reshape(-1)
        if self.fixed_expert is not None:
            return torch.full((t.numel(),), self.fixed_expert, dtype=torch.long)
        return expert_of_timestep(t.cpu(), num_experts, self.boundaries)

    def to_json(self) -> dict:
        return {"mode": self.mode, "boundaries": None if self.boundaries is None else list(self.boundaries),
                "fixed_expert": self.fixed_expert}

    @classmethod
    def from_json(cls, value: dict) -> "RoutingPolicy":
        mode = value.get("mode", INTERVALS)
        if mode == INTERVALS:
            return cls()
        if mode == CUSTOM:
            return cls(boundaries=tuple(value["boundaries"]))
        if mode == FIXED:
            return cls(fixed_expert=int(value["fixed_expert"]))
        raise SettingError(f"unknown routing mode {mode!r} (known: {', '.join(ROUTING_MODES)})")

    def describe(self) -> str:
        if self.fixed_expert is not None:
            return f"{FIXED} {self.fixed_expert}"
        return INTERVALS if self.boundaries is None else f"{CUSTOM} {', '.join(f'{b:g}' for b in self.boundaries)}"


@dataclass
class RoutingLog:
    """What a sampler routed, one entry per model call: (timesteps, experts) of the batch."""

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


class ExpertRouter:
    """Per-forward routing state of one quantized model.

    `policy` is the model's routing policy (its TuneQDMConfig's), used when a forward is routed by
    timesteps. `expert_index` holds one expert per sample of the current batch. `scales`, when set, replaces
    the layers' own scales for this forward (name -> (s_out, s_in)); that is how model clones that
    share modules still sample with their own scales without ever writing into the modules.
    """

    def __init__(self, num_experts: int, policy: RoutingPolicy | None = None) -> None:
        self.num_experts = num_experts
        self.policy = policy or RoutingPolicy()
        self.expert_index: torch.Tensor | None = None
        self.scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.adapters: Mapping[str, tuple[Adapter, ...]] | None = None

    @contextmanager
    def route(self, timesteps: torch.Tensor | None = None, *, experts: torch.Tensor | None = None,
              policy: RoutingPolicy | None = None,
              scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
              adapters: Mapping[str, tuple[Adapter, ...]] | None = None) -> Iterator[torch.Tensor | None]:
        """Route one forward by timesteps (on the training range, through `policy`, default the model's)
        or by explicit expert indices, optionally with other scales and with adapters (layer
        name -> adapters, see adapters.py); restores the previous state on exit so nested or failed calls
        leave nothing behind."""
        if timesteps is not None and experts is not None:
            raise SettingError("give timesteps or experts, not both")
        if timesteps is not None:
            experts = (policy or self.policy).experts(timesteps, self.num_experts)
        if experts is not None:
            experts = torch.as_tensor(experts).reshape(-1).long()
            if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= self.num_experts):
                raise RoutingError(f"expert index out of range 0..{self.num_experts - 1}: {experts.tolist()}")
        saved = self.expert_index, self.scales, self.adapters
        self.expert_index = experts
        if scales is not None:
            self.scales = scales
        if adapters is not None:
            self.adapters = adapters
        try:
            yield experts
        finally:
            self.expert_index, self.scales, self.adapters = saved

    def experts_for_batch(self, batch: int, device: torch.device) -> torch.Tensor:
        """One expert index per row of a layer input with `batch` rows."""
        if self.expert_index is None:
            if self.num_experts == 1:
                return torch.zeros(batch, dtype=torch.long, device=device)
            raise RoutingError(
                f"this model has {self.num_experts} timestep experts but no timestep was given; run it "
                "through ExpertRouter.route(...) (in ComfyUI: through the TuneQDM-quantized MODEL)")
        e = self.expert_index
        if e.device != device:
            e = e.to(device, non_blocking=True)
        if e.numel() == batch:
            return e
        if e.numel() and batch % e.numel() == 0:
            # Some models fold extra axes (frames, patches) into the batch as (b, k): keep each
            # sample's expert for all its k rows.
            return e.repeat_interleave(batch // e.numel())
        raise RoutingError(f"routing was set for {e.numel()} samples but a layer got a batch of {batch}")
