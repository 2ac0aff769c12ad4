"""Train TuneQDM Scales fed by ComfyUI 0.8's dataset nodes, on the embedded default model: a folder of the
held-out subject's images with a caption file each, loaded with Load Image and Text Dataset from Folder,
encoded per image (VAEEncode and Default Text Encode mapped over the lists, as Make Training Dataset does
with a CLIP), with and without a Resolution Bucket of two sizes, and through Save / Load Training Dataset."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from test_lifecycle_server import Digits
from tuneqdm_demo import data
from tuneqdm_fixtures.host import host_version

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(host_version() < (0, 8, 0), reason=f"dataset nodes (Resolution Bucket, Get Image Size, "
                                                          f"Save/Load Training Dataset) are ComfyUI 0.8's; host {host_version()}"),
]
STEPS = 6
SMALL, LARGE = 3, 2  # images at 64x64 and, in the two-size folder, at 128x128


def write_folder(server, name: str, sizes: list[int]) -> str:
    folder = server.input_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    images = data.subject_images()
    for i, size in enumerate(sizes):
        pixels = torch.nn.functional.interpolate(images[i:i + 1].movedim(-1, 1), size=(size, size), mode="bilinear")
        array = (pixels.movedim(1, -1)[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"zero_{i}.png")
        (folder / f"zero_{i}.txt").write_text(data.SUBJECT_PROMPT)
    return name


@pytest.fixture(scope="module")
def one_size(comfy_server) -> str:
    return write_folder(comfy_server, "tuneqdm_zeros", [64] * (SMALL + LARGE))


@pytest.fixture(scope="module")
def two_sizes(comfy_server) -> str:
    return write_folder(comfy_server, "tuneqdm_zeros_two_sizes", [64] * SMALL + [128] * LARGE)


def dataset(d: Digits, folder: str, bucket: bool):
    """(latents, conditioning) list outputs from the stock dataset nodes."""
    ds = d.g.node("LoadImageTextDataSetFromFolder", folder=folder)
    conds = d.g.node("TuneQDMDefaultTextEncode", text_encoder=d.load.out(1), text=ds.out(1))
    latents = d.g.node("VAEEncode", pixels=ds.out(0), vae=d.load.out(2))
    if not bucket:
        return latents.out(0), conds.out(0)
    # The default model's pixel codec encodes every size to 8x8: scale each latent to its image's size
    # (an SD VAE's factor 8), so the two image sizes give two latent sizes.
    size = d.g.node("GetImageSize", image=ds.out(0))
    latents = d.g.node("LatentUpscale", samples=latents, upscale_method="bilinear", width=size.out(0),
                       height=size.out(1), crop="disabled")
    buckets = d.g.node("ResolutionBucket", latents=latents, conditioning=conds)
    return buckets.out(0), buckets.out(1)


def train_and_sample(server, latents, conditioning, d: Digits, q) -> tuple[str, dict, dict]:
    train = d.g.node("TuneQDMTrainScales", model=q, latents=latents, instance_conditioning=conditioning, steps=STEPS,
                     lr_s_out=1e-4, lr_s_in=3e-3, train_s_in=True, batch_size=2, seed=0, resolution=64,
                     grad_accumulation_steps=2, gradient_checkpointing=False)
    report = d.g.node("PreviewAny", source=train.out(3))
    graph = d.g.node("LossGraphNode", loss=train.out(4), filename_prefix="tuneqdm_dataset_loss")
    d.pos = d.g.node("TuneQDMDefaultTextEncode", text_encoder=d.load.out(1), text=data.SUBJECT_PROMPT)
    d.sample(train.out(0), "trained")
    d.sample(q, "untrained")
    latents_out, entry = d.run_entry(server)
    return "".join(entry["outputs"][report.id]["text"]), latents_out, entry["outputs"][graph.id]


def check(text: str, latents: dict, loss_graph: dict) -> None:
    assert text.startswith(f"complete: {STEPS}/{STEPS} steps"), text
    counts = [int(c) for c in re.search(r"samples per expert: \[([\d, ]+)\]", text)[1].split(",")]
    assert sum(counts) == STEPS * 2 * 2, text  # steps x batch x accumulated batches
    assert "conditionings: 5" in text, text  # one caption per image
    assert torch.isfinite(latents["trained"]).all()
    assert not torch.equal(latents["trained"], latents["untrained"])
    assert loss_graph.get("images"), loss_graph  # ComfyUI's Plot Loss Graph drew the LOSS_MAP


def test_dataset_folder_with_captions_trains_and_samples(comfy_server, one_size):
    d = Digits()
    latents, conds = dataset(d, one_size, bucket=False)
    text, out, loss_graph = train_and_sample(comfy_server, latents, conds, d, d.quantize(d.model, "4", 2))
    check(text, out, loss_graph)
    assert "latents: 8x8 (5)" in text, text


def test_resolution_bucket_of_two_sizes_trains_and_samples(comfy_server, two_sizes):
    d = Digits()
    latents, conds = dataset(d, two_sizes, bucket=True)
    text, out, loss_graph = train_and_sample(comfy_server, latents, conds, d, d.quantize(d.model, "4", 2, " "))
    check(text, out, loss_graph)
    assert f"8x8 ({SMALL})" in text and f"16x16 ({LARGE})" in text, text


def test_saved_training_dataset_loads_into_training(comfy_server, one_size):
    d = Digits()
    latents, conds = dataset(d, one_size, bucket=False)
    d.g.node("SaveTrainingDataset", latents=latents, conditioning=conds, folder_name="tuneqdm_zeros_dataset",
             shard_size=2)
    comfy_server.run(d.g.to_api(), check=True)
    assert len(list((comfy_server.output_dir / "tuneqdm_zeros_dataset").glob("shard_*.pkl"))) == 3

    d = Digits()
    loaded = d.g.node("LoadTrainingDataset", folder_name="tuneqdm_zeros_dataset")
    text, out, loss_graph = train_and_sample(comfy_server, loaded.out(0), loaded.out(1), d,
                                             d.quantize(d.model, "4", 2, "  "))
    check(text, out, loss_graph)
    assert "latents: 8x8 (5)" in text, text
