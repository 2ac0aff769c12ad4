"""The training loss per expert as an IMAGE (PIL only: ComfyUI ships it, matplotlib it does not)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def _smooth(values: list[float], span: int) -> list[float]:
    out, acc = [], None
    alpha = 2.0 / (span + 1)
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def loss_curve_image(curves: list[list[tuple[int, float]]], total_steps: int, title: str,
                     width: int = 640, height: int = 360) -> torch.Tensor:
    """curves[e] = [(step, loss), ...] for expert e -> (1, H, W, 3) float image in [0, 1]."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 130, 30, height - 40
    d.text((left, 8), title, fill="black")
    d.rectangle([left, top, right, bottom], outline="black")
    values = [v for c in curves for _, v in c]
    if values:
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1.0
        for frac in (0.0, 0.5, 1.0):
            y = bottom - frac * (bottom - top)
            d.text((4, y - 6), f"{lo + frac * (hi - lo):.3g}", fill="black")
        d.text((left, bottom + 6), "1", fill="black")
        d.text((right - 30, bottom + 6), f"step {max(total_steps, 1)}", fill="black")
        for e, curve in enumerate(curves):
            color = COLORS[e % len(COLORS)]
            d.text((right + 10, top + 16 * e), f"expert {e}: {len(curve)} samples", fill=color)
            if not curve:
                continue
            steps = [s for s, _ in curve]
            smooth = _smooth([v for _, v in curve], span=max(3, len(curve) // 10))
            pts = [(left + (s - 1) / max(total_steps - 1, 1) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
                   for s, v in zip(steps, smooth)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for x, y in pts[-1:]:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    else:
        d.text((left + 10, top + 10), "no steps were trained", fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
