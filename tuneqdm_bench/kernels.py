"""Speed of the quantized layers: the fused separable Linear per SD 1.5 layer shape and token count,
and one sampling step of the whole SD 1.5 UNet, float vs W8 vs W4.

    python -m tuneqdm_bench kernels [--device auto|cpu|cuda] [--tokens 1 16 ...] [--skip-linear]
                                    [--skip-unet] [--batch 2] [--latent 64] [--rounds N] [--json]

Runs on whatever device is there and says which. On CUDA the fused Linear is the Triton kernel
(packed codes unpacked in registers); it is timed against (a) dequantize-then-matmul in torch (the
float weight diag(s_out) A diag(s_in) built, then F.linear) and (b) a plain float16 matmul with a
float weight. On CPU the Triton kernels run only through the interpreter, far too slow to time, so
the "fused" columns are the torch path the dispatcher picks on CPU: `fused_wB` with the default
fp32 products, `fused_wB_bf16` with the opt-in bf16 compute (TUNEQDM_CPU_BF16=auto, see
tuneqdm_core/functional.py), against (a) dequantize-then-matmul in fp32 and (b) float32 and
bfloat16 matmuls. Each fused column has its error against a float64 computation of the same
quantized layer.

The UNet part builds ComfyUI's SD 1.5 UNet (random weights: only seconds and bytes mean
anything) and times one forward under inference_mode (a sampling step: batch 2, 64x64 latent,
77x768 context, the two samples routed to different experts), all variants interleaved round by
round: the float model (float16 on CUDA, float32 on CPU) and the W8 and W4 models (4 experts). On
CPU the quantized models run with the opt-in bf16 compute and with the default fp32 compute, and
for context a bfloat16 float model and W8/W4 models with bf16 activations are timed too. It
reports the error of the bf16 compute against the same model in fp32 compute, and the CPU target:
W8 and W4 steps no slower than the float32 step.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from tuneqdm_core import functional
from tuneqdm_core.config import TuneQDMConfig
from tuneqdm_core.functional import PackedWeight
from tuneqdm_core.model import get_router, quantize_model, structural_copy, tensor_bytes
from tuneqdm_core.quant import integer_weight, quantize_weight

from .comfy_unet import ATTENTION, run, sd15_unet

TOKENS = (1, 16, 256, 1024, 4096)
CONTEXT = 768
EXPERTS = 4


def sd15_linear_shapes() -> list[tuple[str, int, int]]:
    """(label, in_features K, out_features N) of the SD 1.5 UNet's Linear layers, per width."""
    shapes = []
    for c in (320, 640, 1280):
        shapes += [(f"attn q/k/v/out {c}", c, c), (f"cross k/v {CONTEXT}->{c}", CONTEXT, c),
                   (f"ff geglu {c}->{8 * c}", c, 8 * c), (f"ff out {4 * c}->{c}", 4 * c, c)]
    return shapes


# ---------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, min_time: float, max_runs: int = 200,
              min_runs: int = 3) -> float:
    """Median seconds of one call: one warm-up, then runs until `min_time` has passed (at least
    `min_runs`, at most `max_runs`); a call slower than min_time / 2 gets two timed runs only."""
    fn()
    sync(device)
    times: list[float] = []
    total = 0.0
    while len(times) < max_runs:
        start = time.perf_counter()
        fn()
        sync(device)
        t = time.perf_counter() - start
        times.append(t)
        total += t
        if t > min_time / 2 and len(times) >= 2:
            break
        if total >= min_time and len(times) >= min_runs:
            break
    return statistics.median(times)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------- the Linear table

