"""Every workflow in example_workflows/api/ runs in the real server (on the random-weight test checkpoint, with a
small latent and few steps so it is quick), and the save -> load pair reproduces its own output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuneqdm_fixtures.checkpoints import install, write_tiny_sd15_checkpoint
from tuneqdm_fixtures.graph import adapted_workflow, output_files
from tuneqdm_fixtures.paths import asset_cache_dir

pytestmark = pytest.mark.server
API_DIR = Path(__file__).resolve().parents[1] / "example_workflows" / "api"


def load_for_test(name: str, ckpt: str) -> dict:
    return adapted_workflow(name, ckpt, size=64, steps=4)


def images(server, entry) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in output_files(entry, server.output_dir)]


@pytest.fixture(scope="module")
def ckpt(comfy_server, comfy_models_dir) -> str:
    asset = write_tiny_sd15_checkpoint(asset_cache_dir() / "tiny_sd15.safetensors")
    return install(asset.path, comfy_models_dir / "checkpoints").name


def test_every_api_workflow_is_exercised_here():
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == sorted(
        ["quantize_and_sample", "load_quantized_and_scales", "float_vs_w8_vs_w4", "train_subject", "default_model_demo"])


def test_quantize_then_load_workflows_give_the_same_image(comfy_server, ckpt):
    first = comfy_server.run(load_for_test("quantize_and_sample", ckpt), check=True)
    assert (comfy_server.models_dir / "tuneqdm" / "unet" / "tuneqdm_unet.safetensors").is_file()
    assert (comfy_server.models_dir / "tuneqdm" / "scales" / "tuneqdm_scales.safetensors").is_file()
    second = comfy_server.run(load_for_test("load_quantized_and_scales", ckpt), check=True)
    (a,), (b,) = images(comfy_server, first), images(comfy_server, second)
    assert a.std() > 0
    np.testing.assert_array_equal(a, b)


def test_float_w8_w4_side_by_side(comfy_server, ckpt):
    entry = comfy_server.run(load_for_test("float_vs_w8_vs_w4", ckpt), check=True)
    batch = images(comfy_server, entry)
    assert len(batch) == 3
    assert not np.array_equal(batch[0], batch[2])  # W4 is not the float model


def test_train_subject_workflow(comfy_server, ckpt):
    rng = np.random.default_rng(0)
    for i in range(3):  # the workflow's subject images, made here
        Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(comfy_server.input_dir / f"subject_{i}.png")
    entry = comfy_server.run(load_for_test("train_subject", ckpt), timeout=900, check=True)
    assert len(images(comfy_server, entry)) == 2  # the loss curve and the sample
    assert (comfy_server.models_dir / "tuneqdm" / "scales" / "tuneqdm_subject_scales.safetensors").is_file()


def test_default_model_demo_workflow(comfy_server):
    """The demo's graph (the embedded default model: no files to install), with 4 training and sampling steps."""
    entry = comfy_server.run(load_for_test("default_model_demo", ckpt="unused"), timeout=900, check=True)
    names = [p.name for p in output_files(entry, comfy_server.output_dir)]
    for model in ("float", "w4", "w4_tuneqdm"):
        for prompt in ("sks", "three", "seven"):
            assert sum(n.startswith(f"{model}_{prompt}_") for n in names) == 8
    assert any(n.startswith("loss_curve") for n in names)
    assert (comfy_server.models_dir / "tuneqdm" / "scales" / "tuneqdm_demo_digits_scales.safetensors").is_file()
