"""The random-weight model files of tuneqdm_fixtures/checkpoints.py load through ComfyUI's stock loaders and sample.

Server tests use `comfy_server_unchecked`: they test the host and the files, not this pack's nodes.
Generated files are cached in asset_cache_dir() (.pytest_cache/tuneqdm-assets, or
$TUNEQDM_ASSET_CACHE) and hard-linked into the server's models folders.

Set TUNEQDM_FULL_SIZE=1 to also load and sample the full 860M-parameter SD1.5 UNet in the server
(about 30 s more and 1.7 GB written to the cache; see test_full_size_unet_samples_in_server).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tuneqdm_fixtures.checkpoints import (CLIP_POSITION_IDS_KEY, FULL_SD15_UNET, SD15_UNET_PARAMS, TINY_SD15_CKPT,
                                          TINY_SD15_UNET, Asset, cached_sd15_unet, cached_tiny_sd15_checkpoint,
                                          count_parameters, install, read_safetensors_header, sd15_checkpoint_specs,
                                          write_sd15_unet)
from tuneqdm_fixtures.graph import (Graph, add_txt2img, api_graph_txt2img, api_graph_unet_txt2img, execution_seconds,
                                    output_files)
from tuneqdm_fixtures.host import import_comfy

TINY_CKPT = TINY_SD15_CKPT
TINY_UNET = TINY_SD15_UNET
FULL_UNET = FULL_SD15_UNET.format(dtype="float16")
MISSING_MARKERS = ("unet missing", "unet unexpected", "clip missing", "Missing VAE keys")


def _report(name: str, **values: object) -> None:
    print(f"\n[assets] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_checkpoint() -> Asset:
    asset = cached_tiny_sd15_checkpoint()
    _report("tiny checkpoint", path=asset.path, MB=round(asset.nbytes / 1e6, 1), params=asset.parameters,
            seconds=round(asset.seconds, 2), reused=asset.reused)
    return asset


@pytest.fixture(scope="session")
def tiny_unet() -> Asset:
    asset = cached_sd15_unet(full_size=False)
    _report("tiny unet", MB=round(asset.nbytes / 1e6, 1), params=asset.parameters,
            seconds=round(asset.seconds, 2), reused=asset.reused)
    return asset


@pytest.fixture(scope="session")
def server_models(comfy_server_unchecked):
    models = comfy_server_unchecked.models_dir
    for sub in ("checkpoints", "diffusion_models"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    return models


def _run_and_check(server, graph: dict, timeout: float = 300.0) -> tuple[dict, str, float]:
    """Runs a graph; returns its history entry, the server log it produced, and its wall time."""
    log_before = len(server.log_text())
    start = time.perf_counter()
    entry = server.run(graph, timeout=timeout, check=True)
    wall = time.perf_counter() - start
    log = server.log_text()[log_before:]
    bad = [line for line in log.splitlines() if any(m in line for m in MISSING_MARKERS)]
    assert not bad, "the loader left tensors uninitialised:\n" + "\n".join(bad)
    return entry, log, wall


def _check_outputs(server, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from safetensors.torch import load_file

    images = output_files(entry, server.output_dir, kind="images")
    assert len(images) == 1 and images[0].is_file(), entry.get("outputs")
    pixels = np.asarray(Image.open(images[0]).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (64, 64, 3)
    assert not np.isnan(pixels).any()
    assert pixels.std() > 0, "the decoded image is constant"

    latents = output_files(entry, server.output_dir, kind="latents")
    assert len(latents) == 1 and latents[0].is_file(), entry.get("outputs")
    latent = load_file(str(latents[0]))["latent_tensor"].float().numpy()
    assert latent.shape == (1, 4, 8, 8)
    # SaveImage maps NaN pixels to 0 without a word: the sampled latent is where NaN would show.
    assert np.isfinite(latent).all(), "the sampled latent has NaN/inf"
    assert latent.std() > 0
    return pixels, latent


# ---- graph builder (pure Python) ---------------------------------------------------------------------------

def test_graph_builder_txt2img_shape() -> None:
    graph = api_graph_txt2img("x.safetensors", steps=2, save_latent=True)
    types = {nid: n["class_type"] for nid, n in graph.items()}
    assert sorted(types.values()) == sorted(["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode",
                                              "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
                                              "SaveLatent"])
    assert list(graph) == [str(i) for i in range(1, 9)]
    sampler = next(n for n in graph.values() if n["class_type"] == "KSampler")
    assert sampler["inputs"]["model"] == ["1", 0] and sampler["inputs"]["steps"] == 2
    assert graph["2"]["inputs"]["clip"] == ["1", 1]


def test_graph_builder_insert_custom_node() -> None:
    g = Graph()
    t = add_txt2img(g, ckpt_name="x.safetensors")
    q = g.insert(t.model, "TuneQDMQuantizeUNet", "model", bits=4)
    assert t.sampler.inputs["model"] == q.out(0)
    assert q.inputs == {"model": t.loader.out(0), "bits": 4}
    api = g.to_api()
    api[q.id]["inputs"]["bits"] = 8  # to_api returns a copy
    assert g[q.id].inputs["bits"] == 4
    with pytest.raises(ValueError):
        g.remove(q)  # still feeds the sampler
    unet = g.node("UNETLoader", unet_name="u.safetensors", weight_dtype="default")
    assert g.rewire(q, unet) == 1 and t.sampler.inputs["model"] == unet.out(0)


# ---- files, in process -------------------------------------------------------------------------------------

@pytest.mark.server
def test_tiny_checkpoint_layout(tiny_checkpoint: Asset) -> None:
    header = read_safetensors_header(tiny_checkpoint)
    keys = [k for k in header if k != "__metadata__"]
    groups = {p: [k for k in keys if k.startswith(p)] for p in
              ("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model.")}
    assert sum(len(v) for v in groups.values()) == len(keys)
    assert all(groups.values())
    dtypes = {header[k]["dtype"] for k in keys}
    assert dtypes == {"F16", "I64"}
    assert header[CLIP_POSITION_IDS_KEY] == {**header[CLIP_POSITION_IDS_KEY], "dtype": "I64",
                                                    "shape": [1, 77]}
    specs = sd15_checkpoint_specs()
    assert set(keys) == set(specs)
    assert all(header[k]["shape"] == list(specs[k].shape) for k in keys)
    # 25.8M cut-down UNet + 123.1M CLIP-L (no text_projection, as in real SD1.5 files) + 83.7M VAE.
    assert count_parameters(tiny_checkpoint) == 25_789_444 + 123_060_480 + 83_653_863


@pytest.mark.server
def test_tiny_checkpoint_loads_in_process_as_sd15(tiny_checkpoint: Asset, caplog) -> None:
    """comfy.sd.load_checkpoint_guess_config (what CheckpointLoaderSimple calls) detects SD1.5 and every tensor
    of MODEL, CLIP and VAE holds the file's values: nothing is left torch.empty."""
    import torch
    from safetensors import safe_open

    comfy = import_comfy()
    import comfy.sd

    start = time.perf_counter()
    with caplog.at_level(logging.DEBUG):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    load_s = time.perf_counter() - start
    # ComfyUI logs the clip_l.logit_scale/text_projection gap of every real SD1.5 file at DEBUG level only.
    bad = [r.getMessage()[:300] for r in caplog.records
           if r.levelno >= logging.WARNING and any(m in r.getMessage() for m in MISSING_MARKERS)]
    assert not bad, bad
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert type(clip.cond_stage_model) is comfy.sd1_clip.SD1ClipModel
    assert type(vae.first_stage_model) is comfy.ldm.models.autoencoder.AutoencoderKL

    loaded = {}
    loaded.update({"model.diffusion_model." + k: v for k, v in model.model.diffusion_model.state_dict().items()})
    loaded.update({"first_stage_model." + k: v for k, v in vae.first_stage_model.state_dict().items()})
    clip_sd = clip.cond_stage_model.state_dict()
    # Not in SD1.5 files (real ones neither): logit_scale has a constant init, text_projection stays
    # uninitialised but SD1CheckpointClipModel runs with return_projected_pooled=False.
    leftovers = {k for k in clip_sd if not k.startswith("clip_l.transformer.text_model.")}
    assert leftovers == {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}
    loaded.update({k.replace("clip_l.", "cond_stage_model.", 1): v for k, v in clip_sd.items() if k not in leftovers})
    with safe_open(str(tiny_checkpoint), "pt") as f:
        file_keys = set(f.keys()) - {CLIP_POSITION_IDS_KEY}
        assert set(loaded) == file_keys
        for key in sorted(file_keys):
            assert torch.equal(loaded[key].float(), f.get_tensor(key).float()), key
    _report("in-process load", seconds=round(load_s, 2), unet_dtype=model.model.get_dtype(),
            vae_dtype=vae.vae_dtype)


