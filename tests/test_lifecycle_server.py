"""The pack inside ComfyUI's model life cycle, as sequences of prompts on one server: models stay loaded
and patched in place between prompts, LoRA clones share modules with the plain MODEL, fp8 files load
through other op classes, and sampling patches change the schedule. Numbers are relative L2 distances
between final latents of the embedded default model."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from tuneqdm_demo import data
from tuneqdm_demo.files import UNET_FILE
from tuneqdm_fixtures.checkpoints import install
from tuneqdm_fixtures.demo_files import conv2d_layers, linear_layers, unet_state, write_fp8, write_lora
from tuneqdm_fixtures.graph import Graph, output_files
from tuneqdm_fixtures.host import host_version

pytestmark = pytest.mark.server

STEPS = 8
W8_ERROR = 0.01  # W8 against float on the default model measures 0.0045-0.007 relative


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Digits:
    """One graph on the default model: its loader, prompts and latent, and a sampler per branch."""

    def __init__(self) -> None:
        self.g = Graph()
        self.load = self.g.node("TuneQDMLoadDefaultModel")
        self.pos = self.g.node("TuneQDMDefaultTextEncode", text_encoder=self.load.out(1), text=data.caption(5))
        self.neg = self.g.node("TuneQDMDefaultTextEncode", text_encoder=self.load.out(1), text="")
        self.latent = self.g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
        self.saves: dict[str, object] = {}

    @property
    def model(self):
        return self.load.out(0)

    def lora(self, model, name: str, strength: float = 1.0):
        return self.g.node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=strength)

    def quantize(self, model, bits: str = "8", experts: int = 4, keep_float: str = ""):
        # keep_float variants (" ", "  ") give the same config but new cache keys: a later prompt really
        # quantizes again instead of serving ComfyUI's cached output.
        return self.g.node("TuneQDMQuantizeUNet", model=model, bits=bits, experts=experts,
                           scales="s_out and s_in (TuneQDM)", s_in_init="ones", keep_float=keep_float)

    def sample(self, model, name: str, sampler: str = "euler", scheduler: str = "normal", steps: int = STEPS):
        s = self.g.node("KSampler", model=model, positive=self.pos, negative=self.neg, latent_image=self.latent,
                        seed=7, steps=steps, cfg=3.0, sampler_name=sampler, scheduler=scheduler, denoise=1.0)
        self.saves[name] = self.g.node("SaveLatent", samples=s, filename_prefix=f"latents/lifecycle_{name}")
        return s

    def run(self, server) -> dict[str, torch.Tensor]:
        return self.run_entry(server)[0]

    def run_entry(self, server) -> tuple[dict[str, torch.Tensor], dict]:
        entry = server.run(self.g.to_api(), timeout=900, check=True)
        out = {}
        for name, node in self.saves.items():
            (path,) = output_files(entry, server.output_dir, node_id=node.id, kind="latents")
            out[name] = load_file(str(path))["latent_tensor"]
        return out, entry


@pytest.fixture(scope="module")
def loras(comfy_models_dir) -> dict[str, str]:
    folder = comfy_models_dir / "loras"
    return {naming: install(write_lora(folder / f"digits_{naming}.safetensors", naming=naming, seed=i), folder).name
            for i, naming in enumerate(("diffusion_model", "lora_unet"))}


def test_quantize_reads_unpatched_weights_whatever_ran_before(comfy_server, loras):
    """A LoRA clone sampled in an earlier prompt stays loaded with its patches written into the modules it
    shares with the plain MODEL. Quantizing the plain MODEL afterwards must equal a fresh quantize, and
    quantizing LoRA->MODEL must apply the LoRA once, not twice."""
    lora = loras["diffusion_model"]
    d = Digits()
    d.sample(d.quantize(d.model, keep_float=""), "w8_fresh")
    d.sample(d.model, "float")
    first = d.run(comfy_server)

    d = Digits()
    d.sample(d.lora(d.model, lora), "float_lora")
    d.sample(d.lora(d.model, lora, strength=2.0), "float_lora_x2")
    loaded = d.run(comfy_server)
    assert rel(loaded["float_lora"], first["float"]) > 0.05, "the LoRA must move the float model for this test"

    # The LoRA clone (strength 1) is loaded again, so its patched weights sit in the shared modules.
    d = Digits()
    d.sample(d.lora(d.model, lora), "float_lora_again")
    d.sample(d.quantize(d.model, keep_float=" "), "w8_after_lora")
    d.sample(d.quantize(d.lora(d.model, lora), keep_float="  "), "lora_w8")
    later = d.run(comfy_server)

    torch.testing.assert_close(later["w8_after_lora"], first["w8_fresh"], rtol=0, atol=0)
    once = rel(later["lora_w8"], loaded["float_lora"])
    twice = rel(later["lora_w8"], loaded["float_lora_x2"])
    assert once <= W8_ERROR, f"LoRA->W8 is {once:.4f} from float+LoRA"
    assert twice > 5 * once, f"LoRA->W8 is as close to a doubled LoRA ({twice:.4f}) as to one ({once:.4f})"


@pytest.mark.parametrize("fmt", ["scaled", "metadata", "weight_dtype"])
def test_fp8_checkpoints_quantize_every_linear_layer(comfy_server, comfy_models_dir, fmt):
    """fp8 copies of the default model load with the stock UNETLoader: ComfyUI 0.8 reads both fp8 file
    layouts with its mixed-precision ops (a Linear that is no nn.Linear, a QuantizedTensor weight), and any
    host casts an fp16 file to fp8 with weight_dtype (manual-cast ops, fp8 weights). Quantize UNet converts
    every Linear and Conv2d, and W8 stays within W8 error of the fp8 model itself."""
    folder = comfy_models_dir / "diffusion_models"
    weight_dtype = "default"
    if fmt == "weight_dtype":
        name, weight_dtype = install(UNET_FILE, folder, "digits_fp16.safetensors").name, "fp8_e4m3fn"
    elif host_version() < (0, 8, 0):
        pytest.skip(f"fp8 '{fmt}' files load through MixedPrecisionOps, new in ComfyUI 0.8.0 (host {host_version()})")
    else:
        name = install(write_fp8(folder / f"digits_fp8_{fmt}.safetensors", fmt), folder).name
    d = Digits()
    unet = d.g.node("UNETLoader", unet_name=name, weight_dtype=weight_dtype)
    q = d.quantize(unet, bits="8", experts=1)
    report = d.g.node("PreviewAny", source=q.out(1))
    d.sample(unet, "fp8")
    d.sample(q.out(0), "fp8_w8")
    latents, entry = d.run_entry(comfy_server)
    text = "".join(entry["outputs"][report.id]["text"])
    state = unet_state()
    expected = len(linear_layers(state)) + len(conv2d_layers(state))
    assert re.search(rf"quantized {expected} layers", text), text
    assert "kept in float" not in text, text
    assert rel(latents["fp8_w8"], latents["fp8"]) <= W8_ERROR


SAMPLING_PATCHES = {
    "none": None,
    "discrete zsnr": ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True}),
    "SD3 shift 3": ("ModelSamplingSD3", {"shift": 3.0}),
    "Flux": ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 64, "height": 64}),
    "EDM normal": ("ModelSamplingContinuousEDM", {"sampling": "v_prediction", "sigma_max": 120.0, "sigma_min": 0.002}),
    "EDM karras": ("ModelSamplingContinuousEDM", {"sampling": "edm", "sigma_max": 80.0, "sigma_min": 0.002}),
    "ContinuousV": ("ModelSamplingContinuousV", {"sampling": "v_prediction", "sigma_max": 500.0, "sigma_min": 0.03}),
}
ROUTE_STEPS = 20
CALL = re.compile(r"^call (\d+): t=([\d., ]+) -> expert ([\d, ]+)$")


def _patched(d: Digits, patch: str):
    model = d.quantize(d.model, bits="4", experts=4, keep_float="    ").out(0)
    if SAMPLING_PATCHES[patch] is None:
        return model
    node, inputs = SAMPLING_PATCHES[patch]
    return d.g.node(node, model=model, **inputs).out(0)


def _routing(server, patch: str) -> tuple[list[list[int]], list[list[str]]]:
    """(experts, timesteps as printed) per model call of a 20-step euler run."""
    d = Digits()
    scheduler = "karras" if patch == "EDM karras" else "normal"
    sampler = d.g.node("TuneQDMExpertRoutedSampler", model=_patched(d, patch), seed=3, steps=ROUTE_STEPS, cfg=3.0,
                       sampler_name="euler", scheduler=scheduler, positive=d.pos, negative=d.neg,
                       latent_image=d.latent, denoise=1.0, routing="timestep intervals", boundaries="",
                       fixed_expert=0)
    summary = d.g.node("PreviewAny", source=sampler.out(1))
    entry = server.run(d.g.to_api(), timeout=300, check=True)
    text = "".join(entry["outputs"][summary.id]["text"])
    calls = [CALL.match(line) for line in text.splitlines()[1:]]
    assert all(calls), text
    return [[int(e) for e in m.group(3).split(",")] for m in calls], [m.group(2).split(", ") for m in calls]


def _training_report(server, patch: str) -> str:
    """Train TuneQDM Scales' report after 5 steps, or the node's error."""
    d = Digits()
    subject = d.g.node("TuneQDMDefaultSubjectImages")
    train = d.g.node("TuneQDMTrainScales", model=_patched(d, patch), vae=d.load.out(2), instance_images=subject,
                     instance_conditioning=d.pos, steps=5, lr_s_out=1e-4, lr_s_in=3e-3, train_s_in=True,
                     batch_size=2, seed=0, resolution=64, gradient_checkpointing=False)
    report = d.g.node("PreviewAny", source=train.out(3))
    entry = server.run(d.g.to_api(), timeout=300)
    error = server.execution_error(entry)
    if error is not None:
        return f"error: {error.get('exception_message')}"
    return "".join(entry["outputs"][report.id]["text"])


@pytest.fixture(scope="module")
def routing_table(comfy_server) -> dict[str, tuple[list[list[int]], list[list[str]]]]:
    table = {patch: _routing(comfy_server, patch) for patch in SAMPLING_PATCHES}
    print("\nexperts per step (euler, 20 steps, 4 experts):")
    for patch, (experts, _) in table.items():
        print(f"  {patch:>14}: {' '.join(str(e[0]) for e in experts)}")
    return table


@pytest.mark.parametrize("patch", list(SAMPLING_PATCHES))
def test_every_schedule_routes_over_all_experts_from_noisy_to_clean(routing_table, patch):
    experts, times = routing_table[patch]
    first = [e[0] for e in experts]
    assert len(experts) == ROUTE_STEPS, "one model call per step (cond and uncond batched), each listed"
    assert set(first) == {0, 1, 2, 3}, f"{patch}: experts per step {first}"
    assert first == sorted(first, reverse=True), f"{patch}: noisy steps must route to high experts: {first}"
    assert all(0.0 <= float(t) <= 999.0 for call in times for t in call)


@pytest.mark.parametrize("patch", list(SAMPLING_PATCHES))
def test_training_under_every_schedule_has_finite_losses(comfy_server, patch):
    report = _training_report(comfy_server, patch)
    assert report.startswith("complete: 5/5 steps"), report
    last = re.search(r"last loss per expert: \[(.*)\]", report).group(1)
    losses = [float(v.strip(" '")) for v in last.split(",") if v.strip(" '") != "-"]
    assert losses and all(torch.isfinite(torch.tensor(losses))), report


def test_routing_summary_lists_every_call_with_one_decimal(routing_table):
    """EDM karras: 20 distinct sigmas, some a fraction of a timestep apart, each its own line."""
    experts, times = routing_table["EDM karras"]
    assert len(experts) == ROUTE_STEPS
    assert all(len(call) == 4 for call in times), "batch 2, cond and uncond: 4 samples per call"
    assert all(re.fullmatch(r"\d+\.\d", t) for call in times for t in call)
    assert len({call[0] for call in times}) == ROUTE_STEPS
