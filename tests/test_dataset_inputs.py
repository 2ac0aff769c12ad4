"""Train TuneQDM Scales' `latents` input as ComfyUI's dataset and VAE nodes give it: image latents (B, C, H, W)
and video latents (B, C, T, H, W, e.g. Wan's), grouped by size with each sample's conditioning."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from tuneqdm_fixtures.paths import checkout

REPO_ROOT = checkout()


def _dataset_inputs():
    # The module imports only torch; loaded by path so that the test needs no ComfyUI.
    if "dataset_inputs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dataset_inputs", REPO_ROOT / "nodes" / "dataset_inputs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["dataset_inputs"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["dataset_inputs"]


def test_video_latents_are_samples_grouped_by_size():
    di = _dataset_inputs()
    videos = torch.randn(2, 16, 3, 4, 4)  # two 3-frame videos
    one_frame = torch.randn(1, 16, 1, 4, 4)
    pairs = [[torch.zeros(1, 2, 8), {}]]
    groups, conds = di.group_latents([{"samples": videos}, {"samples": one_frame}], [pairs], "latents", "cond")
    assert [tuple(g.latents.shape) for g in groups] == [(2, 16, 3, 4, 4), (1, 16, 1, 4, 4)]
    assert torch.equal(groups[0].latents, videos) and groups[1].conds == (0,) and len(conds) == 1


@pytest.mark.parametrize("shape", [(16, 4, 4), (1, 1, 16, 1, 4, 4), (0, 16, 4, 4)])
def test_other_shapes_are_refused_by_name(shape):
    di = _dataset_inputs()
    with pytest.raises(ValueError, match=r"latents\[0\]: expected a LATENT"):
        di.group_latents([{"samples": torch.zeros(shape)}], [[[torch.zeros(1, 2, 8), {}]]], "latents", "cond")
