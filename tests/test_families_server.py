"""The model families people use today (SDXL, SD3.5 Medium, Flux, Wan 2.1 T2V) through ComfyUI 0.8's stock
UNETLoader, at test size (tuneqdm_fixtures/families.py: each family's exact tensor names, detected as that family):
quantize-on-load and Quantize UNet at W4 and W8 -> stock KSampler with the family's own latent format and
conditioning shapes; routing over every expert with the family's own model_sampling; Train TuneQDM Scales
3 steps -> Save Scales -> Load Scales -> the trained latent (to fp16 rounding of the saved scales). Flux
trains with activation checkpointing (its in-place residual adds: tuneqdm_core/out_of_place.py), Wan from
5-D video latents on the `latents` input.

Conditioning and the VAE come from tuneqdm_fixtures/fixture_nodes/tuneqdm_family_fixtures (random tensors of the
family's shapes, and a fixed pixel codec in the VAE's place): no text encoder or VAE weights exist here.
Numbers are relative L2 distances between final latents. Full-size files: TUNEQDM_FULL_SIZE=1."""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tuneqdm_fixtures.checkpoints import install
from tuneqdm_fixtures.families import (FAMILIES, FAMILY_NODES, SDXL_UNET_PARAMS, family_specs, flux_dev_parameters,
                                       weight_bytes, write_family_file)
from tuneqdm_fixtures.graph import Graph, output_files
from tuneqdm_fixtures.host import host_version
from tuneqdm_fixtures.paths import checkout
from tuneqdm_fixtures.server import PACK_FOLDER, ComfyServer

pytestmark = pytest.mark.server

EXPERTS = 4
# Per-channel base steps: the default group-wise fit (group 32, least-squares refits) costs several times more
# on these 2 cores and changes nothing family-specific; tests/test_quantize_on_load_server.py covers it, and
# the full-size test below and README's figures use the default.
OPTIONS = dict(experts=EXPERTS, scales="s_out and s_in (TuneQDM)", s_in_init="ones", group_size="per-channel")
PROMPT_TIMEOUT = 1800  # seconds: generous, because the 2 cores are often shared with other test runs


@dataclass(frozen=True)
class Case:
    """How a family is sampled: its file's dtype, its latent node, and enough steps that its schedule's
    timesteps reach every one of 4 equal intervals (flow shift 3 (SD3) and 8 (Wan) keep most steps high)."""

    dtype: str
    latent: tuple[str, dict[str, Any]]
    steps: int
    scheduler: str = "simple"


# 32x32 pixels: 4x4 latents, the smallest every family's patching and SDXL's three levels accept. Steps: the
# fewest whose timesteps fall in all 4 intervals: SDXL 999/749/499/249; Flux's exponential shift (mu 1.15)
# reaches t < 250 only when the plain time is under 0.095, i.e. from 11 steps (5 steps end at t = 441).
_SQUARE = dict(width=32, height=32, batch_size=1)
CASES = {
    "sdxl": Case("fp16", ("EmptyLatentImage", _SQUARE), 4, "normal"),
    "sd35m": Case("fp16", ("EmptySD3LatentImage", _SQUARE), 20),
    "flux": Case("bf16", ("EmptySD3LatentImage", _SQUARE), 11),
    "wan21": Case("fp16", ("EmptyHunyuanLatentVideo", dict(width=32, height=32, length=1, batch_size=1)), 30),
}
#: Families whose Quantize UNet W8 route is also built (bit equality with quantize-on-load, as at W4): the
#: small ones. SDXL's (154M) and Flux's (546M) test files would cost another quantization each.
QUANTIZE_UNET_W8 = {"sd35m", "wan21"}
#: Families trained with activation checkpointing on (the node's default; the others train without it, which
#: is faster here): Flux, whose blocks add residuals in place, wrong under checkpointing until
#: tuneqdm_core/out_of_place.py (tests/test_out_of_place.py checks one block's gradients).
CHECKPOINTED = {"flux"}
#: Families trained from the `latents` input (VAEEncode of the images) instead of IMAGE + VAE: Wan's are
#: videos, (B, C, T, H, W).
FROM_LATENTS = {"wan21"}
#: Measured figures, printed at the end of the module (pytest -s) and written beside the asset cache.
MEASURED: dict[str, dict[str, Any]] = {}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def server() -> ComfyServer:
    if host_version() < (0, 8, 0):
        pytest.skip(f"the family tests target ComfyUI 0.8.0 (host {host_version()})")
    srv = ComfyServer(custom_nodes={PACK_FOLDER: checkout(), FAMILY_NODES.name: FAMILY_NODES}).start()
    try:
        info = srv.object_info()
        missing = [n for n in ("TuneQDMLoadQuantizeDiffusionModel", "TestFamilyConditioning") if n not in info]
        if missing:
            pytest.fail(f"nodes missing from the server: {missing}\n{srv.log_tail(60)}", pytrace=False)
        yield srv
    finally:
        srv.stop()
        if MEASURED:
            print("\nmodel families, test size:\n" + json.dumps(MEASURED, indent=1))


