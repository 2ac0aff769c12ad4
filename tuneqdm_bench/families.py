"""The model families at full size (issue 15): SDXL, SD3.5 Medium, Flux (true widths, FLUX_FULL_DEPTH blocks)
and Wan 2.1 T2V 1.3B, random-weight files from tuneqdm_fixtures/families.py, each graph in its own fresh ComfyUI
server (ComfyUI 0.8.0, this machine's CPU), as a user runs them:

    python -m tuneqdm_bench families [--only sdxl,flux] [--rows quantize,sample,train,sdxl-train,sdxl-lora]
                                     [--size full|test] [--json]

Per family:
* quantize: Load and Quantize Diffusion Model W4 (the node's default options: group-wise steps), the
  prompt's wall time and the node's own quantization seconds; Quantize UNet W4 on UNETLoader's MODEL (its
  report's seconds). Weight bytes: every Linear/Conv weight of the fp16/bf16 file against the same weights
  at W4 (codes, zero points, step codes, base steps, and the experts' trainable s_out / s_in), read from the
  saved W4 file; weights left in float count at 2 bytes a value. The whole model in memory
  (norms, biases and tables stay float, fp32 on this CPU) is listed beside it.
* sample: one KSampler step (euler, cfg 1) at a 32x32-pixel latent with UNETLoader (default dtype: fp32
  on this CPU) against the loader at W8 and W4: the wall time of a second, re-seeded prompt in the same
  server (the model already loaded).
* train: loader W4 -> Train TuneQDM Scales (latents of 32x32 pixels: the smallest every family's patching
  and SDXL's three levels accept; activation checkpointing on, batch 1, one step): the server's peak
  RSS (VmHWM, the whole process: load, quantization, training) and the step's seconds (the node's report).
* sdxl-train, sdxl-lora (SDXL only): the issue's comparison at a 32x32 latent (256x256 pixels),
  checkpointing on: loader W4 -> Train TuneQDM Scales against UNETLoader -> TrainLoraNode (rank 16, bf16,
  gradient checkpointing; run last, after every family); one step each: peak RSS of each server and the
  step's seconds (TrainLoraNode: its progress bar's rate).

Flux's file has FLUX_FULL_DEPTH blocks; its times and bytes are also given scaled to Flux dev's 19 + 38
blocks by parameter count, in columns marked "Flux dev (scaled)". Conditioning is random tensors of each
family's shapes, and a fixed pixel codec stands in for the VAE (tuneqdm_fixtures/fixture_nodes/tuneqdm_family_fixtures).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any, Callable

from tuneqdm_fixtures.checkpoints import install
from tuneqdm_fixtures.families import FAMILY_NODES, weight_bytes
from tuneqdm_fixtures.graph import Graph
from tuneqdm_fixtures.paths import checkout
from tuneqdm_fixtures.server import PACK_FOLDER, ComfyServer

from .peers import _step_seconds, _with_defaults

FILE_DTYPES = {"sdxl": "fp16", "wan21": "fp16", "flux": "bf16", "sd35m": "fp16"}  # the order they run in
LATENTS = {"sdxl": "EmptyLatentImage", "sd35m": "EmptySD3LatentImage", "flux": "EmptySD3LatentImage",
           "wan21": "EmptyHunyuanLatentVideo"}
QUANT = dict(experts=4, scales="s_out and s_in (TuneQDM)", s_in_init="ones", keep_float="")
ROWS = ("quantize", "sample", "train", "sdxl-train", "sdxl-lora")
GIB = 2**30
TIMEOUT = 3600
QUANTIZE_UNET_TIMEOUT = 600  # Quantize UNet has no thread tuning: on a busy 2-core CPU it can take an hour
LORA_TIMEOUT = 1800
_REPORT = re.compile(r"quantized (\d+) layers in ([\d.]+) s; weights ([\d,]+) B -> ([\d,]+) B")


class Family:
    """One family's file and the graph pieces every row shares."""

    def __init__(self, name: str, size: str) -> None:
        from tuneqdm_fixtures.families import family_specs, flux_dev_parameters, write_family_file

        self.name, self.size = name, size
        self.asset = write_family_file(name, size, FILE_DTYPES[name])
        self.unet = self.asset.path.name
        specs = family_specs(name, size)
        self.parameters = sum(s.numel for s in specs.values())
        # Flux: parameters at Flux dev's depth over this file's
        self.dev_scale = flux_dev_parameters(specs) / self.parameters if name == "flux" else None

    def server(self) -> ComfyServer:
        srv = ComfyServer(custom_nodes={PACK_FOLDER: checkout(), FAMILY_NODES.name: FAMILY_NODES}).start()
        install(self.asset.path, srv.models_dir / "diffusion_models")
        return srv

    def conditioning(self, g: Graph, seed: int):
        return g.node("TestFamilyConditioning", family=self.name, seed=seed, tokens=8, width=1024, height=1024,
                      guidance=3.5)

    def latent(self, g: Graph, pixels: int):
        extra = dict(length=1) if self.name == "wan21" else {}
        return g.node(LATENTS[self.name], width=pixels, height=pixels, batch_size=1, **extra)

    def training_latents(self, g: Graph, pixels: int):
        images = g.node("TestFamilyImages", count=3, size=pixels, seed=0)
        return g.node("VAEEncode", pixels=images, vae=g.node("TestFamilyVAE", family=self.name))

    def loader(self, g: Graph, bits: str):
        return g.node("TuneQDMLoadQuantizeDiffusionModel", unet_name=self.unet, weight_dtype="default", bits=bits,
                      **QUANT)


