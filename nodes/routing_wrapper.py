"""Sampling-time expert routing for ComfyUI: a keyed APPLY_MODEL wrapper on the MODEL.

ComfyUI's quantized layers never see the timestep. The wrapper receives the current sigma and the
BaseModel (executor.class_obj), converts sigma to the training timestep through the model's own
`model_sampling` (model_schedule.py), and routes each sample of the batch to its expert for the duration
of that one call. Because it sits on the MODEL, stock KSampler, KSamplerAdvanced and SamplerCustomAdvanced
route exactly like the Expert-Routed Sampler.

The wrapper also carries the scales a MODEL clone samples with, so clones that share modules
never write into them: the scales are activated for one call and restored after it. In the same way it
hands the running clone's LoRA-type patches to the quantized layers as adapters (lora.py).
"""
from __future__ import annotations

import torch

from ..tuneqdm_core import ScaleSet, get_router, model_config
from ..tuneqdm_core.routing import RoutingLog, RoutingPolicy
from . import lora
from .model_schedule import schedule_timestep

WRAPPER_KEY = "tuneqdm"


class ExpertRouting:
    """The APPLY_MODEL wrapper. Immutable once built; clones share it (deepcopy returns itself).

    `policy` None routes by the model's own policy (its TuneQDMConfig's); scales loaded or trained come
    with the policy they were trained for, and the Expert-Routed Sampler states one explicitly."""

    def __init__(self, scales: ScaleSet | None = None, policy: RoutingPolicy | None = None,
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

    def policy_for(self, base_model) -> RoutingPolicy:
        """The policy this MODEL routes by (base_model: its ComfyUI BaseModel)."""
        return self.policy if self.policy is not None else model_config(base_model.diffusion_model).routing

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
        experts = self.policy_for(base_model).experts(timesteps, router.num_experts)
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
