"""Peak memory and time of ONE training step (batch 1) of the SD 1.5 UNet, per training variant.

    python -m tuneqdm_bench memory [--latent 64] [--json]

Variants (each with and without activation checkpointing of the UNet's top-level blocks):
  fp32-full  float32 full fine-tuning, all 860M parameters trainable, torch AdamW.
  reference  the TuneQDM reference-code style (RefQuantLinear/RefQuantConv2d below): codes one per byte,
             4 experts stacked in one parameter, one expert for the batch from t[0], the float weight
             rebuilt in every forward with plain autograd, torch AdamW on the stacked scales. W8.
  w8, w4     this project: quantize_model + ExpertRouter + ExpertAdamW, 4 experts.

Every variant runs in a process of its own (`... memory --one VARIANT`), so peaks never mix. On CPU
the peak is the process's peak RSS (getrusage ru_maxrss), reported as is (`peak_rss`, torch runtime
included) and above the RSS measured right after the imports (`peak_above_baseline`); on CUDA it is
torch.cuda.max_memory_allocated. Quantized variants never hold the float model: the UNet is built on
the meta device and each float layer gets storage only just before it is quantized.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tuneqdm_core.checkpointing import checkpointed
from tuneqdm_core.config import TuneQDMConfig
from tuneqdm_core.layers import QuantLayer
from tuneqdm_core.model import get_router, quantize_model, tensor_bytes
from tuneqdm_core.optim import ExpertAdamW
from tuneqdm_core.routing import NUM_TRAIN_TIMESTEPS
from tuneqdm_core.quant import quantize_weight, unpack
from tuneqdm_demo.model import reset_parameters
from tuneqdm_fixtures.paths import checkout, subprocess_env

from .comfy_unet import ATTENTION, count_layers, run, sd15_unet, unet_config

VARIANTS = ("fp32-full", "reference", "w8", "w4")
EXPERTS = 4
LR, WEIGHT_DECAY = 3e-6, 1e-2
RESULT_TAG = "TUNEQDM_BENCH_RESULT "
# Peak measures, the first is the one the targets are judged on. CPU: peak RSS above the RSS right after the
# imports (the analogue of torch.cuda.max_memory_allocated, which leaves out the runtime), and peak RSS.
MEASURES = {"cpu": ("peak_above_baseline", "peak_rss"),
            "cuda": ("cuda_max_allocated", "peak_above_baseline", "peak_rss")}
# (label, numerator (variant, checkpointing), denominator, at most)
TARGETS = (
    ("W4 / fp32 full fine-tuning, both with checkpointing", ("w4", True), ("fp32-full", True), 0.10),
    ("W4 / reference style, both without checkpointing", ("w4", False), ("reference", False), 0.20),
)
GiB = 2**30


# ---------------------------------------------------------------- reference-code style layers

class RefRouter:
    """The reference code's routing: one expert for the whole batch, from the first sample's t."""

    def __init__(self, experts: int) -> None:
        self.experts, self.expert = experts, 0

    @contextlib.contextmanager
    def route(self, t: torch.Tensor) -> Iterator[None]:
        self.expert = min(int(t[0]) * self.experts // NUM_TRAIN_TIMESTEPS, self.experts - 1)
        yield None


class RefQuantLayer(nn.Module):
    """Integer codes `Q` one per byte (at 4 bits too), zero points `z`, and all experts' scales stacked
    in one (N, C) parameter each; the float weight s_out[e] * (Q - z) * s_in[e] is rebuilt in every
    forward with plain autograd, which keeps weight-sized tensors alive until backward."""

    def __init__(self, layer: nn.Module, bits: int, router: RefRouter) -> None:
        super().__init__()
        w = layer.weight.detach()
        qw = quantize_weight(w, bits)
        self.register_buffer("Q", unpack(qw.packed, bits, qw.k).reshape(w.shape).clone())
        self.register_buffer("z", qw.zero.float())
        self.s_out = nn.Parameter(qw.scale[None].repeat(router.experts, 1))
        self.s_in = nn.Parameter(torch.ones(router.experts, w.shape[1], device=w.device))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.router = router

    def weight(self) -> torch.Tensor:
        e, rest = self.router.expert, (1,) * (self.Q.ndim - 2)
        s_out, s_in = self.s_out[e].reshape(-1, 1, *rest), self.s_in[e].reshape(1, -1, *rest)
        return s_out * (self.Q.float() - self.z.reshape(-1, 1, *rest)) * s_in


class RefQuantLinear(RefQuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class RefQuantConv2d(RefQuantLayer):
    def __init__(self, layer: nn.Conv2d, bits: int, router: RefRouter) -> None:
        super().__init__(layer, bits, router)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


# ---------------------------------------------------------------- building the variants

def init_float_layer(name: str, layer: nn.Module) -> None:
    """Kaiming-uniform weights (torch's default init), for a layer just given real storage."""
    reset_parameters(layer, recurse=False)


def materialize_rest(model: nn.Module, device: torch.device) -> None:
    """Give every module that still owns meta tensors (norms, the fp32 model's layers) real storage
    and its default init, one module at a time; modules with real tensors are left untouched."""
    for m in model.modules():
        own = [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        if any(t.is_meta for t in own):
            m.to_empty(device=device, recurse=False)
            reset_parameters(m, recurse=False)


def meta_unet(tiny: bool) -> nn.Module:
    return sd15_unet(tiny=tiny, device="meta")


def swap_reference_layers(model: nn.Module, bits: int, router: RefRouter) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, leaf).to_empty(device="cpu")
        with torch.no_grad():
            init_float_layer(name, layer)
        cls = RefQuantLinear if isinstance(layer, nn.Linear) else RefQuantConv2d
        setattr(parent, leaf, cls(layer, bits, router))
        del layer


class Setup:
    """A model ready for one training step: its optimizer, how a step is routed and how it steps."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 route: Callable[[torch.Tensor], ContextManager], opt_step: Callable[[object], None],
                 info: dict) -> None:
        self.model, self.optimizer, self.route, self.opt_step, self.info = model, optimizer, route, opt_step, info


def trainable_scales(model: nn.Module, layer_type: type) -> list[nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, layer_type) for p in (m.s_out, m.s_in)]
    for p in params:
        p.requires_grad_(True)
    return params


def build_fp32_full(tiny: bool, device: torch.device) -> Setup:
    model = meta_unet(tiny)
    materialize_rest(model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    return Setup(model, opt, lambda t: contextlib.nullcontext(), lambda experts: opt.step(),
                 {"quantized_layers": 0})


def build_reference(tiny: bool, device: torch.device, bits: int = 8) -> Setup:
    model, router = meta_unet(tiny), RefRouter(EXPERTS)
    swap_reference_layers(model, bits, router)
    materialize_rest(model, torch.device("cpu"))
    model.to(device)
    params = trainable_scales(model, RefQuantLayer)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    n = sum(isinstance(m, RefQuantLayer) for m in model.modules())
    return Setup(model, opt, router.route, lambda experts: opt.step(), {"quantized_layers": n, "bits": bits})


def build_tuneqdm(tiny: bool, device: torch.device, bits: int) -> Setup:
    model = meta_unet(tiny)
    report = quantize_model(model, TuneQDMConfig(bits=bits, experts=EXPERTS), weight_init=init_float_layer)
    materialize_rest(model, torch.device("cpu"))
    model.to(device)
    params = trainable_scales(model, QuantLayer)
    opt = ExpertAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    return Setup(model, opt, get_router(model).route, opt.step,
                 {"quantized_layers": len(report.converted), "bits": bits, "quantize_s": report.seconds})


BUILDERS: dict[str, Callable[[bool, torch.device], Setup]] = {
    "fp32-full": build_fp32_full,
    "reference": build_reference,
    "w8": lambda tiny, device: build_tuneqdm(tiny, device, 8),
    "w4": lambda tiny, device: build_tuneqdm(tiny, device, 4),
}


# ---------------------------------------------------------------- measuring one variant (child process)

def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(variant: str, latent: int, checkpointing: bool, tiny: bool = False, device: str = "cpu",
            seed: int = 0) -> dict:
    """Build one variant, run one training step, and measure. Meant for a fresh process."""
    dev = torch.device(device)
    baseline = current_rss()
    marks: dict[str, dict] = {}

    def mark(stage: str) -> None:
        _sync(dev)
        marks[stage] = {"rss": current_rss(), "peak_rss": peak_rss()}
        if dev.type == "cuda":
            marks[stage]["cuda_allocated"] = torch.cuda.memory_allocated(dev)

    torch.manual_seed(seed)
    start = time.perf_counter()
    setup = BUILDERS[variant](tiny, dev)
    model = setup.model
    build_s = time.perf_counter() - start
    mark("built")

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, model.in_channels, latent, latent, generator=gen).to(dev)
    target = torch.randn(x.shape, generator=gen).to(dev)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=gen).to(dev)
    context = torch.randn(1, 77, unet_config(tiny)["context_dim"], generator=gen).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    _sync(dev)
    start = time.perf_counter()
    with setup.route(t) as experts, checkpointed(model, checkpointing):
        loss = F.mse_loss(run(model, x, t, context), target)
        mark("forward")
        loss.backward()
        mark("backward")
    setup.opt_step(experts)
    mark("optimizer_step")
    step_s = time.perf_counter() - start

    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [v for s in setup.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    setup.optimizer.zero_grad(set_to_none=True)
    peak = peak_rss()
    result = {
        "variant": variant, "latent": latent, "checkpointing": checkpointing, "tiny": tiny,
        "device": str(dev), "status": "ok", "timestep": int(t[0]), "loss": float(loss.detach()),
        "step_s": step_s, "build_s": build_s,
        "baseline_rss": baseline, "peak_rss": peak, "peak_above_baseline": peak - baseline,
        "model_bytes": tensor_bytes(model), "optimizer_state_bytes": sum(v.numel() * v.element_size() for v in state),
        "trainable_params": sum(p.numel() for p in trainable), "params": sum(p.numel() for p in model.parameters()),
        "stages": marks, **setup.info,
    }
    if dev.type == "cuda":
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated(dev)
    return result


# ---------------------------------------------------------------- orchestration (parent process)

def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def spawn_one(variant: str, latent: int, checkpointing: bool, args: argparse.Namespace) -> dict:
    """Run one variant in a child process, watching free memory: the child is killed (and the row says
    so) if the machine's available memory falls below the reserve."""
    row = {"variant": variant, "latent": latent, "checkpointing": checkpointing, "tiny": args.tiny}
    cmd = [sys.executable, "-m", "tuneqdm_bench", "memory", "--one", variant, "--latent", str(latent),
           "--device", args.device, "--seed", str(args.seed)]
    cmd += ["--checkpointing"] * checkpointing + ["--tiny"] * args.tiny
    root = checkout()
    env = subprocess_env()
    reserve = int(args.reserve_gib * GiB)
    killed_at = None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=root, env=env)
        while proc.poll() is None:
            avail = mem_available()
            if avail is not None and avail < reserve:
                killed_at = avail
                proc.kill()
                proc.wait()
                break
            time.sleep(0.1)
        row["process_s"] = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "process_s": row["process_s"]}
    if killed_at is not None:
        reason = (f"stopped by the memory guard: available memory fell to {killed_at / GiB:.1f} GiB "
                  f"(reserve {args.reserve_gib} GiB)")
    else:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        reason = f"child exited with code {proc.returncode}: {tail[0]}"
    return {**row, "status": "failed", "reason": reason}


