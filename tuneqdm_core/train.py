"""Headless TuneQDM training: fine-tune only the scales of a quantized model, one expert per
timestep interval. The ComfyUI node and scripts share this loop; what differs between them (how a
sample is noised and scored, which model family) comes in as `loss_fn`.

Each step draws one timestep per sample, uniform in [0, 1000). Samples are grouped by conditioning;
each group runs forward and backward inside its own routing context (activation checkpointing
recomputes forwards during backward, which must see the same experts). Only the experts that some
sample used are updated (ExpertAdamW); gradients are clipped over all scales.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .checkpointing import checkpointed
from .errors import TuneQDMError
from .model import get_router
from .optim import ExpertAdamW
from .routing import expert_of_timestep
from .scales import ScaleSet, trainable

LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(x0 latents (B, ...), timesteps (B,) on 0..999, conditioning index) -> per-sample loss (B,)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    lr_s_out: float = 3e-6
    lr_s_in: float = 1e-4  # s_in ~ 1 while s_out ~ 1e-3..1e-2: one shared rate would barely move s_in
    train_s_in: bool = True
    batch_size: int = 1
    seed: int = 0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    prior_weight: float = 1.0
    checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be at least 1, got {self.steps}, {self.batch_size}")


@dataclass(frozen=True)
class SampleSet:
    """Training images of one kind as latents (N, C, H, W), sharing conditioning `cond`. `prior`
    marks class images (prior preservation), weighted by TrainConfig.prior_weight."""

    latents: torch.Tensor
    cond: int
    prior: bool = False

    def __post_init__(self) -> None:
        if self.latents.shape[0] == 0:
            raise ValueError(f"empty image batch for conditioning {self.cond}")


@dataclass
class TrainResult:
    scales: ScaleSet
    steps_done: int
    partial: bool
    history: list[tuple[int, int, float]] = field(default_factory=list)  # (step, expert, loss) per sample

    def expert_curves(self, num_experts: int) -> list[list[tuple[int, float]]]:
        curves: list[list[tuple[int, float]]] = [[] for _ in range(num_experts)]
        for step, expert, loss in self.history:
            curves[expert].append((step, loss))
        return curves


class NonFiniteLossError(TuneQDMError):
    """Training produced a NaN/inf loss; `result` holds the last finite scales (no step taken on it)."""

    def __init__(self, message: str, result: TrainResult) -> None:
        super().__init__(message)
        self.result = result


def _snapshot(scales: ScaleSet) -> ScaleSet:
    return ScaleSet({k: (o.detach().clone(), i.detach().clone()) for k, (o, i) in scales.tensors.items()},
                    scales.bits, scales.experts, scales.fingerprint)


def train_scales(model: nn.Module, start: ScaleSet, data: Sequence[SampleSet], loss_fn: LossFn,
                 config: TrainConfig, on_step: Callable[[int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 stop_exceptions: tuple[type[BaseException], ...] = ()) -> TrainResult:
    """Train a copy of `start` on `data`; `model` (quantized) is only read. `on_step(step, loss)` after
    each step (progress); `should_stop()` before each step: True ends the run early, result marked
    partial. One of `stop_exceptions` raised inside a step (a host's interrupt) ends the run the same
    way: that step is dropped, the scales are those of the last complete step."""
    if not data:
        raise ValueError("no training images")
    router = get_router(model)
    scales = trainable(start, config.train_s_in)
    groups = [dict(params=[o for o, _ in scales.tensors.values()], lr=config.lr_s_out)]
    if config.train_s_in:
        groups.append(dict(params=[i for _, i in scales.tensors.values()], lr=config.lr_s_in))
    opt = ExpertAdamW(groups, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator().manual_seed(config.seed)
    instance = [s for s in data if not s.prior]
    prior = [s for s in data if s.prior]
    history: list[tuple[int, int, float]] = []
    steps_done, partial = 0, False

    with checkpointed(model, config.checkpointing):
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                partial = True
                break
            opt.zero_grad(set_to_none=True)
            try:
                total, used, records = _step_gradients(router, scales, instance, prior, loss_fn, config, gen,
                                                       step, steps_done, history)
            except stop_exceptions:
                partial = True
                break
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step(torch.tensor(sorted(used)))
            history.extend(records)
            steps_done = step + 1
            if on_step is not None:
                on_step(steps_done, total)
    return TrainResult(_snapshot(scales), steps_done, partial, history)


def _step_gradients(router, scales: ScaleSet, instance: list[SampleSet], prior: list[SampleSet], loss_fn: LossFn,
                    config: TrainConfig, gen: torch.Generator, step: int,
                    steps_done: int, history: list) -> tuple[float, set[int], list[tuple[int, int, float]]]:
    """Forward and backward of one step's samples: the step's loss, the experts used, per-sample records."""
    used: set[int] = set()
    records: list[tuple[int, int, float]] = []
    total = 0.0
    for kind, weight in ((instance, 1.0), (prior, config.prior_weight)):
        if not kind:
            continue
        # Each sample picks a set (a subject) and then an image, so two subjects are trained equally
        # however many images each has.
        picks = torch.randint(len(kind), (config.batch_size,), generator=gen).tolist()
        for set_index in sorted(set(picks)):
            s = kind[set_index]
            n = picks.count(set_index)
            idx = torch.randint(s.latents.shape[0], (n,), generator=gen)
            t = torch.rand(n, generator=gen) * 1000.0
            experts = expert_of_timestep(t, router.num_experts)
            with router.route(experts=experts, scales=scales.tensors):
                per_sample = loss_fn(s.latents[idx], t, s.cond)
                loss = per_sample.sum() * (weight / config.batch_size)  # mean over the step's samples
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} (timesteps {t.tolist()}); training stopped, "
                        f"the scales of step {steps_done} are kept",
                        TrainResult(_snapshot(scales), steps_done, True, list(history)))
                loss.backward()
            total += float(loss.detach())
            used.update(experts.tolist())
            records.extend((step + 1, int(e), float(v)) for e, v in zip(experts, per_sample.detach()))
    return total, used, records
