"""Backward formulas for comfy_kitchen's RoPE ops, so that training runs through Flux and Wan on ComfyUI 0.8.

ComfyUI 0.8's Flux, Wan (and other DiT) attention applies rotary embeddings with
`torch.ops.comfy_kitchen.apply_rope` / `apply_rope1` when comfy_kitchen is installed (comfy/ldm/flux/math.py).
Those are torch.library custom ops without an autograd formula: any backward through them fails with
"Trying to backward through comfy_kitchen.apply_rope1.default but no autograd formula was registered", so
Train TuneQDM Scales (and any other training) stops at the first step on those families.

RoPE is linear in x, so its vector-Jacobian product is computed exactly by differentiating comfy_kitchen's
own eager (pure torch) implementation of the same op. The forward is not touched: sampling keeps whatever
kernel comfy_kitchen picked. Hosts without comfy_kitchen (0.3.75) use plain torch RoPE and need nothing.
"""
from __future__ import annotations

import logging

import torch

_REGISTERED = False


def _vjp(fn, inputs: tuple[torch.Tensor, ...], freqs: torch.Tensor, grads: tuple[torch.Tensor | None, ...]):
    """Gradients of fn(*inputs, freqs) w.r.t. inputs, by autograd through the eager formula."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in inputs]
        outs = fn(*xs, freqs.detach())
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        return torch.autograd.grad([o for o, _ in pairs], xs, [g for _, g in pairs], allow_unused=True)


def register() -> bool:
    """Adds the backward formulas once; returns whether comfy_kitchen's ops were found."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from comfy_kitchen.backends.eager import rope as eager
        torch.ops.comfy_kitchen.apply_rope1  # noqa: B018 - the ops exist only when the library is loaded
        torch.ops.comfy_kitchen.apply_rope  # noqa: B018
    except (ImportError, AttributeError, RuntimeError):
        return False

    def save(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def rope1_backward(ctx, grad):
        x, freqs = ctx.saved_tensors
        (gx,) = _vjp(eager.apply_rope1, (x,), freqs, (grad,))
        return gx, None

    def rope_backward(ctx, grad_q, grad_k):
        xq, xk, freqs = ctx.saved_tensors
        gq, gk = _vjp(eager.apply_rope, (xq, xk), freqs, (grad_q, grad_k))
        return gq, gk, None

    try:
        torch.library.register_autograd("comfy_kitchen::apply_rope1", rope1_backward, setup_context=save)
        torch.library.register_autograd("comfy_kitchen::apply_rope", rope_backward, setup_context=save)
    except RuntimeError as e:  # a comfy_kitchen that ships its own formula: keep it
        logging.info("TuneQDM: comfy_kitchen RoPE autograd not added (%s)", e)
    _REGISTERED = True
    return True