def _texts(entry: dict) -> list[str]:
    return ["".join(out.get("text", [])) for out in entry.get("outputs", {}).values() if out.get("text")]


def _report(entry: dict) -> dict[str, float]:
    for text in _texts(entry):
        m = _REPORT.search(text)
        if m:
            threads = re.search(r"CPU threads per layer chosen by timing \((.*)\)", text)
            return {"layers": int(m.group(1)), "quantize_s": float(m.group(2)),
                    "model_bytes_before": int(m.group(3).replace(",", "")),
                    "model_bytes_after": int(m.group(4).replace(",", "")),
                    "threads": threads.group(1) if threads else None}
    raise RuntimeError(f"no quantization report in {_texts(entry)!r:.500}")


def _timed(srv: ComfyServer, g: Graph, timeout: float = TIMEOUT) -> tuple[dict, float]:
    start = time.perf_counter()
    entry = srv.run(g.to_api(), timeout=timeout, check=True)
    return entry, time.perf_counter() - start


def _sample_step(fam: Family, srv: ComfyServer, model_of: Callable[[Graph], Any]) -> tuple[float, float]:
    """(first prompt's seconds: load + one step, one step's seconds: the same graph re-seeded)."""
    times = []
    for seed in (0, 1):
        g = Graph()
        s = g.node("KSampler", model=model_of(g), seed=seed, steps=1, cfg=1.0, sampler_name="euler",
                   scheduler="simple", positive=fam.conditioning(g, 1), negative=fam.conditioning(g, 2),
                   latent_image=fam.latent(g, 32), denoise=1.0)
        g.node("SaveLatent", samples=s, filename_prefix=f"latents/bench_{fam.name}")
        times.append(_timed(srv, g)[1])
    return times[0], times[1]


