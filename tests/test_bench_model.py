"""The benchmarks' SD 1.5 UNet (ComfyUI's own, through the checkout's host) and the memory benchmark's tiny
path (seconds, no GPU)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import torch

from tuneqdm_bench import memory
from tuneqdm_bench.comfy_unet import TINY_UNET_CONFIG, count_layers, run, sd15_unet
from tuneqdm_core.checkpointing import checkpointed
from tuneqdm_fixtures.host import import_comfy
from tuneqdm_fixtures.paths import checkout, subprocess_env

REPO = checkout()


def test_sd15_unet_is_comfyuis_own_with_the_sd15_parameter_count_on_meta():
    model = sd15_unet(device="meta")
    assert type(model) is import_comfy().ldm.modules.diffusionmodules.openaimodel.UNetModel
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    assert count_layers(model) == 282
    assert all(p.is_meta for p in model.parameters())
    names = dict(model.named_modules())
    for name in ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "middle_block.1.proj_in",
                 "output_blocks.11.0.skip_connection", "time_embed.2", "out.2"):
        assert name in names


def test_sd15_unet_off_meta_gets_torchs_default_init():
    model = sd15_unet(tiny=True)
    # ComfyUI's operations leave the storage uninitialised; torch's init bounds a Linear by 1/sqrt(fan_in).
    layer = model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    assert 0 < layer.weight.abs().max() <= layer.in_features ** -0.5
    norm = model.get_submodule("out.0")
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_the_benchmark_forward_uses_pytorch_attention(monkeypatch):
    attention = import_comfy().ldm.modules.attention
    calls = []
    original = attention.attention_pytorch
    monkeypatch.setattr(attention, "attention_pytorch", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = sd15_unet(tiny=True)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([3.0])
    ctx = torch.randn(1, 77, TINY_UNET_CONFIG["context_dim"])
    with torch.no_grad():
        run(model, x, t, ctx)
    attentions = [m for m in model.modules() if type(m) is attention.CrossAttention]
    assert len(attentions) == 2 * 6  # self- and cross-attention of 2 input, 1 middle and 3 output transformers
    assert len(calls) == len(attentions)


def test_core_checkpointing_recomputes_every_block_of_comfyuis_unet(monkeypatch):
    """ComfyUI runs the input, middle and output blocks layer by layer (forward_timestep_embed), never through
    the blocks' own forward: the core's checkpointing must still reach each of their layers."""
    torch.manual_seed(0)
    model = sd15_unet(tiny=True)
    resblock = import_comfy().ldm.modules.diffusionmodules.openaimodel.ResBlock
    calls = []
    original = resblock._forward
    monkeypatch.setattr(resblock, "_forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 900.0])
    ctx = torch.randn(2, 77, TINY_UNET_CONFIG["context_dim"])
    grads, runs = [], []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        calls.clear()
        with checkpointed(model, ckpt):
            y = run(model, x, t, ctx)
            assert y.shape == x.shape
            y.square().mean().backward()
        runs.append(len(calls))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    resblocks = sum(isinstance(m, resblock) for m in model.modules())
    assert resblocks > 0 and runs == [resblocks, 2 * resblocks]  # checkpointed, every ResBlock runs again in backward
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored on exit
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_memory_one_tiny_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "tuneqdm_bench", "memory", "--one", "w4", "--latent", "8",
                          "--tiny", "--checkpointing"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith(memory.RESULT_TAG))
    r = json.loads(line[len(memory.RESULT_TAG):])
    assert (r["variant"], r["latent"], r["checkpointing"], r["status"]) == ("w4", 8, True, "ok")
    assert math.isfinite(r["loss"])
    assert r["peak_rss"] >= r["baseline_rss"] > 0 and r["peak_above_baseline"] > 0
    assert r["quantized_layers"] == count_layers(sd15_unet(tiny=True, device="meta")) and r["bits"] == 4
    assert 0 < r["trainable_params"] < r["params"]
    assert r["attention"] == "torch scaled_dot_product_attention"


def test_every_variant_runs_tiny_in_process():
    for variant in ("fp32-full", "reference", "w8"):  # w4: in a subprocess above
        r = memory.run_one(variant, 8, checkpointing=variant in ("reference", "w8"), tiny=True)
        assert r["status"] == "ok" and r["step_s"] > 0 and math.isfinite(r["loss"]), variant
        if variant == "fp32-full":
            assert r["trainable_params"] == r["params"]
        else:
            assert r["trainable_params"] < r["params"]
            assert r["quantized_layers"] == count_layers(sd15_unet(tiny=True, device="meta"))


def test_reference_layer_rebuilds_the_weight_of_the_routed_expert():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    router = memory.RefRouter(4)
    ref = memory.RefQuantLinear(lin, 8, router)
    assert ref.Q.dtype == torch.uint8 and ref.Q.shape == (8, 16) and ref.s_out.shape == (4, 8)
    with torch.no_grad():
        ref.s_in[2].fill_(2.0)
    x = torch.randn(3, 16)
    with router.route(torch.tensor([600, 10, 999])):  # the batch's expert comes from t[0] only
        assert router.expert == 2
        y = ref(x)
    assert torch.allclose(y, lin(2 * x), atol=0.05 * y.abs().max().item())
    y.sum().backward()
    assert ref.s_out.grad[[0, 1, 3]].abs().sum() == 0 and ref.s_out.grad[2].abs().sum() > 0


def test_targets_are_computed_from_rows():
    def row(variant, ckpt, peak):
        return {"variant": variant, "checkpointing": ckpt, "latent": 32, "status": "ok",
                "peak_rss": peak + 100, "peak_above_baseline": peak}
    rows = [row("w4", True, 5), row("fp32-full", True, 100), row("w4", False, 30), row("reference", False, 100)]
    got = {(e["target"], e["measure"]): (e["ratio"], e["met"]) for e in memory.targets(rows, 32)}
    first, second = (t[0] for t in memory.TARGETS)
    assert got[(first, "peak_above_baseline")] == (0.05, True)
    assert got[(second, "peak_above_baseline")] == (0.3, False)
    assert got[(first, "peak_rss")] == (105 / 200, False)
    missing = memory.targets(rows[:1], 32)
    assert all(e["ratio"] is None and e["met"] is None for e in missing)


def test_saved_runs_merge_with_successful_rows_winning(tmp_path):
    first = {"results": [{"latent": 32, "variant": "w4", "checkpointing": True, "status": "failed"},
                         {"latent": 32, "variant": "fp32-full", "checkpointing": True, "status": "ok", "peak_rss": 1}]}
    second = {"results": [{"latent": 32, "variant": "w4", "checkpointing": True, "status": "ok", "peak_rss": 2}]}
    paths = []
    for i, saved in enumerate((first, second)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(saved))
    rows, versions = memory.merge_saved([str(p) for p in paths])
    assert [(r["variant"], r["status"]) for r in rows] == [("fp32-full", "ok"), ("w4", "ok")]
    assert len(versions) == 2
