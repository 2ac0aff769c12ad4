"""Headless TuneQDM training: fine-tune only the scales of a quantized model, one expert per
timestep interval. The ComfyUI node and scripts share this loop; what differs between them (how a
sample is noised and scored, which model family) comes in as `loss_fn`.

Each step draws one timestep per sample, uniform over the training range (routing.NUM_TRAIN_TIMESTEPS),
and routes it to its expert by the starting scales' routing policy (the model's: uniform intervals,
custom boundaries or a fixed expert), as sampling with those scales will. Samples are grouped by image set and
conditioning; each group runs forward and backward inside its own routing context (activation
checkpointing recomputes forwards during backward, which must see the same experts). With gradient
accumulation a step sums the gradients of several such batches. Only the experts that some sample
used are updated (ExpertAdamW); gradients are clipped over all scales.

Data-parallel training (tuneqdm_train) comes in through two optional arguments: `generators`, the seed
streams a batch is drawn from (one per rank, or several in one process to reproduce a multi-rank run),
and `sync`, which combines each step's gradients, experts used and loss with the other ranks' before
clipping, so every rank takes the same optimizer step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .checkpointing import checkpointed
from .errors import NonFiniteLossError, SettingError, TrainingDataError
from .model import get_router, model_config
from .optim import ExpertAdamW
from .routing import sample_timesteps
from .scales import ScaleSet, trainable

LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(x0 latents (B, ...), timesteps (B,) on the training range, conditioning index) -> per-sample loss (B,)."""
GradientSync = Callable[[list[torch.Tensor], set[int], float], tuple[set[int], float]]
"""(trainable scales holding this process's gradients: every layer's s_out in `start`'s order, then every
s_in when they train (`trains_s_in`); the experts it used; its step loss) -> (experts to update, step loss), the gradients
replaced in place by the combined ones (e.g. all-reduced over ranks)."""


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
    grad_accumulation_steps: int = 1  # batches whose gradients one optimizer step sums

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accumulation_steps < 1:
            raise SettingError(f"steps, batch_size and grad_accumulation_steps must be at least 1, got {self.steps}, "
                             f"{self.batch_size}, {self.grad_accumulation_steps}")


@dataclass(frozen=True)
class SampleSet:
    """Training images of one size as latents (N, C, H, W) with conditioning `cond`: one index for all,
    or one per image (captions). `prior` marks class images (prior preservation), weighted by
    TrainConfig.prior_weight. Sets with the same `subject` (default: their own `cond`) are one subject
    split by image size (resolution buckets): each sample draws a subject, then one of its images."""

    latents: torch.Tensor
    cond: int | tuple[int, ...]
    prior: bool = False
    subject: int | None = None

    def __post_init__(self) -> None:
        if self.latents.shape[0] == 0:
            raise TrainingDataError(f"empty image batch for conditioning {self.cond}")
        if isinstance(self.cond, tuple) and len(self.cond) != self.latents.shape[0]:
            raise TrainingDataError(f"{len(self.cond)} conditionings for {self.latents.shape[0]} images")

    def cond_of(self, index: int) -> int:
        return self.cond[index] if isinstance(self.cond, tuple) else self.cond

    @property
    def subject_key(self) -> object:
        return ("cond", self.cond) if self.subject is None else ("subject", self.subject)


@dataclass
class TrainResult:
    scales: ScaleSet
    steps_done: int
    partial: bool
    history: list[tuple[int, int, float]] = field(default_factory=list)  # (step, expert, loss) per sample
    losses: list[float] = field(default_factory=list)  # the loss of each step this run took

    def expert_curves(self, num_experts: int) -> list[list[tuple[int, float]]]:
        curves: list[list[tuple[int, float]]] = [[] for _ in range(num_experts)]
        for step, expert, loss in self.history:
            curves[expert].append((step, loss))
        return curves