def spawn_retrying(variant: str, latent: int, checkpointing: bool, args: argparse.Namespace) -> dict:
    """spawn_one, tried again (after a pause) when the memory guard stopped it: on a shared machine
    other processes' memory comes and goes."""
    for attempt in range(args.retries + 1):
        row = spawn_one(variant, latent, checkpointing, args)
        if row.get("status") == "ok" or "memory guard" not in row.get("reason", "") or attempt == args.retries:
            return {**row, "attempts": attempt + 1}
        print(f"[memory]   {row['reason']}; trying again in {args.retry_wait_s:.0f} s", file=sys.stderr, flush=True)
        time.sleep(args.retry_wait_s)
    raise AssertionError("unreachable")


def merge_saved(paths: list[str]) -> tuple[list[dict], list]:
    """Rows of saved --json runs; a successful row replaces an earlier one of the same key."""
    rows: dict[tuple, dict] = {}
    versions = []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        versions.append({"file": str(path), **saved.get("code", {})})
        for r in saved["results"]:
            key = (r["latent"], r["variant"], r["checkpointing"])
            if key not in rows or r.get("status") == "ok" or rows[key].get("status") != "ok":
                rows[key] = r
    order = {v: i for i, v in enumerate(VARIANTS)}
    ordered = sorted(rows.values(), key=lambda r: (r["latent"], order[r["variant"]], not r["checkpointing"]))
    return ordered, versions