class FamilyGraph:
    """One graph on one family's file: conditioning, latent, and named samplers whose latents come back."""

    def __init__(self, family: str, unet_name: str) -> None:
        self.family, self.unet_name, self.case = family, unet_name, CASES[family]
        self.g = Graph()
        self.pos = self.g.node("TestFamilyConditioning", family=family, seed=1, tokens=8, width=1024, height=1024,
                               guidance=3.5)
        self.neg = self.g.node("TestFamilyConditioning", family=family, seed=2, tokens=8, width=1024, height=1024,
                               guidance=3.5)
        kind, inputs = self.case.latent
        self.latent = self.g.node(kind, **inputs)
        self.saves: dict[str, Any] = {}
        self.texts: dict[str, Any] = {}

    def unet(self):
        return self.g.node("UNETLoader", unet_name=self.unet_name, weight_dtype="default")

    def load_quantize(self, bits: str, keep_float: str = ""):
        return self.g.node("TuneQDMLoadQuantizeDiffusionModel", unet_name=self.unet_name, weight_dtype="default",
                           bits=bits, keep_float=keep_float, **OPTIONS)

    def quantize(self, model, bits: str, keep_float: str = ""):
        return self.g.node("TuneQDMQuantizeUNet", model=model, bits=bits, keep_float=keep_float, **OPTIONS)

    def _ksampler_inputs(self) -> dict[str, Any]:
        # cfg 1: one model call per step (Flux and Wan are sampled near it; the route is what is tested here)
        return dict(seed=7, steps=self.case.steps, cfg=1.0, sampler_name="euler", scheduler=self.case.scheduler,
                    positive=self.pos, negative=self.neg, latent_image=self.latent, denoise=1.0)

    def sample(self, model, name: str):
        s = self.g.node("KSampler", model=model, **self._ksampler_inputs())
        self.saves[name] = self.g.node("SaveLatent", samples=s, filename_prefix=f"latents/{self.family}_{name}")
        return s

    def routed(self, model, name: str):
        s = self.g.node("TuneQDMExpertRoutedSampler", model=model, routing="timestep intervals",
                        boundaries="250, 500, 750", fixed_expert=0, **self._ksampler_inputs())
        self.saves[name] = self.g.node("SaveLatent", samples=s.out(0), filename_prefix=f"latents/{self.family}_{name}")
        self.text(s.out(1), name)
        return s

    def text(self, ref, name: str) -> None:
        self.texts[name] = self.g.node("PreviewAny", source=ref)

    def run(self, server: ComfyServer, timeout: float = 600) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        entry = server.run(self.g.to_api(), timeout=timeout, check=True)
        latents = {}
        for name, node in self.saves.items():
            (path,) = output_files(entry, server.output_dir, node_id=node.id, kind="latents")
            latents[name] = load_file(str(path))["latent_tensor"]
        texts = {name: "".join(entry["outputs"][node.id]["text"]) for name, node in self.texts.items()}
        return latents, texts


def _installed(server: ComfyServer, family: str, dtype: str) -> str:
    asset = write_family_file(family, "test", dtype)
    return install(asset.path, server.models_dir / "diffusion_models").name


def _train(d: FamilyGraph, model, steps: int):
    vae = d.g.node("TestFamilyVAE", family=d.family)
    images = d.g.node("TestFamilyImages", count=3, size=64, seed=0)
    data = dict(vae=vae, instance_images=images)
    if d.family in FROM_LATENTS:
        data = dict(latents=d.g.node("VAEEncode", pixels=images, vae=vae))
    return d.g.node("TuneQDMTrainScales", model=model, instance_conditioning=d.pos, steps=steps, lr_s_out=1e-4,
                    lr_s_in=1e-2, train_s_in=True, batch_size=1, seed=3, resolution=64,
                    gradient_checkpointing=d.family in CHECKPOINTED, **data)


