"""A small digit classifier, trained on all ten classes of the bundled digits: the quality metrics'
feature space (the DINO analogue) and judge (is a sample the digit it was asked for?)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import Digits

FEATURES = 64


class DigitClassifier(nn.Module):
    """16x16 grey in [0, 1] -> 10 logits; `features` is the 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, 10)

    def features(self, grey: torch.Tensor) -> torch.Tensor:
        return self.body(grey * 2.0 - 1.0)

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(grey))


def _shifted(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (white paper comes in from the border): generated digits are
    rarely centred exactly like the scans."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    padded = F.pad(images, (1, 1, 1, 1), value=1.0)
    return padded[..., 1 + dy:1 + dy + images.shape[-2], 1 + dx:1 + dx + images.shape[-1]]


def train_classifier(data: Digits, epochs: int = 40, seed: int = 0, holdout: float = 0.2
                     ) -> tuple[DigitClassifier, float]:
    """-> (classifier trained on a random (1 - holdout) share, its accuracy on the rest)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(data.labels), generator=gen)
    n_test = int(len(order) * holdout)
    test, train = order[:n_test], order[n_test:]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        for batch in perm.split(64):
            loss = F.cross_entropy(model(_shifted(data.images[batch], gen)), data.labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(data.images[test]).argmax(1) == data.labels[test]).float().mean())
    return model, accuracy