def guard(variant: str, latent: int, checkpointing: bool, done: list[dict], reserve: float) -> str | None:
    """Why this run should be skipped, or None. A larger latent never needs less than a smaller one
    of the same variant needed, so that peak is a lower bound of this run's."""
    avail = mem_available()
    if avail is None:
        return None
    smaller = [r for r in done if r["variant"] == variant and r["checkpointing"] == checkpointing
               and r["latent"] < latent and r.get("status") == "ok"]
    need = max((r["peak_rss"] for r in smaller), default=0)
    if need > avail - reserve * GiB:
        return (f"skipped: needs more than {need / GiB:.1f} GiB (its peak at a smaller latent), only "
                f"{avail / GiB:.1f} GiB available ({reserve} GiB kept in reserve)")
    return None


def find(rows: list[dict], variant: str, checkpointing: bool, latent: int) -> dict | None:
    for r in rows:
        if (r["variant"], r["checkpointing"], r["latent"], r.get("status")) == (variant, checkpointing, latent, "ok"):
            return r
    return None


def targets(rows: list[dict], latent: int, measures: tuple[str, ...] = MEASURES["cpu"],
            primary: bool = True) -> list[dict]:
    """The targets, from measured rows only: one entry per target and measure. They are set for the
    primary latent (32x32); at other sizes the same ratios are shown for information."""
    out = []
    for label, num, den, limit in TARGETS:
        a, b = find(rows, *num, latent), find(rows, *den, latent)
        for measure in measures:
            entry = {"target": label, "latent": latent, "measure": measure, "judged": primary and measure == measures[0],
                     "limit": limit, "numerator": list(num), "denominator": list(den)}
            if a is None or b is None or measure not in a or measure not in b:
                entry.update(ratio=None, met=None)
            else:
                ratio = a[measure] / b[measure]
                entry.update(ratio=ratio, met=ratio <= limit)
            out.append(entry)
    return out