def _saved_unet(server: ComfyServer, prefix: str) -> dict[str, torch.Tensor]:
    (path,) = (server.models_dir / "tuneqdm" / "unet").glob(f"{prefix}.safetensors")
    return load_file(str(path))


def _experts_used(summary: str) -> list[int]:
    match = re.search(r"experts used: \[([\d, ]*)\]", summary)
    assert match, summary[:500]
    return [int(e) for e in match.group(1).split(",") if e.strip()]


def test_every_size_is_detected_as_its_family():
    """Every family at both sizes, from names and shapes alone (family_specs runs ComfyUI's detection and
    refuses another config or class); the full-size SDXL UNet has the real parameter count, and Flux's
    per-block counts scale to Flux dev's 11.9B."""
    if host_version() < (0, 8, 0):
        pytest.skip(f"the family tests target ComfyUI 0.8.0 (host {host_version()})")
    counts = {(f, size): sum(s.numel for s in family_specs(f, size).values()) for f in FAMILIES
              for size in ("test", "full")}
    assert counts["sdxl", "full"] == SDXL_UNET_PARAMS
    dev = flux_dev_parameters(family_specs("flux", "full"))
    assert 11.8e9 < dev < 12.0e9, dev
    assert all(counts[f, "test"] < counts[f, "full"] for f in FAMILIES)


@pytest.mark.parametrize("family", list(CASES))
def test_family_quantize_sample_train_reload(server, family):
    case = CASES[family]
    name = _installed(server, family, case.dtype)
    started = time.perf_counter()

    d = FamilyGraph(family, name)
    unet = d.unet()
    d.sample(unet, "float")
    w8 = d.load_quantize("8")
    w4 = d.load_quantize("4")
    d.sample(w8, "onload_w8")
    d.routed(w4, "onload_w4")
    # Quantize UNet on the stock loader's MODEL must build the very model quantize-on-load builds: both are
    # saved and compared tensor by tensor (cheaper than sampling each again).
    routes = {"onload_w4": w4, "quantize_w4": d.quantize(unet, "4")}
    if family in QUANTIZE_UNET_W8:
        routes.update(onload_w8=w8, quantize_w8=d.quantize(unet, "8"))
    for tag, model in routes.items():
        d.g.node("TuneQDMSaveQuantizedUNet", model=model, filename_prefix=f"families/{family}_{tag}", overwrite=True)
    d.text(w4.out(1), "report_w4")
    train = _train(d, w4, steps=3)
    d.g.node("TuneQDMSaveScales", model=w4, scales=train.out(1), filename_prefix=f"families/{family}",
             overwrite=True)
    d.sample(train.out(0), "trained")
    d.text(train.out(3), "train_report")
    out, texts = d.run(server, PROMPT_TIMEOUT)
    first_s = time.perf_counter() - started

    # Load Scales lists files when the prompt is validated: the saved file is used by a second prompt.
    d2 = FamilyGraph(family, name)
    loaded = d2.g.node("TuneQDMLoadScales", model=d2.load_quantize("4"), scales_name=f"families/{family}.safetensors")
    d2.sample(loaded, "loaded")
    out2, _ = d2.run(server, PROMPT_TIMEOUT)

    float_ = out["float"]
    assert torch.isfinite(float_).all() and float_.abs().sum() > 0
    kind, _ = case.latent
    channels = FAMILIES[family].latent_channels
    assert float_.shape[1] == channels and float_.ndim == (5 if FAMILIES[family].video else 4), (kind, float_.shape)
    saved = {tag: _saved_unet(server, f"families/{family}_{tag}") for tag in routes}
    for bits in ("4", "8"):
        if f"quantize_w{bits}" in saved:
            a, b = saved[f"quantize_w{bits}"], saved[f"onload_w{bits}"]
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"W{bits} {key}")
    figures = {
        "w8_vs_float": rel(out["onload_w8"], float_),
        "w4_vs_float": rel(out["onload_w4"], float_),
        "quantize_unet_equals_onload": sorted(k for k in saved if k.startswith("quantize")),
        "experts_used": _experts_used(texts["onload_w4"]),
        "first_prompt_s": round(first_s, 1),
        "trained_vs_w4": rel(out["trained"], out["onload_w4"]),
        "loaded_vs_trained": rel(out2["loaded"], out["trained"]),
    }
    MEASURED[family] = figures
    assert figures["experts_used"] == list(range(EXPERTS)), texts["onload_w4"][:300]
    assert figures["w8_vs_float"] < 0.05, figures
    assert figures["w4_vs_float"] > 2 * figures["w8_vs_float"], figures
    assert figures["w4_vs_float"] < 0.6, figures
    assert 1e-4 < figures["trained_vs_w4"] < 0.5, figures
    # Not bit for bit: a scales file stores each scale's change from its start in fp16 (tuneqdm_core/fileio.py,
    # save_scales), while the trained MODEL samples with the fp32 scales. The rounding moves the latent by
    # about 2e-5 relative (SDXL); 3 steps of training move it a hundred times more.
    assert figures["loaded_vs_trained"] < 1e-4, figures
    assert figures["loaded_vs_trained"] < figures["trained_vs_w4"] / 20, figures
    assert "complete: 3/3 steps" in texts["train_report"], texts["train_report"]


