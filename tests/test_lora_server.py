"""LoRA and other adapters on quantized models with ComfyUI's stock loaders, on the embedded default model:
Quantize UNet -> LoraLoaderModelOnly must move the quantized model as the LoRA moves the float model
(W8 within W8 error of float + LoRA), per clone, stacked, at any strength, on trained scales, and for
the LoRA a TrainLoraNode returns."""
from __future__ import annotations

import re

import pytest
import torch

from test_lifecycle_server import W8_ERROR, Digits, rel
from tuneqdm_fixtures.checkpoints import install
from tuneqdm_fixtures.demo_files import write_loha, write_lora
from tuneqdm_fixtures.host import host_version

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def loras(comfy_models_dir) -> dict[str, str]:
    folder = comfy_models_dir / "loras"
    files = {"diffusion_model": write_lora(folder / "lora_a_dm.safetensors", naming="diffusion_model", seed=11, relative=0.3),
             "lora_unet": write_lora(folder / "lora_a_unet.safetensors", naming="lora_unet", seed=11, relative=0.3),
             "second": write_lora(folder / "lora_b.safetensors", seed=12, relative=0.3),
             "loha": write_loha(folder / "loha.safetensors", seed=13, relative=0.3)}
    return {k: install(v, folder).name for k, v in files.items()}


@pytest.mark.parametrize("naming", ["diffusion_model", "lora_unet"])
def test_lora_after_quantize_moves_the_model_like_float_lora(comfy_server, loras, naming):
    d = Digits()
    w8 = d.quantize(d.model, keep_float="lora")
    d.sample(d.model, "float")
    d.sample(d.lora(d.model, loras[naming]), "float_lora")
    d.sample(w8, "w8")
    d.sample(d.lora(w8, loras[naming]), "w8_lora")
    out = d.run(comfy_server)
    effect = rel(out["float_lora"], out["float"])
    assert effect > 0.1, f"the LoRA moves the float model by {effect:.3f}: too little to test"
    assert rel(out["w8_lora"], out["float_lora"]) <= 2 * W8_ERROR
    assert rel(out["w8_lora"], out["w8"]) > 0.5 * effect
    # Both branches of the one graph: the LoRA clone's patches never reached the plain quantized MODEL.
    alone = Digits()
    alone.sample(alone.quantize(alone.model, keep_float="lora alone"), "w8_alone")
    torch.testing.assert_close(out["w8"], alone.run(comfy_server)["w8_alone"], rtol=0, atol=0)


def test_stacked_loras_and_strength(comfy_server, loras):
    d = Digits()
    w8 = d.quantize(d.model, keep_float="stack")
    a, b = loras["diffusion_model"], loras["second"]
    d.sample(d.lora(d.lora(d.model, a), b), "float_ab")
    d.sample(d.lora(d.lora(w8, a), b), "w8_ab")
    d.sample(d.lora(d.model, a, strength=0.5), "float_half")
    d.sample(d.lora(w8, a, strength=0.5), "w8_half")
    d.sample(d.lora(d.model, a), "float_a")
    out = d.run(comfy_server)
    assert rel(out["float_ab"], out["float_a"]) > 0.1
    assert rel(out["w8_ab"], out["float_ab"]) <= 2 * W8_ERROR
    assert rel(out["float_half"], out["float_a"]) > 0.05
    assert rel(out["w8_half"], out["float_half"]) <= 2 * W8_ERROR


def test_loha_after_quantize(comfy_server, loras):
    d = Digits()
    w8 = d.quantize(d.model, keep_float="loha")
    d.sample(d.model, "float")
    d.sample(d.lora(d.model, loras["loha"]), "float_loha")
    d.sample(d.lora(w8, loras["loha"]), "w8_loha")
    d.sample(w8, "w8")
    out = d.run(comfy_server)
    effect = rel(out["float_loha"], out["float"])
    assert effect > 0.1
    assert rel(out["w8_loha"], out["float_loha"]) <= 2 * W8_ERROR
    assert rel(out["w8_loha"], out["w8"]) > 0.5 * effect


