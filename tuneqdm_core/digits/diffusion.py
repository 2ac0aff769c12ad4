"""Plain-torch training loss and sampler for eps-prediction models with a discrete 1000-step schedule
(the default model's, SD1.5's). The quality benchmark uses them; ComfyUI graphs use ComfyUI's own.
A quantized model is routed per sample by the timestep of each call."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Mapping

import torch
from torch import nn

from ..model import get_router, is_quantized


def _routed(net: nn.Module, t: torch.Tensor, scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None):
    return get_router(net).route(timesteps=t, scales=scales) if is_quantized(net) else nullcontext()


def eps_loss(net: nn.Module, alphas: torch.Tensor, contexts: list[torch.Tensor], gen: torch.Generator
             ) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """A `tuneqdm_core.train.LossFn`: noise x0 to timestep t and score the eps prediction per sample.
    `contexts[cond]` is (1, L, C). The trainer routes scales itself, so no routing here."""
    def loss(x0: torch.Tensor, t: torch.Tensor, cond: int) -> torch.Tensor:
        step = t.long()
        a = alphas[step].view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=gen)
        pred = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, step.float(), context=contexts[cond].expand(len(x0), -1, -1))
        return (pred - eps).pow(2).flatten(1).mean(1)
    return loss


@torch.no_grad()
def ddim_sample(net: nn.Module, alphas: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor, n: int,
                shape: tuple[int, ...], steps: int, cfg: float, gen: torch.Generator,
                scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Deterministic DDIM with classifier-free guidance -> x0 (n, *shape), as process_latent_in sees them.
    `context` is (1, L, C) for all samples or (n, L, C), one per sample. `scales` (a quantized model's,
    e.g. trained ones) replace the model's own for these calls."""
    ts = torch.linspace(999, 0, steps).round().long()
    x = torch.randn((n, *shape), generator=gen)
    ctx = torch.cat([context.expand(n, -1, -1), uncond.expand(n, -1, -1)])
    for i, t in enumerate(ts):
        a = alphas[t]
        a_next = alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        tt = t.float().expand(2 * n)
        with _routed(net, tt, scales):
            e_cond, e_uncond = net(torch.cat([x, x]), tt, context=ctx).chunk(2)
        eps = e_uncond + cfg * (e_cond - e_uncond)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x