@pytest.mark.server
def test_unet_file_cache_and_dtypes(tmp_path: Path) -> None:
    """Reuse only an identical, complete file; fp32 and bf16 files load through ComfyUI's UNet loader."""
    import torch
    from safetensors import safe_open

    comfy = import_comfy()
    import comfy.sd

    path = tmp_path / "u.safetensors"
    first = write_sd15_unet(path, full_size=False)
    assert not first.reused and first.parameters == 25_789_444 and first.nbytes == path.stat().st_size
    assert write_sd15_unet(path, full_size=False).reused
    assert not write_sd15_unet(path, full_size=False, seed=1).reused      # other seed: rewritten
    with open(path, "r+b") as f:                                                  # truncated: rewritten
        f.truncate(path.stat().st_size - 2)
    again = write_sd15_unet(path, full_size=False, seed=1)
    assert not again.reused and again.nbytes == first.nbytes
    assert [p.name for p in tmp_path.iterdir()] == ["u.safetensors"]              # no temporary left over

    for dtype, code in (("fp32", "F32"), ("bf16", "BF16")):
        p = write_sd15_unet(tmp_path / f"u_{dtype}.safetensors", full_size=False, dtype=dtype).path
        header = read_safetensors_header(p)
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {code}
        model = comfy.sd.load_diffusion_model(str(p))
        assert type(model.model.model_config) is comfy.supported_models.SD15
        state = model.model.diffusion_model.state_dict()
        with safe_open(str(p), "pt") as f:
            assert set(f.keys()) == set(state)
            for key in ("input_blocks.0.0.weight", "out.2.weight", "middle_block.1.proj_in.weight"):
                assert torch.equal(state[key].float(), f.get_tensor(key).float()), key
    with pytest.raises(ValueError):
        write_sd15_unet(tmp_path / "x.safetensors", full_size=False, dtype="int8")


