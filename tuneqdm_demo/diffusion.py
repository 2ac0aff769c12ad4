"""Plain-torch training loss and sampler for eps- or v-prediction models on a discrete 1000-step schedule
(the default model's: SD1.5's schedule, v-prediction). The quality benchmark uses them; ComfyUI graphs use
ComfyUI's own. A quantized model is routed per sample by the timestep of each call."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Mapping

import torch
from torch import nn

from .core import LAST_TIMESTEP, get_router, is_quantized

Scales = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def _routed(net: nn.Module, t: torch.Tensor, scales: Scales | None):
    return get_router(net).route(timesteps=t, scales=scales) if is_quantized(net) else nullcontext()


def loss_fn(net: nn.Module, alphas: torch.Tensor, contexts: list[torch.Tensor], gen: torch.Generator,
            v_prediction: bool) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """A `tuneqdm_core.train.LossFn`: noise x0 to timestep t and score the prediction per sample (MSE to
    eps, or to v = sqrt(a) eps - sqrt(1 - a) x0). `contexts[cond]` is (1, L, C). The trainer routes the
    scales itself, so no routing here."""
    def loss(x0: torch.Tensor, t: torch.Tensor, cond: int) -> torch.Tensor:
        step = t.long()
        a = alphas[step].view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=gen)
        pred = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, step.float(), context=contexts[cond].expand(len(x0), -1, -1))
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if v_prediction else eps
        return (pred - target).pow(2).flatten(1).mean(1)
    return loss


@torch.no_grad()
def ddim_sample(net: nn.Module, alphas: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor, n: int,
                shape: tuple[int, ...], steps: int, cfg: float, gen: torch.Generator, v_prediction: bool,
                scales: Scales | None = None) -> torch.Tensor:
    """Deterministic DDIM with classifier-free guidance -> x0 (n, *shape), as process_latent_in sees them.
    Like ComfyUI's samplers it never clamps x0. `context` is (1, L, C) for all samples or (n, L, C), one
    per sample. `scales` (a quantized model's, e.g. trained ones) replace the model's own for these calls."""
    ts = torch.linspace(LAST_TIMESTEP, 0, steps).round().long()
    x = torch.randn((n, *shape), generator=gen)
    ctx = torch.cat([context.expand(n, -1, -1), uncond.expand(n, -1, -1)])
    for i, t in enumerate(ts):
        a = alphas[t]
        a_next = alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        tt = t.float().expand(2 * n)
        with _routed(net, tt, scales):
            out_cond, out_uncond = net(torch.cat([x, x]), tt, context=ctx).chunk(2)
        out = out_uncond + cfg * (out_cond - out_uncond)
        if v_prediction:
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = (1 - a).sqrt() * x + a.sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x
