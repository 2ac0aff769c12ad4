"""Quality metrics of samples, the analogues of the paper's (measured with the bundled classifier):

- subject fidelity (DINO-I analogue): mean cosine similarity between the classifier features of each
  generated subject sample and each real subject image;
- subject accuracy: the share of subject samples the classifier calls the subject's digit;
- prompt fidelity (CLIP-T analogue): the classifier's accuracy on samples of ordinary prompts ("a
  handwritten digit three"): does the fine-tuned model still draw what it is asked for?
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .classifier import DigitClassifier
from .data import image_to_grey
from .files import CLASSIFIER_FILE, CLASSIFIER_FORMAT, load_file


def load_classifier() -> DigitClassifier:
    tensors, _ = load_file(CLASSIFIER_FILE, CLASSIFIER_FORMAT)
    model = DigitClassifier()
    model.load_state_dict(tensors)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Judge:
    """Scores ComfyUI IMAGE batches (B, H, W, 3) of any size."""

    classifier: DigitClassifier
    subject_images: torch.Tensor
    subject_class: int

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.classifier.features(image_to_grey(images)), dim=1)

    @torch.no_grad()
    def predictions(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(image_to_grey(images)).argmax(1)

    def subject_fidelity(self, images: torch.Tensor) -> float:
        return float((self._features(images) @ self._features(self.subject_images).T).mean())

    def subject_accuracy(self, images: torch.Tensor) -> float:
        return self.accuracy(images, self.subject_class)

    def accuracy(self, images: torch.Tensor, digit: int) -> float:
        return float((self.predictions(images) == digit).float().mean())