def linear_rows(device: torch.device, tokens: list[int], min_time: float) -> list[dict]:
    cuda = device.type == "cuda"
    act = torch.float16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, k, n in sd15_linear_shapes():
        w = torch.randn(n, k, generator=g) * k**-0.5
        s_in = (1 + 0.05 * torch.randn(1, k, generator=g)).to(device)
        bias = (0.1 * torch.randn(n, generator=g)).to(device)
        floats = {act: w.to(device, act)}
        if not cuda:
            floats[torch.bfloat16] = w.to(device, torch.bfloat16)
        quant = {}
        for bits in (8, 4):
            qw = quantize_weight(w, bits)
            pw = PackedWeight(qw.packed.to(device), qw.zero.to(device), bits, qw.shape)
            quant[bits] = (pw, qw.scale[None].to(device))
        for t in tokens:
            x = torch.randn(1, t, k, generator=g).to(device, act)
            ex = torch.zeros(1, dtype=torch.long, device=device)
            row = {"layer": label, "K": k, "N": n, "tokens": t}
            with torch.inference_mode():
                for bits, (pw, s_out) in quant.items():
                    exact = (x.double() * s_in.double()) @ integer_weight(pw.packed, pw.zero, bits, pw.shape,
                                                                          torch.float64).T
                    exact = exact * s_out.double() + bias.double()
                    # On CPU: the default (fp32 products) and the opt-in bf16 compute.
                    for tag, mode in (("", None),) + ((("_bf16", "auto"),) if not cuda else ()):
                        def fused(pw=pw, s_out=s_out, mode=mode):
                            with functional.cpu_inference_bf16(mode or functional.cpu_bf16_mode()):
                                return functional.separable_linear(x, s_in, s_out, bias, ex, pw)

                        row[f"fused_w{bits}{tag}_ms"] = 1e3 * time_call(fused, device, min_time)
                        row[f"fused_w{bits}{tag}_err"] = rel_error(fused(), exact)

                    def deq_mm(pw=pw, s_out=s_out):
                        wf = pw.integers(act).mul_(s_out[0, :, None].to(act)).mul_(s_in[0].to(act))
                        return F.linear(x, wf, bias.to(act))

                    row[f"deq_mm_w{bits}_ms"] = 1e3 * time_call(deq_mm, device, min_time)
                for dtype, wf in floats.items():
                    name = str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")
                    row[f"{name}_mm_ms"] = 1e3 * time_call(lambda wf=wf: F.linear(x.to(wf.dtype), wf,
                                                                                   bias.to(wf.dtype)),
                                                           device, min_time)
            rows.append(row)
            print(f"[kernels] {label:>24} tokens {t:>5}: " + ", ".join(
                f"{key} {val:.3g}" for key, val in row.items() if key.endswith(("_ms", "_err"))), flush=True)
    return rows


