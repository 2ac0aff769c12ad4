"""Timestep-aware expert routing (TAS).

A quantized model owns one `ExpertRouter`, shared by its layers. Whoever runs the model (a sampler
wrapper, the trainer, a test) states the current timesteps, or explicit expert indices, for the
duration of one forward; each layer then reads the expert of every sample. Keeping this state on an
object owned by the model, never in a module-level global, means two quantized models in one
process cannot see each other's routing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from .adapters import Adapter
from .errors import RoutingError

NUM_TRAIN_TIMESTEPS = 1000


def expert_of_timestep(t: torch.Tensor, num_experts: int,
                       boundaries: Sequence[float] | None = None) -> torch.Tensor:
    """Expert index per timestep, t on the 0..999 training scale (t = 0 is the clean end).

    Default: uniform intervals, e = clamp(floor(t * N / 1000), 0, N - 1). With `boundaries` (N - 1
    increasing cut points), e is the number of cut points <= t.
    """
    t = torch.as_tensor(t).reshape(-1).float()
    if boundaries is None:
        e = torch.floor(t * num_experts / NUM_TRAIN_TIMESTEPS)
        return e.clamp_(0, num_experts - 1).long()
    cuts = torch.as_tensor(list(boundaries), dtype=torch.float32, device=t.device)
    if cuts.numel() != num_experts - 1 or (cuts.numel() > 1 and bool((cuts[1:] <= cuts[:-1]).any())):
        raise ValueError(f"{num_experts} experts need {num_experts - 1} increasing boundaries, got {list(boundaries)}")
    return torch.searchsorted(cuts, t, right=True)


def uniform_boundaries(num_experts: int) -> list[float]:
    return [NUM_TRAIN_TIMESTEPS * i / num_experts for i in range(1, num_experts)]


class ExpertRouter:
    """Per-forward routing state of one quantized model.

    `expert_index` holds one expert per sample of the current batch. `scales`, when set, replaces
    the layers' own scales for this forward (name -> (s_out, s_in)); that is how model clones that
    share modules still sample with their own scales without ever writing into the modules.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.expert_index: torch.Tensor | None = None
        self.scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.adapters: Mapping[str, tuple[Adapter, ...]] | None = None

    @contextmanager
    def route(self, timesteps: torch.Tensor | None = None, *, experts: torch.Tensor | None = None,
              boundaries: Sequence[float] | None = None,
              scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
              adapters: Mapping[str, tuple[Adapter, ...]] | None = None) -> Iterator[torch.Tensor | None]:
        """Route one forward by timesteps (0..999) or by explicit expert indices, optionally with other
        scales and with adapters (layer name -> adapters, see adapters.py); restores the previous state
        on exit so nested or failed calls leave nothing behind."""
        if timesteps is not None and experts is not None:
            raise ValueError("give timesteps or experts, not both")
        if timesteps is not None:
            experts = expert_of_timestep(timesteps, self.num_experts, boundaries)
        if experts is not None:
            experts = torch.as_tensor(experts).reshape(-1).long()
            if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= self.num_experts):
                raise ValueError(f"expert index out of range 0..{self.num_experts - 1}: {experts.tolist()}")
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
