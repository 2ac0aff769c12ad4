"""The embedded default model in the real ComfyUI server: demo nodes registered, and the shipped model
samples what it is asked for through the stock KSampler and VAEDecode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from assets import Graph, output_files
from tuneqdm_core.digits import data
from tuneqdm_core.digits.metrics import Judge, load_classifier

pytestmark = pytest.mark.server

DEMO_NODES = {
    "TuneQDMLoadDefaultModel": "Load Default Digits Model (TuneQDM demo)",
    "TuneQDMDefaultTextEncode": "Default Text Encode (TuneQDM demo)",
    "TuneQDMDefaultSubjectImages": "Default Subject Images (TuneQDM demo)",
}


def _images(server, entry) -> torch.Tensor:
    paths = output_files(entry, server.output_dir)
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).float() / 255


def test_demo_nodes_are_registered(comfy_server):
    info = comfy_server.object_info()
    for name, display in DEMO_NODES.items():
        assert info[name]["display_name"] == display
        assert info[name]["category"] == "TuneQDM/demo"
    assert info["TuneQDMLoadDefaultModel"]["output"] == ["MODEL", "TUNEQDM_TEXT_ENCODER", "VAE"]


@pytest.mark.parametrize("digit", [3, 7])
def test_default_model_draws_the_prompted_digit_with_stock_nodes(comfy_server, digit):
    g = Graph()
    load = g.node("TuneQDMLoadDefaultModel")
    pos = g.node("TuneQDMDefaultTextEncode", text_encoder=load.out(1), text=data.caption(digit))
    neg = g.node("TuneQDMDefaultTextEncode", text_encoder=load.out(1), text="")
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=16)
    s = g.node("KSampler", model=load.out(0), positive=pos, negative=neg, latent_image=latent, seed=1, steps=20,
               cfg=3.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    img = g.node("VAEDecode", samples=s, vae=load.out(2))
    g.node("SaveImage", images=img, filename_prefix=f"default_digit_{digit}")
    images = _images(comfy_server, comfy_server.run(g.to_api(), timeout=300, check=True))
    assert images.shape == (16, 64, 64, 3)
    judge = Judge(load_classifier(), data.subject_images(), data.SUBJECT_CLASS)
    assert judge.accuracy(images, digit) >= 0.6  # the shipped model follows its prompts


def test_subject_images_round_trip_through_stock_vae_nodes(comfy_server):
    g = Graph()
    load = g.node("TuneQDMLoadDefaultModel")
    subject = g.node("TuneQDMDefaultSubjectImages")
    enc = g.node("VAEEncode", pixels=subject, vae=load.out(2))
    dec = g.node("VAEDecode", samples=enc, vae=load.out(2))
    g.node("SaveImage", images=dec, filename_prefix="default_subject_round_trip")
    images = _images(comfy_server, comfy_server.run(g.to_api(), check=True))
    assert images.shape == (data.SUBJECT_IMAGES, 64, 64, 3)
    # 64 -> 16 (area) -> 64 (bilinear) blurs a little; the PNG rounds to 1/255.
    assert float((images - data.subject_images()).abs().mean()) < 0.05