def float_rows(fam: Family, rows: set[str], out: dict[str, Any]) -> None:
    """UNETLoader's MODEL: one sampling step; then Quantize UNet W4 on it (last: on a busy CPU it is the
    slow one, see README, and it has its own time limit)."""
    srv = fam.server()
    try:
        if "sample" in rows:
            out["float_first_prompt_s"], out["float_step_s"] = _sample_step(
                fam, srv, lambda g: g.node("UNETLoader", unet_name=fam.unet, weight_dtype="default"))
            out["float_server_peak_rss"] = srv.peak_rss()
        if "quantize" in rows:
            g = Graph()
            unet = g.node("UNETLoader", unet_name=fam.unet, weight_dtype="default")
            q = g.node("TuneQDMQuantizeUNet", model=unet, bits="4", **QUANT)
            g.node("PreviewAny", source=q.out(1))
            entry, _ = _timed(srv, g, QUANTIZE_UNET_TIMEOUT)
            out["quantize_unet_w4_s"] = _report(entry)["quantize_s"]
    finally:
        srv.stop()


def loader_rows(fam: Family, bits: str, rows: set[str], out: dict[str, Any]) -> None:
    """Load and Quantize at `bits`: the load prompt, one sampling step, and (W4) the saved file's bytes."""
    srv = fam.server()
    try:
        g = Graph()
        g.node("PreviewAny", source=fam.loader(g, bits).out(1))
        entry, seconds = _timed(srv, g)
        report = _report(entry)
        out[f"loader_w{bits}_prompt_s"] = seconds
        out[f"loader_w{bits}_quantize_s"] = report["quantize_s"]
        out[f"loader_w{bits}_model_bytes"] = report["model_bytes_after"]
        out[f"loader_w{bits}_threads"] = report["threads"]
        out[f"loader_w{bits}_peak_rss_after_load"] = srv.peak_rss()
        if bits == "4":
            out["w4_model_ratio_to_file"] = report["model_bytes_after"] / fam.asset.nbytes
        if bits == "4" and "quantize" in rows:
            g = Graph()
            g.node("TuneQDMSaveQuantizedUNet", model=fam.loader(g, "4"), filename_prefix=f"bench_{fam.name}_w4",
                   overwrite=True)
            srv.run(g.to_api(), timeout=TIMEOUT, check=True)
            (saved,) = (srv.models_dir / "tuneqdm" / "unet").glob(f"bench_{fam.name}_w4.safetensors")
            out["weight_bytes_before"], out["weight_bytes_after_w4"] = weight_bytes(fam.asset.path, saved)
            out["w4_weight_ratio"] = out["weight_bytes_after_w4"] / out["weight_bytes_before"]
        if "sample" in rows:
            _, out[f"w{bits}_step_s"] = _sample_step(fam, srv, lambda g: fam.loader(g, bits))
    finally:
        srv.stop()


def _train_tuneqdm(fam: Family, pixels: int, steps: int = 1) -> dict[str, Any]:
    srv = fam.server()
    try:
        g = Graph()
        model = fam.loader(g, "4")
        train = g.node("TuneQDMTrainScales", model=model, latents=fam.training_latents(g, pixels),
                       instance_conditioning=fam.conditioning(g, 1), steps=steps, lr_s_out=1e-4, lr_s_in=1e-2,
                       train_s_in=True, batch_size=1, seed=0, resolution=64, gradient_checkpointing=True)
        g.node("PreviewAny", source=train.out(3))
        entry, seconds = _timed(srv, g)
        return {"peak_rss": srv.peak_rss(), "prompt_s": seconds,
                "step_s": _node_step_seconds(entry), "latent": f"{pixels // 8}x{pixels // 8}"}
    finally:
        srv.stop()


def _node_step_seconds(entry: dict) -> float | None:
    for text in _texts(entry):
        m = re.search(r"(\d+)/\d+ steps in ([\d.]+) s", text)
        if m:
            return float(m.group(2)) / int(m.group(1))
    return None


