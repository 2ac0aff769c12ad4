"""How faithful the quantized model is to the float one, side by side with ComfyUI-GGUF (issue 17).

    python -m tuneqdm_bench fidelity [--json] [--skip-server] [--skip-real] [--only TEXT]

Two parts, one run:

1. Full-size SD1.5 UNet (random weights, the fp16 file of the tests) in ComfyUI 0.8.0 (the `.comfyui`
   host), each row a graph in its own fresh server: load -> KSampler 512x512 (64x64 latent), euler, 4
   steps, cfg 7, seed 0, "a photo" with the tiny test checkpoint's CLIP -> SaveLatent. Relative L2
   distance of each final latent to the fp32 row's, file bytes, prompt seconds (load + sampling) and
   the server's peak RSS (VmHWM). ComfyUI-GGUF (city96, commit 795e451) is unpacked from
   `../shared/hosts/comfyui-gguf-795e451.tar.gz` into the benchmark's own server's custom_nodes (never
   the host's); its Q8_0 / Q4_0 files are written here with the `gguf` package's own quantizers
   (`gguf.quants.quantize`), laid out as its `tools/convert.py` lays out an SD1 file (tensors of 1-D or
   at most 1024 values stay F16; others whose last dimension 256 does not divide are viewed as rows of
   256 with their original shape recorded). The pack's rows are quantized-model files made by Load
   and Quantize Diffusion Model -> Save Quantized UNet (1 expert) and loaded by Load Quantized UNet.
2. Real trained weights, in this process: the embedded default UNet (its output on real latents noised
   to four timesteps with real MiniLM contexts, and 20-step DDIM samples) and the MiniLM text encoder's
   Linear layers (token states of the digit prompts), each quantized by every setting; GGUF's formats
   there are its quantize -> dequantize round trip of the same weights (what its layers compute with).

Targets: the default W4 at most 0.9x Q4_0's latent distance and at most 0.30x the fp16 file's bytes;
the default W8 at most Q8_0's distance.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tuneqdm_fixtures.paths import checkout

GGUF_TARBALL = checkout().parent / "shared" / "hosts" / "comfyui-gguf-795e451.tar.gz"
GGUF_FOLDER = "ComfyUI-GGUF"
UNET = "sd15_full_fp16.safetensors"
CKPT = "tiny_sd15.safetensors"


@dataclass(frozen=True)
class Setting:
    name: str
    bits: int = 4
    group_size: int = 0  # 0: per output channel
    minimize: bool = True
    gguf: str = ""  # "Q8_0" / "Q4_0": a GGUF row instead of the pack's
    scope: str = "converter"  # real weights: "converter" = what ComfyUI-GGUF's converter quantizes (tensors of at
    # most 1024 values, and those it cannot block, stay F16; the pack's rows then keep the same layers in float),
    # "all" = every Linear/Conv2d (GGUF rows: rows padded to whole blocks of 32); the ComfyUI part ignores it


DEFAULT_W4 = "TuneQDM W4 g16 (default)"
DEFAULT_W8 = "TuneQDM W8 g32 (default)"
SETTINGS = [
    Setting("GGUF Q8_0", gguf="Q8_0"),
    Setting("GGUF Q4_0", gguf="Q4_0"),
    Setting("GGUF Q4_0, every layer", gguf="Q4_0", scope="all"),
    Setting("TuneQDM W4 g16 (default), every layer", 4, 16, scope="all"),
    Setting("TuneQDM W8 per-channel", 8, 0),
    Setting(DEFAULT_W8, 8, 32),
    Setting("TuneQDM W8 g64", 8, 64),
    Setting("TuneQDM W4 per-channel", 4, 0),
    Setting(DEFAULT_W4, 4, 16),
    Setting("TuneQDM W4 g16, round-to-nearest (no minimization)", 4, 16, minimize=False),
    Setting("TuneQDM W4 g32", 4, 32),
    Setting("TuneQDM W4 g64", 4, 64),
]


# ---------------------------------------------------------------- GGUF's formats

def gguf_keeps_f16(w: torch.Tensor) -> bool:
    """Whether ComfyUI-GGUF's converter leaves this weight in F16 (1-D, at most 1024 values, or rows it cannot
    cut into blocks of 32 even after its rows-of-256 view)."""
    n = w.numel()
    last = 256 if (w.ndim > 1 and n >= 512 and n % 256 == 0 and w.shape[-1] % 256) else w.shape[-1]
    return w.ndim < 2 or n <= 1024 or last % 32 != 0


def gguf_roundtrip(w: torch.Tensor, qtype: str, every_layer: bool = False) -> torch.Tensor:
    """The weight as ComfyUI-GGUF computes with it: quantized by the gguf package, dequantized back.
    `every_layer`: also the weights its converter keeps in F16, each output channel padded to whole blocks."""
    import gguf
    t = getattr(gguf.GGMLQuantizationType, qtype)
    if every_layer:
        flat = w.detach().float().reshape(w.shape[0], -1)
        pad = (-flat.shape[1]) % 32
        data = torch.nn.functional.pad(flat, (0, pad)).numpy()
        back = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(data, t), t)))
        return back[:, :flat.shape[1]].reshape(w.shape).to(w.dtype)
    if gguf_keeps_f16(w):
        return w.detach().half().to(w.dtype)
    data = w.detach().float().cpu().numpy()
    n = data.size
    if data.ndim > 1 and n >= 512 and n % 256 == 0 and data.shape[-1] % 256:
        data = data.reshape(n // 256, 256)
    back = gguf.quants.dequantize(gguf.quants.quantize(data, t), t)
    return torch.from_numpy(np.ascontiguousarray(back)).reshape(w.shape).to(w.dtype)


def write_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """An SD1 GGUF file of `qtype` from a safetensors UNet, one tensor at a time (see the module docstring)."""
    import gguf
    from safetensors import safe_open
    t = getattr(gguf.GGMLQuantizationType, qtype)
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="sd1")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    with safe_open(str(src), framework="pt") as f:
        for key in f.keys():
            data = f.get_tensor(key).to(torch.float16).numpy()
            n = data.size
            qt = gguf.GGMLQuantizationType.F16
            if data.ndim > 1 and n > 1024:
                if n >= 512 and n % 256 == 0 and data.shape[-1] % 256:
                    writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(d) for d in data.shape])
                    data = data.reshape(n // 256, 256)
                if data.shape[-1] % 32 == 0:
                    qt = t
            writer.add_tensor(key, gguf.quants.quantize(data, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


def gguf_pack(cache: Path) -> Path:
    """ComfyUI-GGUF unpacked once into the asset cache; linked into the benchmark's servers only."""
    target = cache / "ComfyUI-GGUF-795e451"
    if not (target / GGUF_FOLDER / "__init__.py").is_file():
        if not GGUF_TARBALL.is_file():
            raise FileNotFoundError(f"{GGUF_TARBALL} missing (see ../shared/hosts/README.md)")
        with tarfile.open(GGUF_TARBALL) as tar:
            tar.extractall(target, filter="data")
    return target / GGUF_FOLDER