def test_lora_on_trained_scales(comfy_server, loras):
    """Train TuneQDM Scales -> LoRA: the LoRA adds to the trained model as it adds to the untrained one."""
    d = Digits()
    w8 = d.quantize(d.model, keep_float="trained")
    subject = d.g.node("TuneQDMDefaultSubjectImages")
    trained = d.g.node("TuneQDMTrainScales", model=w8, vae=d.load.out(2), instance_images=subject,
                       instance_conditioning=d.pos, steps=4, lr_s_out=1e-4, lr_s_in=3e-3, train_s_in=True,
                       batch_size=2, seed=0, resolution=64, gradient_checkpointing=False).out(0)
    lora = loras["diffusion_model"]
    d.sample(w8, "w8")
    d.sample(d.lora(w8, lora), "w8_lora")
    d.sample(trained, "trained")
    d.sample(d.lora(trained, lora), "trained_lora")
    out = d.run(comfy_server)
    assert rel(out["trained"], out["w8"]) > 0.01, "training must have changed the model for this test"
    lora_on_trained = rel(out["trained_lora"], out["trained"])
    lora_on_w8 = rel(out["w8_lora"], out["w8"])
    assert 0.5 * lora_on_w8 < lora_on_trained < 2 * lora_on_w8
    assert rel(out["trained_lora"], out["w8_lora"]) > 0.01, "the trained scales stay in use under the LoRA"


def test_lora_before_quantize_is_merged_and_reported(comfy_server, loras):
    d = Digits()
    q = d.quantize(d.lora(d.model, loras["diffusion_model"]), keep_float="merged")
    report = d.g.node("PreviewAny", source=q.out(1))
    d.sample(q.out(0), "merged")
    _, entry = d.run_entry(comfy_server)
    text = "".join(entry["outputs"][report.id]["text"])
    assert re.search(r"merged LoRA/weight patches of \d+ layers", text), text


def test_trainloranode_lora_is_carried_through_quantize(comfy_server):
    if "TrainLoraNode" not in comfy_server.object_info() or host_version() < (0, 8, 0):
        pytest.skip(f"TrainLoraNode's 0.8 inputs are not on this host ({host_version()})")
    d = Digits()
    subject = d.g.node("TuneQDMDefaultSubjectImages")
    latents = d.g.node("VAEEncode", pixels=subject, vae=d.load.out(2))
    trained = d.g.node("TrainLoraNode", model=d.model, latents=latents, positive=d.pos, batch_size=2,
                       grad_accumulation_steps=1, steps=6, learning_rate=0.05, rank=4, optimizer="AdamW",
                       loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                       gradient_checkpointing=False, existing_lora="[None]", bucket_mode=False)
    d.sample(d.model, "float")
    d.sample(trained.out(0), "float_trained_lora")
    d.sample(d.quantize(trained.out(0), keep_float="trainlora"), "w8_trained_lora")
    out = d.run(comfy_server)
    assert rel(out["float_trained_lora"], out["float"]) > 4 * W8_ERROR, "the trained LoRA must move the model"
    assert rel(out["w8_trained_lora"], out["float_trained_lora"]) <= 2 * W8_ERROR


def test_no_lora_key_is_left_unloaded(comfy_server, loras):
    """Runs after the LoRA tests above on the same server: ComfyUI logged no key it could not map, and the
    pack logged the patches it applied at call time."""
    log = comfy_server.log_text()
    assert "lora key not loaded" not in log
    assert re.search(r"TuneQDM: \d+ LoRA/adapter patches applied to quantized layers at call time", log)


def test_lora_takes_part_in_training(comfy_server, loras):
    """Quantize -> LoRA -> Train TuneQDM Scales: the LoRA is applied in the training forward too, so the same
    seed gives other losses than without it, and the trained LoRA model still samples."""
    reports = {}
    for tag, with_lora in (("plain", False), ("lora", True)):
        d = Digits()
        model = d.quantize(d.model, keep_float="train under lora")
        if with_lora:
            model = d.lora(model, loras["diffusion_model"])
        subject = d.g.node("TuneQDMDefaultSubjectImages")
        train = d.g.node("TuneQDMTrainScales", model=model, vae=d.load.out(2), instance_images=subject,
                         instance_conditioning=d.pos, steps=2, lr_s_out=1e-4, lr_s_in=3e-3, train_s_in=True,
                         batch_size=2, seed=0, resolution=64, gradient_checkpointing=False)
        report = d.g.node("PreviewAny", source=train.out(3))
        d.sample(train.out(0), f"trained_{tag}")
        _, entry = d.run_entry(comfy_server)
        reports[tag] = "".join(entry["outputs"][report.id]["text"])
    loss = {tag: re.search(r"last loss per expert: \[(.*)\]", text).group(1) for tag, text in reports.items()}
    assert loss["plain"] != loss["lora"], reports
    assert re.search(r"TuneQDM: \d+ LoRA/adapter patches applied to quantized layers during training",
                     comfy_server.log_text())