def _train_lora(fam: Family, pixels: int, steps: int = 1) -> dict[str, Any]:
    srv = fam.server()
    try:
        info = srv.object_info()
        g = Graph()
        unet = g.node("UNETLoader", unet_name=fam.unet, weight_dtype="default")
        train = g.node("TrainLoraNode", **_with_defaults(info, "TrainLoraNode", dict(
            model=unet.out(0), latents=fam.training_latents(g, pixels), positive=fam.conditioning(g, 1),
            batch_size=1, steps=steps, learning_rate=1e-4, rank=16, training_dtype="bf16", lora_dtype="bf16",
            gradient_checkpointing=True, existing_lora="[None]")))
        g.node("PreviewAny", source=train.out(3))
        entry, seconds = _timed(srv, g, LORA_TIMEOUT)

        class _Lora:  # peers._step_seconds reads TrainLoraNode's rate from the log for rows named so
            name, kind = "TrainLora", "train"

        return {"peak_rss": srv.peak_rss(), "prompt_s": seconds,
                "step_s": _step_seconds(_Lora, entry, srv.log_text(), steps), "latent": f"{pixels // 8}x{pixels // 8}"}
    finally:
        srv.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default="", help="comma-separated families (sdxl, sd35m, flux, wan21); default all")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--size", choices=("full", "test"), default="full")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FILE_DTYPES)
    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = sorted(set(names) - set(FILE_DTYPES)) + sorted(rows - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown family or row: {unknown}")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        fam = Family(name, args.size)
        r = results[name] = {"parameters": fam.parameters, "file_bytes": fam.asset.nbytes, "file": fam.unet,
                             "dev_scale": fam.dev_scale}
        # A row that fails (a server killed for memory, a time-out) is recorded and the others still run;
        # each row's figures are printed as soon as it ends, so an interrupted run keeps them.
        if rows & {"sample", "quantize"}:
            _row(r, name, "loader W4", lambda: loader_rows(fam, "4", rows, r))
        if "sample" in rows:
            _row(r, name, "loader W8", lambda: loader_rows(fam, "8", rows, r))
        if "train" in rows:
            _row(r, name, "train", lambda: r.__setitem__("train", _train_tuneqdm(fam, 32)))
        if name == "sdxl" and "sdxl-train" in rows:
            _row(r, name, "sdxl_train_w4", lambda: r.__setitem__("sdxl_train_w4", _train_tuneqdm(fam, 256)))
        if rows & {"sample", "quantize"}:
            _row(r, name, "float", lambda: float_rows(fam, rows, r))
    # Last: on a CPU shared with other work its one step can take most of an hour (bf16 on the CPU).
    if "sdxl" in results and "sdxl-lora" in rows:
        fam = Family("sdxl", args.size)
        r = results["sdxl"]
        _row(r, "sdxl", "sdxl_train_lora", lambda: r.__setitem__("sdxl_train_lora", _train_lora(fam, 256)))
    lines = table(results) + targets(results)
    print("\n".join(lines))
    if args.json:
        print(json.dumps({"size": args.size, "families": results, "targets": targets(results)}, indent=1))
    return 0


def _row(result: dict[str, Any], family: str, what: str, run: Callable[[], None]) -> None:
    started, before = time.perf_counter(), dict(result)
    try:
        run()
    except Exception as e:  # noqa: BLE001 - reported in the results, the bench goes on
        result.setdefault("errors", {})[what] = f"{type(e).__name__}: {str(e)[:400]}"
    new = {k: v for k, v in result.items() if before.get(k) != v}
    print(f"[families] {family} {what} ({time.perf_counter() - started:.0f} s): {json.dumps(new)}", flush=True)


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["", "| family | parameters | file | loader W4 (quantize s) | Quantize UNet W4 s | weights fp16 -> W4 "
                 "| model in memory W4 | step s float / W8 / W4 | train step s, peak RSS (latent) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r.get("train") or {}
        ratio = r.get("w4_weight_ratio")
        weights = (f"{r['weight_bytes_before'] / GIB:.2f} -> {r['weight_bytes_after_w4'] / GIB:.2f} GiB ({ratio:.3f}x)"
                   if ratio else "-")
        lines.append(
            f"| {name} | {r['parameters'] / 1e9:.3f} B | {r['file_bytes'] / GIB:.2f} GiB "
            f"| {_f(r.get('loader_w4_prompt_s'))} ({_f(r.get('loader_w4_quantize_s'))}) "
            f"| {_f(r.get('quantize_unet_w4_s'))} | {weights} "
            f"| {_f(r.get('loader_w4_model_bytes', 0) / GIB, '{:.2f}')} GiB "
            f"| {_f(r.get('float_step_s'), '{:.2f}')} / {_f(r.get('w8_step_s'), '{:.2f}')} / {_f(r.get('w4_step_s'), '{:.2f}')} "
            f"| {_f(t.get('step_s'))}, {_f(t.get('peak_rss', 0) / GIB, '{:.2f}')} GiB ({t.get('latent', '-')}) |")
        if r.get("dev_scale"):
            k = r["dev_scale"]
            scaled = lambda key: _f(r[key] * k) if r.get(key) is not None else "-"  # noqa: E731
            lines.append(
                f"| Flux dev (scaled x{k:.2f} by parameters) | {r['parameters'] * k / 1e9:.2f} B "
                f"| {r['file_bytes'] * k / GIB:.1f} GiB | {scaled('loader_w4_prompt_s')} ({scaled('loader_w4_quantize_s')}) "
                f"| {scaled('quantize_unet_w4_s')} "
                f"| {(r.get('weight_bytes_before') or 0) * k / GIB:.1f} -> {(r.get('weight_bytes_after_w4') or 0) * k / GIB:.1f} GiB "
                f"| {r.get('loader_w4_model_bytes', 0) * k / GIB:.1f} GiB "
                f"| {scaled('float_step_s')} / {scaled('w8_step_s')} / {scaled('w4_step_s')} | {_f(t.get('step_s') and t['step_s'] * k)}, - |")
    sdxl = results.get("sdxl", {})
    if "sdxl_train_w4" in sdxl:
        lines += ["", "| SDXL at a 32x32 latent, checkpointing | peak RSS | step s |", "|---|---|---|"]
        for key, what in (("sdxl_train_w4", "Load and Quantize W4 -> Train TuneQDM Scales"),
                          ("sdxl_train_lora", "UNETLoader -> TrainLoraNode (rank 16, bf16)")):
            if key not in sdxl:
                continue
            lines.append(f"| {what} | {sdxl[key]['peak_rss'] / GIB:.2f} GiB | {_f(sdxl[key]['step_s'])} |")
    return lines


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []

    def check(what: str, value: float | None, limit: float, fmt: str) -> None:
        if value is None:
            lines.append(f"target: {what}: not measured")
        else:
            lines.append(f"target: {what} {fmt.format(value)} (limit {fmt.format(limit)}): "
                         f"{'MET' if value <= limit else 'MISSED'}")

    sdxl = results.get("sdxl", {})
    if "loader_w4_prompt_s" in sdxl:
        check("SDXL full size quantize-on-load W4, prompt seconds", sdxl["loader_w4_prompt_s"], 60, "{:.1f} s")
    if "quantize_unet_w4_s" in sdxl:
        check("SDXL full size Quantize UNet W4 seconds", sdxl["quantize_unet_w4_s"], 60, "{:.1f} s")
    for name, r in results.items():
        if r.get("w4_weight_ratio") is not None:
            check(f"{name} W4 weight bytes / fp16 file's weight bytes", r["w4_weight_ratio"], 0.30, "{:.3f}x")
    w4, lora = sdxl.get("sdxl_train_w4"), sdxl.get("sdxl_train_lora")
    if w4:
        check("SDXL loader W4 -> Train peak RSS (32x32 latent)", w4["peak_rss"] / GIB, 3.5, "{:.2f} GiB")
    if w4 and lora:
        check("SDXL W4 train peak / TrainLoraNode peak", w4["peak_rss"] / lora["peak_rss"], 0.4, "{:.2f}x")
        if w4["step_s"] and lora["step_s"]:
            check("SDXL W4 train step / TrainLoraNode step", w4["step_s"] / lora["step_s"], 1.0, "{:.2f}x")
    return lines