def note(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("reason", "")
    text = f"{r['peak_above_baseline'] / GiB:.2f} GiB above baseline"
    if "cuda_max_allocated" in r:
        text += f", cuda max allocated {r['cuda_max_allocated']:,} B"
    return text


def format_table(rows: list[dict]) -> str:
    head = ("latent", "variant", "ckpt", "peak_rss B", "peak_above_baseline B", "baseline_rss B", "step s", "build s",
            "device", "note")
    lines = [head]
    for r in rows:
        ok = r.get("status") == "ok"
        lines.append((f"{r['latent']}x{r['latent']}", r["variant"], "on" if r["checkpointing"] else "off",
                      f"{r['peak_rss']:,}" if ok else "-", f"{r['peak_above_baseline']:,}" if ok else "-",
                      f"{r['baseline_rss']:,}" if ok else "-", f"{r['step_s']:.2f}" if ok else "-",
                      f"{r['build_s']:.1f}" if ok else "-", r.get("device", "-"),
                      note(r)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i in (3, 4, 5, 6, 7) else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in lines)


def format_targets(entries: list[dict], measures: tuple[str, ...]) -> str:
    why = {"peak_above_baseline": "peak RSS minus the RSS right after the imports, the CPU analogue of "
                                  "torch.cuda.max_memory_allocated",
           "cuda_max_allocated": "torch.cuda.max_memory_allocated"}[measures[0]]
    lines = [f"Targets, set at the primary latent, judged on {measures[0]} ({why}); the other measures "
             "(peak_rss: the torch runtime included) and latents are shown for information:"]
    for e in entries:
        verdict = "not measured" if e["met"] is None else ("MET" if e["met"] else "MISSED")
        ratio = "-" if e["ratio"] is None else f"{e['ratio']:.4f}"
        judged = "judged" if e["judged"] else "info  "
        lines.append(f"  [{judged}] {e['latent']}x{e['latent']} {e['target']}, {e['measure']}: "
                     f"{ratio} (at most {e['limit']}) {verdict}")
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every variant, with and without checkpointing, at the primary latent and any extra ones."""
    primary = 8 if args.tiny else 32
    rows: list[dict] = []
    for latent in [primary] + [n for n in dict.fromkeys(args.latent or []) if n != primary]:
        for variant in args.variants:
            for ckpt in (True, False):
                why = guard(variant, latent, ckpt, rows, args.reserve_gib)
                print(f"[memory] {variant} latent {latent} checkpointing {'on' if ckpt else 'off'} ...",
                      file=sys.stderr, flush=True)
                row = ({"variant": variant, "latent": latent, "checkpointing": ckpt, "tiny": args.tiny,
                        "status": "skipped", "reason": why} if why else spawn_retrying(variant, latent, ckpt, args))
                print(f"[memory]   -> {row.get('status')}: "
                      + (f"peak_rss {row['peak_rss']:,} B, step {row['step_s']:.2f} s" if row.get("status") == "ok"
                         else row.get("reason", "")), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def code_version() -> dict:
    """The commit measured, and which core files differed from it (others edit while benchmarks run)."""
    root = checkout()
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "modified": git("status", "--porcelain", "--", "tuneqdm_core").splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {}


def report(rows: list[dict], tiny: bool, as_json: bool, default_device: str = "cpu",
           version: dict | list | None = None) -> None:
    """The table (or JSON) and the targets, computed from the measured rows."""
    latents = list(dict.fromkeys(r["latent"] for r in rows))
    device = next((r["device"] for r in rows if "device" in r), default_device)
    measures = MEASURES[torch.device(device).type]
    entries = [e for n in latents for e in targets(rows, n, measures, primary=n == latents[0] and not tiny)]
    unet = meta_unet(tiny)
    arch = {"params": sum(p.numel() for p in unet.parameters()), "linear_conv2d_layers": count_layers(unet)}
    if as_json:
        print(json.dumps({"benchmark": "memory", "attention": ATTENTION, "device": device,
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "experts": EXPERTS,
                          "unet": arch, "code": version or {}, "judged_measure": measures[0], "results": rows, "targets": entries}, indent=1))
        return
    print(f"attention: {ATTENTION}; device: {device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch 1, {EXPERTS} experts")
    print(f"UNet ({'tiny' if tiny else 'SD 1.5'}, ComfyUI's UNetModel): {arch['params']:,} parameters, "
          f"{arch['linear_conv2d_layers']} Linear/Conv2d layers")
    print(format_table(rows))
    print(format_targets(entries, measures))


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--one", choices=VARIANTS, help="run only this variant, in this process (used by the parent)")
    p.add_argument("--latent", type=int, action="append",
                   help="with --one: the latent size (default 32); else an extra size to run after 32 (repeatable)")
    p.add_argument("--checkpointing", action="store_true", help="with --one: activation checkpointing on")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (max_memory_allocated)")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet of the same class (for tests): seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reserve-gib", type=float, default=1.5,
                   help="kill a run if the machine's available memory falls below this")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--from-json", metavar="PATH", nargs="+",
                   help="measure nothing: report saved --json runs (several: merged, successful rows win)")
    p.add_argument("--retries", type=int, default=2, help="runs stopped by the memory guard are tried again")
    p.add_argument("--retry-wait-s", type=float, default=60.0)


def main(args: argparse.Namespace) -> int:
    if args.one:
        latent = (args.latent or [8 if args.tiny else 32])[-1]
        result = run_one(args.one, latent, args.checkpointing, args.tiny, args.device, args.seed)
        result["attention"] = ATTENTION
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    if args.from_json:
        rows, versions = merge_saved(args.from_json)
        version = versions[0] if len(versions) == 1 else {"merged": versions}
    else:
        print(f"[memory] attention: {ATTENTION}", file=sys.stderr)
        version = code_version()
        rows = run_all(args)
    report(rows, args.tiny or any(r.get("tiny") for r in rows), args.json, args.device, version)
    return 0 if all(r.get("status") in ("ok", "skipped") for r in rows) else 1