# ---- the real server ---------------------------------------------------------------------------------------

@pytest.mark.server
def test_txt2img_through_checkpoint_loader(comfy_server_unchecked, server_models, tiny_checkpoint) -> None:
    server = comfy_server_unchecked
    install(tiny_checkpoint, server_models / "checkpoints", TINY_CKPT)
    graph = api_graph_txt2img(TINY_CKPT, steps=4, seed=1, filename_prefix="assets_ckpt", save_latent=True)
    entry, log, wall = _run_and_check(server, graph)
    pixels, latent = _check_outputs(server, entry)
    # A second run skips loading (cached node outputs); a new seed re-samples only.
    graph2 = api_graph_txt2img(TINY_CKPT, steps=4, seed=2, filename_prefix="assets_ckpt2", save_latent=True)
    entry2, _, wall2 = _run_and_check(server, graph2)
    pixels2, _ = _check_outputs(server, entry2)
    assert not np.array_equal(pixels, pixels2)
    _report("server txt2img (CheckpointLoaderSimple)", first_run_s=round(wall, 2),
            first_exec_s=execution_seconds(entry), resample_s=round(wall2, 2),
            pixel_std=round(float(pixels.std()), 2), latent_std=round(float(latent.std()), 3))


@pytest.mark.server
def test_txt2img_through_unet_loader(comfy_server_unchecked, server_models, tiny_checkpoint, tiny_unet) -> None:
    server = comfy_server_unchecked
    install(tiny_checkpoint, server_models / "checkpoints", TINY_CKPT)
    install(tiny_unet, server_models / "diffusion_models", TINY_UNET)
    graph = api_graph_unet_txt2img(TINY_UNET, TINY_CKPT, steps=4, filename_prefix="assets_unet", save_latent=True)
    entry, _, wall = _run_and_check(server, graph)
    _check_outputs(server, entry)
    _report("server txt2img (UNETLoader, tiny)", wall_s=round(wall, 2), exec_s=execution_seconds(entry))


@pytest.mark.server
def test_full_size_unet_parameter_count(tmp_path: Path) -> None:
    """Writes the full SD1.5 UNet (1.72 GB fp16, ~7 s here), counts it from the header, lets ComfyUI's own
    detection recognise it from shapes alone (meta tensors: nothing is loaded) and deletes it."""
    import torch

    comfy = import_comfy()
    path = tmp_path / FULL_UNET
    try:
        asset = write_sd15_unet(path, full_size=True)
        assert asset.parameters == SD15_UNET_PARAMS == 859_520_964
        assert count_parameters(path) == 859_520_964
        assert asset.nbytes == path.stat().st_size > 2 * 859_520_964
        header = read_safetensors_header(path)
        sd = {k: torch.empty(v["shape"], dtype=torch.float16, device="meta") for k, v in header.items()
              if k != "__metadata__"}
        config = comfy.model_detection.model_config_from_unet(sd, "")
        assert type(config) is comfy.supported_models.SD15
        assert config.unet_config["channel_mult"] == [1, 2, 4, 4]
        assert config.unet_config["num_res_blocks"] == [2, 2, 2, 2]
        _report("full-size unet", GB=round(asset.nbytes / 1e9, 3), params=asset.parameters,
                write_s=round(asset.seconds, 2), MB_per_s=round(asset.nbytes / 1e6 / asset.seconds))
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.server
@pytest.mark.skipif(os.environ.get("TUNEQDM_FULL_SIZE") != "1", reason="set TUNEQDM_FULL_SIZE=1 (1.7 GB file, ~30 s)")
def test_full_size_unet_samples_in_server(comfy_server_unchecked, server_models, tiny_checkpoint) -> None:
    server = comfy_server_unchecked
    full = cached_sd15_unet(full_size=True)
    install(full, server_models / "diffusion_models", FULL_UNET)
    install(tiny_checkpoint, server_models / "checkpoints", TINY_CKPT)
    graph = api_graph_unet_txt2img(FULL_UNET, TINY_CKPT, steps=2, filename_prefix="assets_full", save_latent=True)
    entry, _, wall = _run_and_check(server, graph, timeout=600)
    _check_outputs(server, entry)
    _report("server txt2img (UNETLoader, full 860M)", write_s=round(full.seconds, 2), reused=full.reused,
            wall_s=round(wall, 2), exec_s=execution_seconds(entry))