#: What keep_float 'auto' keeps of the test files (nodes/family_defaults.py): the embeddings of the latent,
#: timestep and text, and the final projection.
AUTO_KEPT = {
    "sd35m": {"x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
              "context_embedder", "final_layer.linear"},
    "wan21": {"text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "head.head"},
}


@pytest.mark.parametrize("family", list(AUTO_KEPT))
def test_keep_float_auto_keeps_the_family_default_on_both_quantizing_nodes(server, family):
    """keep_float 'auto' (the widget's default): quantize-on-load and Quantize UNet keep the family's layers in
    float, say so in the report, and build the same model (saved and compared tensor by tensor)."""
    name = _installed(server, family, CASES[family].dtype)
    d = FamilyGraph(family, name)
    routes = {"onload": d.load_quantize("4", "auto"), "quantize": d.quantize(d.unet(), "4", "auto")}
    for tag, node in routes.items():
        d.text(node.out(1), tag)
        d.g.node("TuneQDMSaveQuantizedUNet", model=node, filename_prefix=f"families/{family}_auto_{tag}",
                 overwrite=True)
    _, texts = d.run(server, PROMPT_TIMEOUT)

    for tag, text in texts.items():
        assert f"keep_float auto for {FAMILIES[family].comfy_class}:" in text, text[:600]
        assert set(re.findall(r"kept in float: (\S+) \(matches keep_float\)", text)) == AUTO_KEPT[family], text
    onload, quantized = (_saved_unet(server, f"families/{family}_auto_{tag}") for tag in routes)
    assert onload.keys() == quantized.keys()
    for key in onload:
        torch.testing.assert_close(onload[key], quantized[key], rtol=0, atol=0, msg=key)
    for layer in AUTO_KEPT[family]:
        assert f"{layer}.weight" in onload and f"{layer}.qweight" not in onload, layer


def test_fp8_file_loads_and_quantizes(server):
    """An fp8 file as users have them (float8_e4m3fn Linear/Conv weights, the rest bf16): the stock UNETLoader
    detects it as SDXL, and quantize-on-load W8 samples within W8 error of it."""
    asset = write_family_file("sdxl", "test", "fp8")
    name = install(asset.path, server.models_dir / "diffusion_models").name
    d = FamilyGraph("sdxl", name)
    d.sample(d.unet(), "fp8")
    d.sample(d.load_quantize("8"), "onload_w8")
    out, _ = d.run(server, PROMPT_TIMEOUT)
    error = rel(out["onload_w8"], out["fp8"])
    MEASURED["sdxl_fp8"] = {"w8_vs_fp8": error, "file_bytes": asset.nbytes}
    assert torch.isfinite(out["fp8"]).all() and out["fp8"].abs().sum() > 0
    assert error < 0.05, error


# ---- full size (TUNEQDM_FULL_SIZE=1) -------------------------------------------------------------------------

FULL_SIZE = os.environ.get("TUNEQDM_FULL_SIZE") == "1"
FULL_CASES = {"sdxl": "fp16", "sd35m": "fp16", "flux": "bf16", "wan21": "fp16"}


def load_and_measure(family: str, size: str, dtype: str) -> tuple[dict[str, Any], torch.Tensor]:
    """The family's file through quantize-on-load W4 (default options) on a fresh server, then one sampling
    step at the smallest latent: seconds, the server's peak RSS (baseline, after the load, after the step)
    and the weight bytes from the loader's report."""
    asset = write_family_file(family, size, dtype)
    srv = ComfyServer(custom_nodes={PACK_FOLDER: checkout(), FAMILY_NODES.name: FAMILY_NODES}).start()
    try:
        baseline = srv.peak_rss()
        name = install(asset.path, srv.models_dir / "diffusion_models").name
        d = FamilyGraph(family, name)
        w4 = d.g.node("TuneQDMLoadQuantizeDiffusionModel", unet_name=name, weight_dtype="default", bits="4",
                      keep_float="", experts=EXPERTS, scales="s_out and s_in (TuneQDM)", s_in_init="ones")
        d.text(w4.out(1), "report")
        started = time.perf_counter()
        _, texts = d.run(srv, 3 * PROMPT_TIMEOUT)
        load_s = time.perf_counter() - started
        load_peak = srv.peak_rss()
        d.texts.clear()  # the report node is served from the cache in the next prompt
        sampler = d.sample(w4, "one_step")
        sampler.set(steps=1)
        started = time.perf_counter()
        out, _ = d.run(srv, 3 * PROMPT_TIMEOUT)
        step_s = time.perf_counter() - started
        peak = srv.peak_rss()
        prefix = f"families/{family}_{size}_w4"
        d.g.node("TuneQDMSaveQuantizedUNet", model=w4, filename_prefix=prefix, overwrite=True)
        d.run(srv, 3 * PROMPT_TIMEOUT)
        (saved,) = (srv.models_dir / "tuneqdm" / "unet").glob(f"{prefix}.safetensors")
        weights_before, weights_after = weight_bytes(asset.path, saved)
    finally:
        srv.stop()
    quantized = re.search(r"weights ([\d,]+) B -> ([\d,]+) B", texts["report"])
    before, after = (int(quantized.group(i).replace(",", "")) for i in (1, 2))
    figures = {
        "parameters": asset.parameters, "file_bytes": asset.nbytes, "load_quantize_s": round(load_s, 1),
        "model_bytes_before": before, "model_bytes_after": after, "ratio_to_file": round(after / asset.nbytes, 4),
        "weight_ratio": round(weights_after / weights_before, 4),
        "server_baseline_rss": baseline, "peak_rss_after_load": load_peak, "peak_rss_after_step": peak,
        "one_step_s": round(step_s, 1),
    }
    MEASURED[f"{family}_{size}_load"] = figures
    return figures, out["one_step"]


def test_load_and_measure_runs_at_test_size():
    """The full-size measurement itself, on Wan's 1.1M-parameter test file (seconds, not hours)."""
    if host_version() < (0, 8, 0):
        pytest.skip(f"the family tests target ComfyUI 0.8.0 (host {host_version()})")
    figures, latent = load_and_measure("wan21", "test", "fp16")
    assert torch.isfinite(latent).all() and latent.shape[1] == 16
    assert 0 < figures["model_bytes_after"] < figures["model_bytes_before"]
    assert 0 < figures["weight_ratio"] < 1
    assert figures["server_baseline_rss"] <= figures["peak_rss_after_load"] <= figures["peak_rss_after_step"]


@pytest.mark.skipif(not FULL_SIZE, reason="full-size files are 2.6-5.1 GB each and their loads take many minutes "
                                          "on 2 cores: set TUNEQDM_FULL_SIZE=1 to run them")
@pytest.mark.parametrize("family", list(FULL_CASES))
def test_full_size_quantize_on_load(family):
    """Full-size files (Flux: true widths, FLUX_FULL_DEPTH blocks): W4 at most 0.30x of the file's Linear/Conv
    weight bytes, and the server's peak RSS grows by less than the file (the float model is never in memory)."""
    if host_version() < (0, 8, 0):
        pytest.skip(f"the family tests target ComfyUI 0.8.0 (host {host_version()})")
    figures, latent = load_and_measure(family, "full", FULL_CASES[family])
    print(json.dumps({family: figures}))
    assert torch.isfinite(latent).all()
    # The measure: the file's Linear/Conv weight bytes. The whole model (ratio_to_file) also holds the
    # float tables and norms, in fp32 on a CPU: SD3.5's 226M-value pos_embed takes it to 0.45x.
    assert figures["weight_ratio"] <= 0.30, figures
    assert figures["peak_rss_after_load"] - figures["server_baseline_rss"] < figures["file_bytes"], figures