def training_record(done: int, planned: int, partial: bool, resumed_from: str | None = None,
                    stopped_by: str = "interrupted") -> dict[str, str]:
    """What a run did, as ScaleSet.info (a scales file's training record): steps done and planned, whether it
    stopped early and why, which file it continued."""
    info = {"steps_done": str(done), "steps_planned": str(planned), "partial": "1" if partial else "0"}
    if partial:
        info["stopped_by"] = stopped_by
    if resumed_from:
        info["resumed_from"] = resumed_from
    return info


def _snapshot(scales: ScaleSet) -> ScaleSet:
    return dataclasses.replace(scales, tensors={k: (o.detach().clone(), i.detach().clone())
                                                for k, (o, i) in scales.tensors.items()}, info=dict(scales.info))


def _generator(seed: int, start_step: int) -> torch.Generator:
    # A resumed run must not replay the draws of the steps already taken.
    return torch.Generator().manual_seed(seed if start_step == 0 else (seed * 1_000_003 + start_step) % 2**63)


def train_scales(model: nn.Module, start: ScaleSet, data: Sequence[SampleSet], loss_fn: LossFn,
                 config: TrainConfig, on_step: Callable[[int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 stop_exceptions: tuple[type[BaseException], ...] = (), start_step: int = 0,
                 sync: GradientSync | None = None, generators: Sequence[torch.Generator] | None = None) -> TrainResult:
    """Train a copy of `start` on `data`, each sample's expert picked by `start.policy`; `model`
    (quantized) is only read. `on_step(step, loss)` after
    each step (progress); `should_stop()` before each step: True ends the run early, result marked
    partial. One of `stop_exceptions` raised inside a step (a host's interrupt) ends the run the same
    way: that step is dropped, the scales are those of the last complete step. `start_step` resumes a
    partial run: `start` holds its scales, steps start_step+1..config.steps are taken (the optimizer's
    moments start afresh: scales files do not hold them). `generators`: the seed streams each batch is
    drawn from, config.batch_size / len(generators) samples from each (default: one stream from
    config.seed). `sync`: see GradientSync; called once per step, after its batches, before clipping."""
    if not data:
        raise TrainingDataError("no training images")
    if not 0 <= start_step < config.steps:
        raise SettingError(f"cannot resume at step {start_step} of a {config.steps}-step run: "
                         f"steps must be more than the {start_step} already done")
    if generators is not None and (not generators or config.batch_size % len(generators)):
        raise SettingError(f"batch size {config.batch_size} cannot be split evenly over "
                         f"{len(generators or ())} sample streams")
    router = get_router(model)
    start.policy.check(router.num_experts)
    train_s_in = trains_s_in(model, config)
    scales = trainable(start, train_s_in)
    groups = [dict(params=[o for o, _ in scales.tensors.values()], lr=config.lr_s_out)]
    if train_s_in:
        groups.append(dict(params=[i for _, i in scales.tensors.values()], lr=config.lr_s_in))
    opt = ExpertAdamW(groups, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    gens = list(generators) if generators is not None else [_generator(config.seed, start_step)]
    instance = _subjects([s for s in data if not s.prior])
    prior = _subjects([s for s in data if s.prior])
    history: list[tuple[int, int, float]] = []
    losses: list[float] = []
    steps_done, partial = start_step, False

    with checkpointed(model, config.checkpointing):
        for step in range(start_step, config.steps):
            if should_stop is not None and should_stop():
                partial = True
                break
            opt.zero_grad(set_to_none=True)
            total, used, records = 0.0, set(), []
            try:
                for _ in range(config.grad_accumulation_steps):
                    loss, experts, batch = _batch_gradients(router, scales, instance, prior, loss_fn, config, gens,
                                                            step, steps_done, history)
                    total += loss
                    used |= experts
                    records += batch
                if sync is not None:
                    # Inside the try: a stop raised while waiting for the other ranks drops this step too.
                    used, total = sync(params, used, total)
            except stop_exceptions:
                partial = True
                break
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step(torch.tensor(sorted(used)))
            history.extend(records)
            losses.append(total)
            steps_done = step + 1
            if on_step is not None:
                on_step(steps_done, total)
    return TrainResult(_snapshot(scales), steps_done, partial, history, losses)


def trains_s_in(model: nn.Module, config: TrainConfig) -> bool:
    """Whether a run trains s_in: asked for by `config` and allowed by the model's config (a PEQA model keeps
    s_in frozen)."""
    return config.train_s_in and model_config(model).train_s_in


def _subjects(sets: list[SampleSet]) -> list[list[SampleSet]]:
    """Sets grouped by subject, in order of first appearance."""
    groups: dict[object, list[SampleSet]] = {}
    for s in sets:
        groups.setdefault(s.subject_key, []).append(s)
    return list(groups.values())


def _batch_gradients(router, scales: ScaleSet, instance: list[list[SampleSet]], prior: list[list[SampleSet]],
                     loss_fn: LossFn, config: TrainConfig, gens: list[torch.Generator], step: int,
                     steps_done: int, history: list) -> tuple[float, set[int], list[tuple[int, int, float]]]:
    """Forward and backward of one batch: its loss (a share of the step's mean), the experts used, per-sample records."""
    used: set[int] = set()
    records: list[tuple[int, int, float]] = []
    total = 0.0
    share = config.batch_size * config.grad_accumulation_steps  # the step's loss is the mean over all its samples
    per_stream = config.batch_size // len(gens)
    for kind, weight in ((instance, 1.0), (prior, config.prior_weight)):
        if not kind:
            continue
        # Each sample picks a subject and then an image, so two subjects are trained equally however many
        # images each has. Every stream draws its share in turn; a subject's draws from all streams then
        # run as one batch (with one stream: the order of draws and forwards of a plain run).
        drawn: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for gen in gens:
            picks = torch.randint(len(kind), (per_stream,), generator=gen).tolist()
            for subject in sorted(set(picks)):
                n = picks.count(subject)
                flat = torch.randint(sum(s.latents.shape[0] for s in kind[subject]), (n,), generator=gen)
                drawn.setdefault(subject, []).append((flat, sample_timesteps(n, gen)))
        for subject in sorted(drawn):
            sets = kind[subject]
            flat = torch.cat([f for f, _ in drawn[subject]])
            t = torch.cat([ts for _, ts in drawn[subject]])
            for s, idx, ts in _split(sets, flat, t):
                experts = scales.policy.experts(ts, router.num_experts)
                with router.route(experts=experts, scales=scales.tensors):
                    per_sample = loss_fn(s.latents[idx], ts, s.cond_of(int(idx[0])))
                    loss = per_sample.sum() * (weight / share)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"non-finite loss at step {step + 1} (timesteps {ts.tolist()}); training stopped, "
                            f"the scales of step {steps_done} are kept",
                            TrainResult(_snapshot(scales), steps_done, True, list(history)))
                    loss.backward()
                total += float(loss.detach())
                used.update(experts.tolist())
                records.extend((step + 1, int(e), float(v)) for e, v in zip(experts, per_sample.detach()))
    return total, used, records


def _split(sets: list[SampleSet], flat: torch.Tensor,
           t: torch.Tensor) -> list[tuple[SampleSet, torch.Tensor, torch.Tensor]]:
    """A subject's drawn (image, timestep) pairs as groups that share a set (one latent size) and a conditioning."""
    groups: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for j, index in enumerate(flat.tolist()):
        for k, s in enumerate(sets):
            if index < s.latents.shape[0]:
                break
            index -= s.latents.shape[0]
        idx, pos = groups.setdefault((k, sets[k].cond_of(index)), ([], []))
        idx.append(index)
        pos.append(j)
    return [(sets[k], torch.tensor(idx), t[torch.tensor(pos)]) for (k, _), (idx, pos) in groups.items()]
