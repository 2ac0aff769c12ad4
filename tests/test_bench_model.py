"""The benchmark's plain-torch SD 1.5 UNet and the memory benchmark's tiny path (seconds, no GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tuneqdm_core.bench import memory
from tuneqdm_core.bench.sd15_unet import count_layers, sd15_unet

REPO = Path(__file__).resolve().parents[1]


def test_sd15_unet_matches_comfyui_parameter_count_on_meta():
    with torch.device("meta"):
        model = sd15_unet()
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    assert count_layers(model) == 282
    assert all(p.is_meta for p in model.parameters())
    # ComfyUI's module names, so layer-name patterns carry over.
    names = dict(model.named_modules())
    for name in ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "middle_block.1.proj_in",
                 "output_blocks.11.0.skip_connection", "time_embed.2", "out.2"):
        assert name in names


def test_tiny_unet_forward_backward_with_and_without_checkpointing():
    torch.manual_seed(0)
    model = sd15_unet(tiny=True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 900.0]), torch.randn(2, 77, model.context_dim)
    grads = []
    for ckpt in (False, True):
        model.checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        y = model(x, t, ctx)
        assert y.shape == x.shape
        y.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_memory_one_tiny_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "tuneqdm_core.bench", "memory", "--one", "w4", "--latent", "8",
                          "--tiny", "--checkpointing"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith(memory.RESULT_TAG))
    r = json.loads(line[len(memory.RESULT_TAG):])
    assert (r["variant"], r["latent"], r["checkpointing"], r["status"]) == ("w4", 8, True, "ok")
    assert r["peak_rss"] >= r["baseline_rss"] > 0 and r["peak_above_baseline"] > 0
    assert r["quantized_layers"] == count_layers(sd15_unet(tiny=True)) and r["bits"] == 4
    assert 0 < r["trainable_params"] < r["params"]
    assert r["attention"] == "torch scaled_dot_product_attention"


def test_every_variant_runs_tiny_in_process():
    for variant in ("fp32-full", "reference", "w8"):  # w4: in a subprocess above
        r = memory.run_one(variant, 8, checkpointing=variant in ("reference", "w8"), tiny=True)
        assert r["status"] == "ok" and r["step_s"] > 0, variant
        if variant == "fp32-full":
            assert r["trainable_params"] == r["params"]
        else:
            assert r["trainable_params"] < r["params"] and r["quantized_layers"] == 121


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
