"""Load and Quantize Diffusion Model / Checkpoint UNet (TuneQDM) in the real server: the model it builds from a
file without ever holding the float model equals Quantize UNet on the stock loader's model, bit for bit
(files of both saved and compared tensor by tensor, and sampled latents), for fp16, fp8 and checkpoint
files; broken files get the loader's own error."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_lifecycle_server import W8_ERROR, Digits, rel
from tuneqdm_demo.files import UNET_FILE
from tuneqdm_fixtures.checkpoints import install, write_tiny_sd15_checkpoint
from tuneqdm_fixtures.demo_files import write_fp8
from tuneqdm_fixtures.host import host_version
from tuneqdm_fixtures.paths import asset_cache_dir
from tuneqdm_fixtures.server import ComfyError

pytestmark = pytest.mark.server

OPTIONS = dict(experts=4, scales="s_out and s_in (TuneQDM)", s_in_init="ones")


def _load_quantize(d: Digits, name: str, bits: str, keep_float: str = "", weight_dtype: str = "default"):
    return d.g.node("TuneQDMLoadQuantizeDiffusionModel", unet_name=name, weight_dtype=weight_dtype, bits=bits,
                    keep_float=keep_float, **OPTIONS)


def _quantize(d: Digits, model, bits: str, keep_float: str = ""):
    return d.g.node("TuneQDMQuantizeUNet", model=model, bits=bits, keep_float=keep_float, **OPTIONS)


def _saved(server, prefix: str) -> dict[str, torch.Tensor]:
    """The newest file Save Quantized UNet wrote under this prefix (it may add a counter or a subfolder)."""
    paths = sorted((server.models_dir / "tuneqdm").rglob(f"{prefix}*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert paths, f"no saved file for {prefix}"
    return load_file(str(paths[-1]))


@pytest.fixture(scope="module")
def fp16_name(comfy_models_dir) -> str:
    return install(UNET_FILE, comfy_models_dir / "diffusion_models", "digits_fp16.safetensors").name


@pytest.mark.parametrize("bits", ["4", "8"])
def test_loader_equals_quantize_unet_bit_for_bit(comfy_server, fp16_name, bits):
    d = Digits()
    streamed = _load_quantize(d, fp16_name, bits, keep_float="*out.2*")
    stock = _quantize(d, d.g.node("UNETLoader", unet_name=fp16_name, weight_dtype="default"), bits,
                      keep_float="*out.2*")
    for m, tag in ((streamed, "streamed"), (stock, "stock")):
        d.g.node("TuneQDMSaveQuantizedUNet", model=m.out(0), filename_prefix=f"onload_{bits}_{tag}")
    report = d.g.node("PreviewAny", source=streamed.out(1))
    d.sample(streamed.out(0), "streamed")
    d.sample(stock.out(0), "stock")
    latents, entry = d.run_entry(comfy_server)
    a, b = (_saved(comfy_server, f"onload_{bits}_{tag}") for tag in ("streamed", "stock"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(latents["streamed"], latents["stock"], rtol=0, atol=0)
    text = "".join(entry["outputs"][report.id]["text"])
    assert "kept in float: out.2 (matches keep_float)" in text and "loaded from digits_fp16.safetensors" in text


@pytest.mark.parametrize("fmt", ["scaled", "metadata"])
def test_loader_dequantizes_fp8_files(comfy_server, comfy_models_dir, fmt):
    if host_version() < (0, 8, 0):
        pytest.skip(f"the reference (UNETLoader on an fp8 '{fmt}' file) needs ComfyUI 0.8.0 (host {host_version()})")
    folder = comfy_models_dir / "diffusion_models"
    name = install(write_fp8(folder / f"digits_fp8_{fmt}.safetensors", fmt), folder).name
    d = Digits()
    d.sample(d.g.node("UNETLoader", unet_name=name, weight_dtype="default").out(0), "fp8")
    d.sample(_load_quantize(d, name, "8").out(0), "streamed_w8")
    out = d.run(comfy_server)
    assert rel(out["streamed_w8"], out["fp8"]) <= W8_ERROR


def test_checkpoint_loader_equals_quantize_unet(comfy_server, comfy_models_dir):
    asset = write_tiny_sd15_checkpoint(asset_cache_dir() / "tiny_sd15.safetensors")
    ckpt = install(asset.path, comfy_models_dir / "checkpoints").name
    d = Digits()
    streamed = d.g.node("TuneQDMLoadQuantizeCheckpoint", ckpt_name=ckpt, weight_dtype="default", bits="4",
                        keep_float="", **OPTIONS)
    stock = _quantize(d, d.g.node("CheckpointLoaderSimple", ckpt_name=ckpt).out(0), "4")
    for m, tag in ((streamed, "streamed"), (stock, "stock")):
        d.g.node("TuneQDMSaveQuantizedUNet", model=m.out(0), filename_prefix=f"onload_ckpt_{tag}")
    d.run(comfy_server)
    a, b = (_saved(comfy_server, f"onload_ckpt_{tag}") for tag in ("streamed", "stock"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "not safetensors"])
def test_broken_files_get_the_loaders_own_error(comfy_server, comfy_models_dir, damage, tmp_path):
    folder = comfy_models_dir / "diffusion_models"
    path = folder / f"broken_{damage.replace(' ', '_')}.safetensors"
    data = UNET_FILE.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
        expected = "truncated"
    elif damage == "foreign":
        from safetensors.torch import save_file
        save_file({"encoder.layer.0.weight": torch.zeros(4, 4)}, str(path))
        expected = "recognises no diffusion model"
    else:
        path.write_bytes(b"\x00" * 64)
        expected = "not a safetensors file"
    d = Digits()
    d.sample(_load_quantize(d, path.name, "4").out(0), "broken")
    with pytest.raises(ComfyError) as err:
        comfy_server.run(d.g.to_api(), check=True)
    assert "TuneQDMLoadQuantizeDiffusionModel" in str(err.value) and expected in str(err.value), str(err.value)
