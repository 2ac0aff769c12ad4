"""A set of trained scales detached from any module: what training produces, what a scales file
holds, and what a model clone activates for its forwards (through ExpertRouter.route(scales=...))."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ModelMismatchError, RoutingError
from .model import fingerprint, model_config, quantized_layers
from .routing import RoutingPolicy


@dataclass(frozen=True)
class ScaleSet:
    """name -> (s_out (N, out), s_in (N, in)) for every quantized layer of one base model."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    bits: int
    experts: int
    fingerprint: str
    # Where the values come from (training steps done / planned, partial): written to and read from a
    # scales file's metadata, never used in computation.
    info: dict[str, str] = field(default_factory=dict, compare=False)
    # The routing the scales were trained for, and are sampled with: each expert's scales belong to its
    # timestep interval. Recorded in a scales file's config.
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)

    def to(self, device: torch.device | str) -> "ScaleSet":
        moved = {k: (o.to(device), i.to(device)) for k, (o, i) in self.tensors.items()}
        return dataclasses.replace(self, tensors=moved, info=dict(self.info))

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values()))[0].device

    def num_values(self) -> int:
        return sum(o.numel() + i.numel() for o, i in self.tensors.values())

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.tensors.values() for t in pair]


def scales_of(module: nn.Module) -> ScaleSet:
    """A detached copy of the model's own scales."""
    cfg = model_config(module)
    tensors = {name: (m.s_out.detach().clone(), m.s_in.detach().clone()) for name, m in quantized_layers(module)}
    return ScaleSet(tensors, cfg.bits, cfg.experts, fingerprint(module), policy=cfg.routing)


def trainable(scales: ScaleSet, train_s_in: bool) -> ScaleSet:
    """Fresh float32 leaf tensors to optimise; the input set is left as it was."""
    tensors = {k: (nn.Parameter(o.detach().float().clone()),
                   nn.Parameter(i.detach().float().clone(), requires_grad=train_s_in))
               for k, (o, i) in scales.tensors.items()}
    return dataclasses.replace(scales, tensors=tensors, info=dict(scales.info))


def check_compatible(scales: ScaleSet, module: nn.Module, source: str = "scales") -> None:
    """Raise ModelMismatchError naming the first way `scales` does not fit `module`."""
    cfg = model_config(module)
    if scales.bits != cfg.bits:
        raise ModelMismatchError(f"{source} are for a W{scales.bits} model, but this model is W{cfg.bits}")
    if scales.experts != cfg.experts:
        raise ModelMismatchError(f"{source} have {scales.experts} experts, but this model has {cfg.experts}")
    try:
        scales.policy.check(cfg.experts)
    except RoutingError as e:
        raise ModelMismatchError(f"{source}: routing {scales.policy.describe()}: {e}") from None
    layers = dict(quantized_layers(module))
    for name in layers:
        if name not in scales.tensors:
            raise ModelMismatchError(f"{source} have no entry for layer {name!r} of this model")
    for name, (s_out, s_in) in scales.tensors.items():
        m = layers.get(name)
        if m is None:
            raise ModelMismatchError(f"{source} name layer {name!r}, which this model does not have")
        if tuple(s_out.shape) != tuple(m.s_out.shape) or tuple(s_in.shape) != tuple(m.s_in.shape):
            raise ModelMismatchError(
                f"layer {name!r}: {source} have s_out {tuple(s_out.shape)} / s_in {tuple(s_in.shape)}, "
                f"this model has {tuple(m.s_out.shape)} / {tuple(m.s_in.shape)}")
    fp = fingerprint(module)
    if scales.fingerprint != fp:
        raise ModelMismatchError(
            f"{source} were trained on another base model (fingerprint {scales.fingerprint}, this model {fp}): "
            "same architecture, different weights or quantization")
