"""Train TuneQDM Scales in a real ComfyUI server: train, save, reload, sample; cancel, which must end the prompt
as interrupted, save the steps done under a new partial name and never touch the user's files; resume."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from test_lifecycle_server import Digits
from tuneqdm_fixtures.checkpoints import install, write_tiny_sd15_checkpoint
from tuneqdm_fixtures.graph import Graph, add_txt2img, output_files
from tuneqdm_fixtures.host import host_version
from tuneqdm_fixtures.paths import asset_cache_dir

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
                   train_s_in=True, batch_size=1, seed=3, resolution=64, gradient_checkpointing=True)
    g.node("TuneQDMSaveScales", model=q.out(0), filename_prefix=f"{prefix}/initial")
    g.node("TuneQDMSaveScales", model=q.out(0), scales=train.out(1), filename_prefix=f"{prefix}/trained")
    curve = g.node("SaveImage", images=train.out(2), filename_prefix=f"{prefix}_curve")
    report = g.node("PreviewAny", source=train.out(3))
    t2i.sampler.set(model=train.out(0))
    return g, curve, report


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_train_save_reload_and_sample(comfy_server, ckpt, subject_images):
    g, curve, report = training_graph(ckpt, subject_images, steps=4, prefix="train")
    entry = comfy_server.run(g.to_api(), timeout=900, check=True)
    text = "".join(entry["outputs"][report.id]["text"])
    assert text.startswith("complete: 4/4 steps"), text
    counts = [int(c) for c in re.search(r"samples per expert: \[([\d, ]+)\]", text)[1].split(",")]
    assert sum(counts) == 4 and len(counts) == EXPERTS
    (curve_png,) = output_files(entry, comfy_server.output_dir, node_id=curve.id)
    assert np.asarray(Image.open(curve_png)).std() > 0

    folder = comfy_server.models_dir / "tuneqdm" / "scales" / "train"
    initial, trained = load_file(str(folder / "initial.safetensors")), load_file(str(folder / "trained.safetensors"))
    assert initial.keys() == trained.keys()
    for e in range(EXPERTS):
        moved = any(not (initial[k][e] == trained[k][e]).all() for k in initial)
        assert moved == (counts[e] > 0), (e, counts)
    meta = metadata(folder / "trained.safetensors")
    assert (meta["tuneqdm.train.steps_done"], meta["tuneqdm.train.steps_planned"], meta["tuneqdm.train.partial"]) == (
        "4", "4", "0")

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
    assert "complete: 4/4 steps" in "".join(second["outputs"][with_scales.id]["text"])
    (image,) = output_files(second, comfy_server.output_dir, node_id=t2i.save.id)
    assert image.is_file()
    (a,) = output_files(second, comfy_server.output_dir, node_id=t2i.save_latent.id, kind="latents")
    (b,) = output_files(second, comfy_server.output_dir, node_id=plain_latent.id, kind="latents")
    assert not (load_file(str(a))["latent_tensor"] == load_file(str(b))["latent_tensor"]).all()


# ---- cancel and resume, on the embedded default model (fast steps) ---------------------------------

def digits_training(steps: int, prefix: str, resume: str = "[None]", seed: int = 0):
    d = Digits()
    q = d.quantize(d.model, bits="4", experts=2)
    subject = d.g.node("TuneQDMDefaultSubjectImages")
    train = d.g.node("TuneQDMTrainScales", model=q, vae=d.load.out(2), instance_images=subject,
                     instance_conditioning=d.pos, steps=steps, lr_s_out=1e-4, lr_s_in=3e-3, train_s_in=True,
                     batch_size=1, seed=seed, resolution=64, gradient_checkpointing=False, resume=resume)
    save = d.g.node("TuneQDMSaveScales", model=q, scales=train.out(1), filename_prefix=prefix)
    report = d.g.node("PreviewAny", source=train.out(3))
    d.sample(train.out(0), "after_training")
    return d, train, save, report


def interrupt_when_training(server, graph: dict, steps: int) -> dict:
    """Queue `graph`, press cancel once training reported its first step, return the history entry."""
    log_before = len(server.log_text())
    prompt_id = server.queue(graph)
    deadline = time.monotonic() + 300
    while not re.search(rf"TuneQDM train: step \d+/{steps} ", server.log_text()[log_before:]):
        assert time.monotonic() < deadline, server.log_tail()
        entry = server._request("GET", f"/history/{prompt_id}").get(prompt_id)
        assert not entry, f"the prompt ended before training started: {entry and entry['status']}"
        time.sleep(0.1)
    server.interrupt()
    return server.wait(prompt_id, timeout=300)


def status_messages(entry: dict) -> list[str]:
    return [name for name, _ in entry["status"]["messages"]]


def partial_files(server) -> set:
    folder = server.models_dir / "tuneqdm" / "scales" / "partial"
    return set(folder.glob("*.safetensors")) if folder.is_dir() else set()


def test_cancel_ends_the_prompt_as_interrupted_and_keeps_the_users_file(comfy_server):
    steps = 100000
    first, _, _, _ = digits_training(2, "cancel/good")
    comfy_server.run(first.g.to_api(), timeout=300, check=True)
    good = comfy_server.models_dir / "tuneqdm" / "scales" / "cancel" / "good.safetensors"
    assert good.is_file()
    good_bytes = good.read_bytes()

    d, train, save, report = digits_training(steps, "cancel/good")
    before = partial_files(comfy_server)
    entry = interrupt_when_training(comfy_server, d.g.to_api(), steps)
    assert entry["status"]["status_str"] == "error", entry["status"]
    assert "execution_interrupted" in status_messages(entry)
    assert "execution_success" not in status_messages(entry)
    assert not {report.id, save.id} & set(entry["outputs"]), "nothing downstream of an interrupted training runs"
    assert good.read_bytes() == good_bytes
    assert sorted(p.name for p in good.parent.iterdir()) == ["good.safetensors"]

    (partial,) = partial_files(comfy_server) - before
    meta = metadata(partial)
    done = int(meta["tuneqdm.train.steps_done"])
    assert 1 <= done < steps and meta["tuneqdm.train.steps_planned"] == str(steps)
    assert meta["tuneqdm.train.partial"] == "1"
    assert f"_{done}of{steps}_steps" in partial.name

    # Queued again, the same graph trains again (an interrupted result is never cached) and is cancelled again.
    again = interrupt_when_training(comfy_server, d.g.to_api(), steps)
    assert "execution_interrupted" in status_messages(again)
    assert len(partial_files(comfy_server) - before) == 2


def test_load_scales_shows_a_partial_file_and_resume_continues_it(comfy_server):
    steps = 100000
    d, _, _, _ = digits_training(steps, "resume/unused", seed=5)
    before = partial_files(comfy_server)
    interrupt_when_training(comfy_server, d.g.to_api(), steps)
    (partial,) = partial_files(comfy_server) - before
    done = int(metadata(partial)["tuneqdm.train.steps_done"])
    name = f"partial/{partial.name}"

    d = Digits()
    loaded = d.g.node("TuneQDMLoadScales", model=d.quantize(d.model, bits="4", experts=2), scales_name=name)
    d.sample(loaded.out(0), "partial")
    entry = comfy_server.run(d.g.to_api(), check=True)
    shown = "".join(entry["outputs"][loaded.id]["text"])
    assert f"PARTIAL: {done}/{steps} steps" in shown, shown

    d, _, save, report = digits_training(done + 2, "resume/continued", resume=name, seed=5)
    entry = comfy_server.run(d.g.to_api(), timeout=300, check=True)
    text = "".join(entry["outputs"][report.id]["text"])
    assert text.startswith(f"complete: {done + 2}/{done + 2} steps"), text
    assert f"resumed at step {done}" in text
    meta = metadata(comfy_server.models_dir / "tuneqdm" / "scales" / "resume" / "continued.safetensors")
    assert (meta["tuneqdm.train.steps_done"], meta["tuneqdm.train.partial"]) == (str(done + 2), "0")
    assert meta["tuneqdm.train.resumed_from"] == name

    d, _, _, _ = digits_training(done, "resume/nothing_left", resume=name, seed=5)
    err = comfy_server.execution_error(comfy_server.run(d.g.to_api(), timeout=300))
    assert err is not None and f"already has {done} steps" in err["exception_message"], err


def test_mask_shaped_image_is_named_with_the_expected_shape(comfy_server):
    if host_version() < (0, 8, 0):
        pytest.skip(f"a MASK reaches an IMAGE input only through ComfySwitchNode, new in ComfyUI 0.8.0 "
                    f"(host {host_version()})")
    d = Digits()
    mask = d.g.node("SolidMask", value=1.0, width=64, height=64)
    as_image = d.g.node("ComfySwitchNode", switch=True, on_true=mask, on_false=mask)
    train = d.g.node("TuneQDMTrainScales", model=d.quantize(d.model, bits="4", experts=2), vae=d.load.out(2),
                     instance_images=as_image, instance_conditioning=d.pos, steps=2, lr_s_out=1e-4, lr_s_in=3e-3,
                     train_s_in=True, batch_size=1, seed=0, resolution=64, gradient_checkpointing=False)
    d.g.node("PreviewAny", source=train.out(3))
    entry = comfy_server.run(d.g.to_api(), timeout=300)
    err = comfy_server.execution_error(entry)
    assert err is not None, entry["status"]
    msg = err["exception_message"]
    assert "instance_images" in msg and "(B, H, W, C)" in msg and "(1, 64, 64)" in msg, msg