def format_linear(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k.endswith(("_ms", "_err"))]
    head = ["layer", "K", "N", "tokens"] + keys
    lines = [head] + [[r["layer"], str(r["K"]), str(r["N"]), str(r["tokens"])]
                      + [f"{r[k]:.3f}" if k.endswith("_ms") else f"{r[k]:.1e}" for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


# ---------------------------------------------------------------- the UNet step

def unet_rows(device: torch.device, batch: int, latent: int, rounds: int) -> list[dict]:
    """Build the float model and its W8 and W4 copies, then time them in interleaved rounds (one step
    of each model per round), so that load from other processes hits all of them alike."""
    cuda = device.type == "cuda"
    act = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    start = time.perf_counter()
    model = sd15_unet().eval()
    model.to(device, act)
    print(f"[kernels] built the SD 1.5 UNet ({sum(p.numel() for p in model.parameters()):,} parameters) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device, act)
    t = torch.linspace(100, 900, batch).round().to(device)  # samples on different experts
    context = torch.randn(batch, 77, CONTEXT, generator=g).to(device, act)

    # name -> (step function, row); every step runs under inference_mode (a sampling step).
    variants: dict[str, tuple[Callable[[], torch.Tensor], dict]] = {}
    float_name = "float16" if cuda else "float32"
    variants[float_name] = (lambda: run(model, x, t, context), {"bytes": tensor_bytes(model)})

    def quantized(base, bits: int, xin, cin, tag: str, bf16: str | None = None) -> None:
        q = structural_copy(base)  # shares the norms with the float model, which stays intact
        start = time.perf_counter()
        quantize_model(q, TuneQDMConfig(bits=bits, experts=EXPERTS))
        row = {"bytes": tensor_bytes(q), "quantize_s": time.perf_counter() - start}

        def run(q=q, mode=bf16):
            with get_router(q).route(t), functional.cpu_inference_bf16(mode or functional.cpu_bf16_mode()):
                return run(q, xin, t, cin)

        variants[f"W{bits}{tag}"] = (run, row)
        if bf16:  # the same model with the default, every product in fp32
            variants[f"W{bits} fp32 compute"] = (lambda run=run: run(mode="off"), dict(row))

    for bits in (8, 4):
        # On CPU: the opt-in bf16 compute for large layers (TUNEQDM_CPU_BF16=auto) and the default.
        quantized(model, bits, x, context, "" if cuda else " bf16 compute", None if cuda else "auto")
    if not cuda:  # for context: the float model in bf16, and quantized models with bf16 activations
        mb = copy.deepcopy(model).to(torch.bfloat16)
        xb, cb = x.bfloat16(), context.bfloat16()
        variants["bfloat16"] = (lambda: run(mb, xb, t, cb), {"bytes": tensor_bytes(mb)})
        for bits in (8, 4):
            quantized(mb, bits, xb, cb, " bf16 model")
    gc.collect()

    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for name, (fn, _) in variants.items():  # warm-up, and the outputs for the error columns
            outputs[name] = fn().float()
        for r in range(rounds):
            for name, (fn, _) in variants.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
            print(f"[kernels] UNet round {r + 1}/{rounds}: " + ", ".join(
                f"{name} {times[name][-1]:.3f} s" for name in variants), flush=True)
    rows = []
    for name, (_, row) in variants.items():
        row = {"model": name, "step_s": statistics.median(times[name]), "step_min_s": min(times[name]),
               "runs": len(times[name]), **row}
        if name != float_name:
            row["err_vs_float_model"] = rel_error(outputs[name], outputs[float_name])
        if name.endswith(" bf16 compute"):
            row["err_bf16_vs_fp32_compute"] = rel_error(outputs[name], outputs[name.split()[0] + " fp32 compute"])
        rows.append(row)
    return rows


def format_unet(rows: list[dict]) -> str:
    base, base_name = rows[0]["step_s"], rows[0]["model"]
    lines = []
    for r in rows:
        extra = []
        if "err_vs_float_model" in r:
            extra.append(f"output vs {base_name} model {r['err_vs_float_model']:.2e}")
        if "err_bf16_vs_fp32_compute" in r:
            extra.append(f"bf16 path vs fp32 compute {r['err_bf16_vs_fp32_compute']:.2e}")
        lines.append(f"  {r['model']:>16}: median {r['step_s']:7.3f} s, min {r['step_min_s']:7.3f} s "
                     f"({r['step_s'] / base:5.2f}x {base_name})  {r['bytes'] / 2**20:7.1f} MiB"
                     + ("  " + "; ".join(extra) if extra else ""))
    return "\n".join(lines)
# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--skip-linear", action="store_true")
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed runs per measurement (default 0.5 on CUDA, 1.0 on CPU)")
    p.add_argument("--rounds", type=int, default=None, help="UNet timing rounds (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    min_time = args.min_time or (0.5 if device.type == "cuda" else 1.0)
    probe = torch.empty(1, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    backend = functional.select_backend(probe)
    print(f"device: {describe(device)}; torch {torch.__version__}; {functional.triton_status()}")
    if backend == "triton":
        path = "fused = the Triton kernels (packed codes unpacked in registers)"
    else:
        path = ("fused = the torch path (what the dispatcher picks on this device"
                + ("; the Triton interpreter is far too slow to time on CPU" if device.type == "cpu" else "")
                + f"); CPU bf16 inference mode: {functional.cpu_bf16_mode()}")
    print(path)
    result: dict = {"device": describe(device), "backend": backend, "torch": torch.__version__,
                    "cpu_bf16_mode": functional.cpu_bf16_mode()}
    if not args.skip_linear:
        rows = linear_rows(device, args.tokens, min_time)
        act = "fp16" if device.type == "cuda" else "fp32"
        print(f"\nLinear, batch 1 x tokens, median ms per call ({act} activations; *_err: relative L2 error "
              "of the fused output against float64 on the same quantized weights):")
        print(format_linear(rows))
        result["linear"] = rows
    if not args.skip_unet:
        print(f"\nSD 1.5 UNet sampling step (one forward, inference_mode, batch {args.batch}, "
              f"{args.latent}x{args.latent} latent, {EXPERTS} experts, attention: {ATTENTION}):", flush=True)
        rows = unet_rows(device, args.batch, args.latent, args.rounds or (5 if device.type == "cuda" else 3))
        print(format_unet(rows))
        result["unet"] = rows
        if device.type == "cpu":
            by = {r["model"]: r for r in rows}
            base = by["float32"]["step_s"]
            met = all(by[f"W{b} bf16 compute"]["step_s"] <= base for b in (8, 4))
            default = ", ".join(f"W{b} {by[f'W{b} fp32 compute']['step_s'] / base:.2f}x" for b in (8, 4))
            print(f"CPU target (W8 and W4 median step no slower than the float32 median step, interleaved in this "
                  f"run), with the opt-in bf16 compute (TUNEQDM_CPU_BF16=auto): {'MET' if met else 'MISSED'}; "
                  f"with the default fp32 compute: {default} the float32 step")
            result["cpu_target_met"] = met
    if args.json:
        print(json.dumps(result, indent=1))
    return 0