# ---------------------------------------------------------------- part 1: ComfyUI, full-size SD1.5

def chosen(args: argparse.Namespace, name: str) -> bool:
    """--only: comma-separated texts; a row runs when its name contains one of them (all rows without)."""
    texts = [t.strip() for t in args.only.split(",") if t.strip()]
    return not texts or any(t in name for t in texts)


def _quant_inputs(s: Setting) -> dict:
    return dict(bits=str(s.bits), experts=1, scales="s_out and s_in (TuneQDM)", s_in_init="ones", keep_float="",
                group_size=str(s.group_size) if s.group_size else "per-channel")


def server_part(args: argparse.Namespace) -> list[dict]:
    from safetensors.torch import load_file

    from tuneqdm_fixtures.checkpoints import cached_sd15_unet, write_tiny_sd15_checkpoint
    from tuneqdm_fixtures.graph import Graph
    from tuneqdm_fixtures.paths import asset_cache_dir
    from tuneqdm_fixtures.server import PACK_FOLDER, ComfyServer

    cache = asset_cache_dir()
    unet = cached_sd15_unet(full_size=True)
    ckpt = write_tiny_sd15_checkpoint(cache / CKPT)
    nodes = {PACK_FOLDER: checkout(), GGUF_FOLDER: gguf_pack(cache)}
    gguf_files = {}
    for q in ("Q8_0", "Q4_0"):
        path = cache / f"sd15_full_{q}.gguf"
        if not path.is_file() or path.stat().st_mtime < unet.path.stat().st_mtime:
            start = time.perf_counter()
            write_gguf(unet.path, path, q)
            print(f"[fidelity] wrote {path.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        gguf_files[q] = path

    def server(env=None) -> "ComfyServer":
        s = ComfyServer(custom_nodes=nodes, env=env or {}).start()
        for folder, src, name in (("diffusion_models", unet.path, UNET), ("checkpoints", ckpt.path, CKPT)):
            (s.models_dir / folder).mkdir(parents=True, exist_ok=True)
            (s.models_dir / folder / name).symlink_to(src)
        for q, path in gguf_files.items():
            (s.models_dir / "diffusion_models" / path.name).symlink_to(path)
        return s

    ours = [s for s in SETTINGS if not s.gguf and s.scope != "all" and chosen(args, s.name)]
    made: dict[str, tuple[Path, float]] = {}
    out = cache / "fidelity"
    out.mkdir(exist_ok=True)

    def file_of(st: Setting) -> Path:
        return out / f"{st.name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}.safetensors"

    if args.reuse:  # files a previous run made (their quantization time is not known then)
        made.update({st.name: (file_of(st), float("nan")) for st in ours if file_of(st).is_file()})
    to_make = [st for st in ours if st.name not in made]
    if to_make:  # every quantized-model file made in one server: Load and Quantize -> Save Quantized UNet
        s = server()
        try:
            for st in to_make:
                g = Graph()
                m = g.node("TuneQDMLoadQuantizeDiffusionModel", unet_name=UNET, weight_dtype="default", **_quant_inputs(st))
                g.node("TuneQDMSaveQuantizedUNet", model=m.out(0), filename_prefix="fidelity", overwrite=True)
                g.node("PreviewAny", source=m.out(1))
                entry = s.run(g.to_api(), timeout=1800, check=True)
                report = " ".join(t for o in entry.get("outputs", {}).values() for t in o.get("text", []))
                secs = re.search(r"quantized \d+ layers in ([\d.]+) s", report)
                src = s.models_dir / "tuneqdm" / "unet" / "fidelity.safetensors"
                dst = file_of(st)
                src.replace(dst)
                made[st.name] = (dst, float(secs.group(1)) if secs else float("nan"))
                print(f"[fidelity] {st.name}: quantized in {made[st.name][1]:.1f} s, {dst.stat().st_size:,} B",
                      file=sys.stderr, flush=True)
        finally:
            s.stop()

    rows = [("UNETLoader fp32", "unet", "default", None), ("UNETLoader weight dtype fp8_e4m3fn", "unet", "fp8_e4m3fn", None)]
    rows += [(s.name, "gguf", s.gguf, None) for s in SETTINGS if s.gguf and s.scope != "all"]
    rows += [(s.name, "file", s.name, None) for s in ours]
    if DEFAULT_W4 in made:
        rows.append((f"{DEFAULT_W4}, TUNEQDM_CPU_BF16=auto", "file", DEFAULT_W4, {"TUNEQDM_CPU_BF16": "auto"}))
    rows = [r for r in rows if r[0] == "UNETLoader fp32" or chosen(args, r[0])]
    results = []
    if args.reference is not None:  # the fp32 latent of an earlier run of the same graph
        rows = [r for r in rows if r[0] != "UNETLoader fp32"]
        results.append({"row": "UNETLoader fp32", "file_bytes": unet.path.stat().st_size, "seconds": None,
                        "peak_rss": None, "latent": load_file(str(args.reference))["latent_tensor"].float(),
                        "quantize_s": None})
    for name, kind, what, env in rows:
        s = server(env)
        try:
            if kind == "file":
                (s.models_dir / "tuneqdm" / "unet").mkdir(parents=True, exist_ok=True)
                (s.models_dir / "tuneqdm" / "unet" / "q.safetensors").symlink_to(made[what][0])
            g = Graph()
            c = g.node("CheckpointLoaderSimple", ckpt_name=CKPT)
            if kind == "unet":
                model = g.node("UNETLoader", unet_name=UNET, weight_dtype=what).out(0)
                size = unet.path.stat().st_size
            elif kind == "gguf":
                model = g.node("UnetLoaderGGUF", unet_name=gguf_files[what].name).out(0)
                size = gguf_files[what].stat().st_size
            else:
                model = g.node("TuneQDMLoadQuantizedUNet", unet_name="q.safetensors").out(0)
                size = made[what][0].stat().st_size
            pos = g.node("CLIPTextEncode", text="a photo", clip=c.out(1))
            neg = g.node("CLIPTextEncode", text="", clip=c.out(1))
            latent = g.node("EmptyLatentImage", width=512, height=512, batch_size=1)
            k = g.node("KSampler", model=model, positive=pos.out(0), negative=neg.out(0), latent_image=latent.out(0),
                       seed=args.seed, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
            g.node("SaveLatent", samples=k.out(0), filename_prefix="fidelity")
            start = time.perf_counter()
            s.run(g.to_api(), timeout=3600, check=True)
            wall = time.perf_counter() - start
            files = sorted(s.output_dir.rglob("fidelity*.latent"))
            lat = load_file(str(files[-1]))["latent_tensor"].float()
            keep = out / f"latent_{len(results)}.latent"
            keep.write_bytes(files[-1].read_bytes())  # kept: a later run can use the fp32 one as --reference
            results.append({"row": name, "file_bytes": size, "seconds": wall, "peak_rss": s.peak_rss(),
                            "latent": lat, "quantize_s": made[what][1] if kind == "file" else None})
        finally:
            s.stop()
        r = results[-1]
        dist = float((r["latent"] - results[0]["latent"]).norm() / results[0]["latent"].norm())
        print(f"[fidelity] {name}: {r['file_bytes']:,} B, {wall:.1f} s, peak {r['peak_rss'] / 1e9:.2f} GB, "
              f"latent distance {dist:.4f}", file=sys.stderr, flush=True)
    ref = results[0]["latent"]
    for r in results:
        r["latent_distance"] = float((r.pop("latent") - ref).norm() / ref.norm())
    return results


# ---------------------------------------------------------------- part 2: real trained weights

def _quantized_copy(module: nn.Module, s: Setting) -> nn.Module:
    from tuneqdm_core.config import TuneQDMConfig
    from tuneqdm_core.model import quantize_model
    m = copy.deepcopy(module)
    if s.gguf:
        with torch.no_grad():
            for layer in m.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    layer.weight.copy_(gguf_roundtrip(layer.weight, s.gguf, s.scope == "all"))
    else:
        keep = () if s.scope == "all" else tuple(
            n for n, layer in m.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d)) and gguf_keeps_f16(layer.weight))
        quantize_model(m, TuneQDMConfig(bits=s.bits, experts=1, group_size=s.group_size, minimize_error=s.minimize,
                                        keep_float=keep))
    return m.eval()


