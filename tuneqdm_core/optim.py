"""AdamW for expert tables that moves only the experts a step actually used.

Scales are (N, C) tables, one row per timestep expert. Stock AdamW would still move the rows of
experts no sample was drawn for (their momentum keeps pushing, weight decay keeps shrinking), so an
expert would drift on steps it never saw. Here each row has its own step count and is updated only
when its expert is named in `step(experts)`; the arithmetic per row is exactly torch's AdamW.
"""
from __future__ import annotations

from typing import Iterable

import torch


class ExpertAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 3e-6, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, experts: torch.Tensor) -> None:  # type: ignore[override]
        """Update only rows `experts` (indices of the experts used this step) of every (N, C) param."""
        rows_cpu = torch.unique(torch.as_tensor(experts).reshape(-1).long().cpu())
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows = rows_cpu.to(p.device)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                g = p.grad.index_select(0, rows)
                step = state["step"].index_select(0, rows) + 1
                m = state["exp_avg"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                view = (-1,) + (1,) * (p.ndim - 1)
                bc1 = (1 - b1 ** step).reshape(view)
                bc2_sqrt = (1 - b2 ** step).sqrt().reshape(view)
                new = p.index_select(0, rows).mul_(1 - lr * wd)
                new.sub_(lr * (m / bc1) / (v.sqrt() / bc2_sqrt + eps))
                p.index_copy_(0, rows, new)
                state["step"].index_copy_(0, rows, step)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
