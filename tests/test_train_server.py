"""Train TuneQDM Scales in a real ComfyUI server: train, save, reload, sample, and interrupt."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from assets import Graph, add_txt2img, asset_cache_dir, install, output_files, write_tiny_sd15_checkpoint

pytestmark = pytest.mark.server
EXPERTS = 4


@pytest.fixture(scope="module")
def ckpt(comfy_server, comfy_models_dir) -> str:
    asset = write_tiny_sd15_checkpoint(asset_cache_dir() / "tiny_sd15.safetensors")
    return install(asset.path, comfy_models_dir / "checkpoints").name


@pytest.fixture(scope="module")
def subject_images(comfy_server) -> list[str]:
    """Three small pictures of one 'subject' (a bright disc on a dark ground), made here."""
    names = []
    yy, xx = np.mgrid[0:72, 0:80]
    for i in range(3):
        disc = ((yy - 36 - 4 * i) ** 2 + (xx - 40 + 5 * i) ** 2) < (18 + 3 * i) ** 2
        img = np.zeros((72, 80, 3), np.uint8)
        img[disc] = (230, 180 - 30 * i, 40 + 40 * i)
        name = f"subject_{i}.png"
        Image.fromarray(img).save(comfy_server.input_dir / name)
        names.append(name)
    return names


def training_graph(ckpt, images, steps, prefix):
    g = Graph()
    t2i = add_txt2img(g, ckpt_name=ckpt, positive="a photo of sks disc", steps=4, filename_prefix=prefix)
    q = g.node("TuneQDMQuantizeUNet", model=t2i.model, bits="4", experts=EXPERTS, scales="s_out and s_in (TuneQDM)",
               s_in_init="ones", keep_float="")
    loaded = [g.node("LoadImage", image=name) for name in images]
    batch = g.node("ImageBatch", image1=loaded[0].out(0), image2=loaded[1].out(0))
    batch = g.node("ImageBatch", image1=batch.out(0), image2=loaded[2].out(0))
    train = g.node("TuneQDMTrainScales", model=q.out(0), vae=t2i.vae, instance_images=batch.out(0),
                   instance_conditioning=t2i.positive.out(0), steps=steps, lr_s_out=1e-4, lr_s_in=1e-2,
                   train_s_in=True, batch_size=1, seed=3, resolution=64, checkpointing=True)
    g.node("TuneQDMSaveScales", model=q.out(0), filename_prefix=f"{prefix}/initial")
    g.node("TuneQDMSaveScales", model=q.out(0), scales=train.out(1), filename_prefix=f"{prefix}/trained")
    curve = g.node("SaveImage", images=train.out(2), filename_prefix=f"{prefix}_curve")
    report = g.node("PreviewAny", source=train.out(3))
    t2i.sampler.set(model=train.out(0))
    return g, curve, report


def test_train_save_reload_and_sample(comfy_server, ckpt, subject_images):
    g, curve, report = training_graph(ckpt, subject_images, steps=4, prefix="train")
    entry = comfy_server.run(g.to_api(), timeout=900, check=True)
    text = "".join(entry["outputs"][report.id]["text"])
    assert text.startswith("complete: 4/4 steps"), text
    counts = [int(c) for c in re.search(r"samples per expert: \[([\d, ]+)\]", text)[1].split(",")]
    assert sum(counts) == 4 and len(counts) == EXPERTS
    (curve_png,) = output_files(entry, comfy_server.output_dir, node_id=curve.id)
    assert np.asarray(Image.open(curve_png)).std() > 0

    folder = comfy_server.models_dir / "tuneqdm" / "train"
    initial, trained = load_file(str(folder / "initial.safetensors")), load_file(str(folder / "trained.safetensors"))
    assert initial.keys() == trained.keys()
    for e in range(EXPERTS):
        moved = any(not (initial[k][e] == trained[k][e]).all() for k in initial)
        assert moved == (counts[e] > 0), (e, counts)

    g2 = Graph()
    t2i = add_txt2img(g2, ckpt_name=ckpt, positive="a photo of sks disc", steps=4, filename_prefix="reloaded",
                      save_latent=True)
    q = g2.node("TuneQDMQuantizeUNet", model=t2i.model, bits="4", experts=EXPERTS,
                scales="s_out and s_in (TuneQDM)", s_in_init="ones", keep_float="")
    with_scales = g2.node("TuneQDMLoadScales", model=q.out(0), scales_name="train/trained.safetensors")
    t2i.sampler.set(model=with_scales.out(0))
    plain = g2.node("KSampler", **{**t2i.sampler.inputs, "model": q.out(0)})
    plain_latent = g2.node("SaveLatent", samples=plain.out(0), filename_prefix="latents/untrained")
    second = comfy_server.run(g2.to_api(), check=True)
    (image,) = output_files(second, comfy_server.output_dir, node_id=t2i.save.id)
    assert image.is_file()
    (a,) = output_files(second, comfy_server.output_dir, node_id=t2i.save_latent.id, kind="latents")
    (b,) = output_files(second, comfy_server.output_dir, node_id=plain_latent.id, kind="latents")
    assert not (load_file(str(a))["latent_tensor"] == load_file(str(b))["latent_tensor"]).all()


def test_interrupt_returns_partial_scales(comfy_server, ckpt, subject_images):
    g, _, report = training_graph(ckpt, subject_images, steps=100000, prefix="interrupted")
    log_before = len(comfy_server.log_text())
    prompt_id = comfy_server.queue(g.to_api())
    deadline = time.monotonic() + 300
    while "TuneQDM train: step 1/100000" not in comfy_server.log_text()[log_before:]:
        assert time.monotonic() < deadline, comfy_server.log_tail()
        time.sleep(0.2)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=300)
    assert comfy_server.execution_error(entry) is None
    assert report.id in entry["outputs"], (entry["status"], comfy_server.log_tail())
    text = "".join(entry["outputs"][report.id]["text"])
    done = int(re.search(r"PARTIAL \(interrupted\): (\d+)/100000 steps", text)[1])
    assert 1 <= done < 100000
    assert (comfy_server.models_dir / "tuneqdm" / "interrupted" / "trained.safetensors").is_file()