def _bits_per_weight(module: nn.Module, s: Setting) -> float:
    if s.gguf:
        return {"Q8_0": 8.5, "Q4_0": 4.5}[s.gguf]
    from tuneqdm_core.model import quantized_layers
    total = weights = 0
    for _, layer in quantized_layers(module):
        n = 1
        for d in layer.weight_shape:
            n *= d
        weights += n
        held = (layer.qweight, layer.zero, layer.base_scale, layer.group_scale)
        total += sum(t.numel() * t.element_size() for t in held if t is not None) * 8
    return total / weights


def real_part(args: argparse.Namespace) -> dict:
    from tuneqdm_demo import data
    from tuneqdm_demo.diffusion import ddim_sample
    from tuneqdm_demo.files import MODEL_TYPE, UNET_FILE, UNET_FORMAT, load_file
    from tuneqdm_demo.model import alphas_cumprod, default_base_model
    from tuneqdm_demo.text import TextEncoder
    from tuneqdm_fixtures.host import import_comfy

    import_comfy()
    torch.manual_seed(0)
    state, _ = load_file(UNET_FILE, UNET_FORMAT)
    base = default_base_model(state)
    net = base.diffusion_model.eval().requires_grad_(False)
    alphas = alphas_cumprod(base)
    encoder = TextEncoder()
    digits = data.load_digits()
    idx = torch.arange(0, len(digits.images), max(1, len(digits.images) // 40))[:40]
    x0 = data.grey_to_latent(digits.images[idx].float()) * data.LATENT_SCALE
    prompts = [data.caption(int(d)) for d in digits.labels[idx]]
    ctx = torch.cat([encoder.encode(p)[0] for p in prompts])
    t = torch.tensor([100, 400, 700, 950]).repeat_interleave((len(idx) + 3) // 4)[:len(idx)]
    gen = torch.Generator().manual_seed(0)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
    uncond = encoder.encode("")[0]
    v = MODEL_TYPE == "V_PREDICTION"

    def unet_out(m):
        with torch.no_grad():
            return m(xt, t.float(), context=ctx)

    def samples(m):
        return ddim_sample(m, alphas, torch.cat([encoder.encode(data.caption(d))[0] for d in range(1, 9)]), uncond, 8,
                           tuple(x0.shape[1:]), 20, 3.0, torch.Generator().manual_seed(1), v)

    ref_out, ref_samples = unet_out(net), samples(net)
    text_prompts = [data.caption(d) for d in range(10)] + ["a sks digit", "", "a photo of a dog", "handwritten digits"]
    tok = encoder.tokenizer(text_prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=16)
    text_model = encoder.model
    with torch.no_grad():
        ref_text = text_model(**tok).last_hidden_state
    rows = []
    for s in SETTINGS:
        if not chosen(args, s.name):
            continue
        q = _quantized_copy(net, s)
        out = unet_out(q)
        smp = samples(q)
        qt = _quantized_copy(text_model, s)
        with torch.no_grad():
            txt = qt(**tok).last_hidden_state
        rows.append({"row": s.name, "unet_bits_per_weight": _bits_per_weight(q, s),
                     "unet_output_error": float((out - ref_out).norm() / ref_out.norm()),
                     "ddim_sample_distance": float((smp - ref_samples).norm() / ref_samples.norm()),
                     "minilm_token_state_error": float((txt - ref_text).norm() / ref_text.norm())})
        print(f"[fidelity] real weights {s.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()
                                                                   if k != "row"), file=sys.stderr, flush=True)
    return {"rows": rows}


# ---------------------------------------------------------------- report

def targets(server_rows: list[dict]) -> list[str]:
    by = {r["row"]: r for r in server_rows}
    lines = []
    w4, w8 = by.get(DEFAULT_W4), by.get(DEFAULT_W8)
    q4, q8, fp = by.get("GGUF Q4_0"), by.get("GGUF Q8_0"), by.get("UNETLoader fp32")
    if w4 and q4:
        r = w4["latent_distance"] / q4["latent_distance"]
        lines.append(f"target: default W4 latent distance / Q4_0's = {r:.2f} (at most 0.9): {'MET' if r <= 0.9 else 'MISSED'}")
    if w4 and fp:
        r = w4["file_bytes"] / fp["file_bytes"]
        lines.append(f"target: default W4 file / fp16 file = {r:.3f} (at most 0.30): {'MET' if r <= 0.30 else 'MISSED'}")
    if w8 and q8:
        r = w8["latent_distance"] / q8["latent_distance"]
        lines.append(f"target: default W8 latent distance / Q8_0's = {r:.2f} (at most 1.0): {'MET' if r <= 1.0 else 'MISSED'}")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default="", help="comma-separated texts: run only the rows whose name contains one "
                                             "(the fp32 reference always runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-server", action="store_true", help="only the real-weights part (in this process)")
    p.add_argument("--skip-real", action="store_true", help="only the ComfyUI part")
    p.add_argument("--reuse", action="store_true", help="use the quantized-model files a previous run left in the cache")
    p.add_argument("--reference", type=Path, default=None, help="the fp32 row's latent from an earlier run (skips that row)")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    result: dict = {}
    if not args.skip_real:
        result["real_weights"] = real_part(args)
    if not args.skip_server:
        result["comfyui_sd15"] = server_part(args)
        result["targets"] = targets(result["comfyui_sd15"])
    if "comfyui_sd15" in result:
        print("\n| loader | file | latent distance to fp32 | seconds / image (load + sample) | server peak RSS |")
        print("|---|---|---|---|---|")
        for r in result["comfyui_sd15"]:
            secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else "(earlier run)"
            peak = f"{r['peak_rss'] / 1e9:.2f} GB" if r["peak_rss"] is not None else "(earlier run)"
            print(f"| {r['row']} | {r['file_bytes'] / 1e6:.0f} MB | {r['latent_distance']:.3f} | {secs} | {peak} |")
        for line in result["targets"]:
            print(line)
    if "real_weights" in result:
        print("\n| setting | bits / weight | default UNet output error | default UNet DDIM sample distance | "
              "MiniLM token-state error |\n|---|---|---|---|---|")
        for r in result["real_weights"]["rows"]:
            print(f"| {r['row']} | {r['unet_bits_per_weight']:.2f} | {r['unet_output_error']:.4f} | "
                  f"{r['ddim_sample_distance']:.4f} | {r['minilm_token_state_error']:.4f} |")
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return 0
