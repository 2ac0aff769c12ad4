"""The embedded default model in the real ComfyUI server: demo nodes registered, and the shipped model
samples what it is asked for through the stock KSampler and VAEDecode."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tuneqdm_demo import data
from tuneqdm_demo.metrics import Judge, load_classifier
from tuneqdm_fixtures.graph import Graph, output_files, read_images

pytestmark = pytest.mark.server

DEMO_NODES = {
    "TuneQDMLoadDefaultModel": "Load Default Digits Model (TuneQDM demo)",
    "TuneQDMDefaultTextEncode": "Default Text Encode (TuneQDM demo)",
    "TuneQDMDefaultSubjectImages": "Default Subject Images (TuneQDM demo)",
}


def _images(server, entry) -> torch.Tensor:
    return read_images(output_files(entry, server.output_dir))


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


def test_saved_quantized_default_model_keeps_its_v_prediction(comfy_server):
    """The default model predicts v, which its SD1.5 config class cannot say: the quantized-model file records
    the model type, so the reloaded model samples exactly like the one that was saved."""
    def sample(g: Graph, model, te, vae, prefix: str) -> None:
        pos = g.node("TuneQDMDefaultTextEncode", text_encoder=te, text=data.caption(5))
        neg = g.node("TuneQDMDefaultTextEncode", text_encoder=te, text="")
        latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
        s = g.node("KSampler", model=model, positive=pos, negative=neg, latent_image=latent, seed=3, steps=6,
                   cfg=3.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        g.node("SaveLatent", samples=s, filename_prefix=prefix)

    g = Graph()
    load = g.node("TuneQDMLoadDefaultModel")
    quant = g.node("TuneQDMQuantizeUNet", model=load.out(0), bits="4", experts=2, scales="s_out and s_in (TuneQDM)",
                   s_in_init="ones", keep_float="")
    g.node("TuneQDMSaveQuantizedUNet", model=quant, filename_prefix="default_w4")
    sample(g, quant.out(0), load.out(1), load.out(2), "default_w4_before")
    first = comfy_server.run(g.to_api(), check=True)

    g = Graph()
    load = g.node("TuneQDMLoadDefaultModel")
    reloaded = g.node("TuneQDMLoadQuantizedUNet", unet_name="default_w4.safetensors")
    sample(g, reloaded.out(0), load.out(1), load.out(2), "default_w4_after")
    second = comfy_server.run(g.to_api(), check=True)

    (a,), (b,) = (output_files(e, comfy_server.output_dir, kind="latents") for e in (first, second))
    torch.testing.assert_close(load_file(str(b))["latent_tensor"], load_file(str(a))["latent_tensor"], rtol=0, atol=0)
