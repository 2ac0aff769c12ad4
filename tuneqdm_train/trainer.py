"""One rank's run: load the model and the data, train with the node's loop (`train_scales`) and the node's
objective (`nodes.training_objective.model_objective`), rank 0 writes the scales file.

What makes ranks agree: each rank draws its samples and timesteps from its own seed streams (rank r of a
run with S streams per rank owns streams r*S .. r*S+S-1), and a sample's noise is a function of the run's
seed and its timestep, not of which process drew it. So W ranks at batch b compute what one process at
batch W*b with W*S streams computes (`--streams`), up to float summation order: a run can be checked, or
continued, on another number of processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import data as data_mod
from . import sources
from tuneqdm_core.errors import CollectiveError, SettingError

from .distributed import GradientAllReduce, Group

log = logging.getLogger("tuneqdm_train")


def stream_generator(seed: int, stream: int, start_step: int) -> torch.Generator:
    """Seed stream `stream` of a run; a resumed run (start_step > 0) must not replay the draws already taken."""
    key = hashlib.sha256(f"tuneqdm-train:{seed}:{stream}:{start_step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") % 2**63)


def timestep_noise(seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """noise(x0, t) for the node's loss: each sample's noise seeded by the run's seed and its own timestep (a
    float32 from a seed stream), so the same draw gets the same noise in whichever process and batch it runs."""

    def noise(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x0.shape, dtype=torch.float32)
        for i, ti in enumerate(t.float().tolist()):
            bits = struct.unpack("<I", struct.pack("<f", ti))[0]
            out[i] = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed((seed * 2**32 + bits) % 2**63))
        return out

    return noise


def build_loss(base: Any, conds: list, device: torch.device, loss_name: str, seed: int) -> Callable:
    """The node's objective for `base`; a seam the failure test wraps."""
    from tuneqdm_pack.nodes.training_objective import model_objective
    from tuneqdm_pack.tuneqdm_core.objective import ERROR_FUNCTIONS

    if loss_name not in ERROR_FUNCTIONS:
        raise SettingError(f"--loss {loss_name}: one of {', '.join(ERROR_FUNCTIONS)}")
    return model_objective(base, conds, device, ERROR_FUNCTIONS[loss_name], timestep_noise(seed))


def _live_scales(start: Any, params: list[torch.Tensor], train_s_in: bool, info: dict[str, str]) -> Any:
    """The scales train_scales holds right now, from the tensors it handed to `sync` (every layer's s_out in
    `start`'s order, then every s_in when those train)."""
    names = list(start.tensors)
    s_in = params[len(names):] if train_s_in else [start.tensors[n][1] for n in names]
    tensors = {n: (o.detach().clone(), i.detach().clone()) for n, o, i in zip(names, params[:len(names)], s_in)}
    return dataclasses.replace(start, tensors=tensors, info=info)


def _digest(scales: Any) -> str:
    h = hashlib.sha256()
    for name, (s_out, s_in) in scales.tensors.items():
        h.update(name.encode())
        for t in (s_out, s_in):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _info(done: int, planned: int, partial: bool, resumed_from: str | None, group: Group, streams: int,
          stopped_by: str = "interrupted") -> dict[str, str]:
    from tuneqdm_pack.tuneqdm_core.train import training_record

    info = training_record(done, planned, partial, resumed_from, stopped_by)
    info.update(world_size=str(group.world), sample_streams=str(group.world * streams))
    return info


def run(args: argparse.Namespace, group: Group) -> dict:
    """Train on this rank; returns the run's record (rank 0 also writes args.out and args.report)."""
    sources.import_comfy(group.device)
    core = sources.pack().tuneqdm_core
    import comfy.model_management
    from tuneqdm_pack.nodes.trainable import grad_ready
    from tuneqdm_pack.tuneqdm_core.train import SampleSet, TrainConfig, train_scales, trains_s_in

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise SettingError(f"--out {out}: a scales file name ends in .safetensors")
    model = sources.load_model(args.model, args.bits, args.experts)
    data = data_mod.from_path(args.data, args.caption,
                              lambda: sources.encoders(model, args.vae, args.text_encoder, args.clip_type, args.resolution))
    base, dm = model.model, model.model.diffusion_model
    start, start_step = core.scales_of(dm), 0
    if args.resume:
        start = core.load_scales(args.resume, dm)
        start_step = int(start.info.get("steps_done", "0"))
        if start_step >= args.steps:
            raise SettingError(f"--resume {args.resume}: already has {start_step} steps; set --steps above {start_step} to continue it")
    # Every rank must hold the same model, data and settings, or the all-reduced gradients mean nothing.
    identity = (f"model {start.fingerprint}, data {data.digest()}, start step {start_step}, steps {args.steps}, "
                f"batch {args.batch_size}, streams {args.streams}, seed {args.seed}")
    group.agree("the model, data or settings", identity)

    comfy.model_management.load_models_gpu([model])
    device = model.load_device
    streams = [stream_generator(args.seed, k, start_step)
               for k in range(group.rank * args.streams, (group.rank + 1) * args.streams)]
    loss_fn = build_loss(base, data.conds, device, args.loss, args.seed)
    config = TrainConfig(steps=args.steps, lr_s_out=args.lr_s_out, lr_s_in=args.lr_s_in, train_s_in=args.train_s_in,
                         batch_size=args.batch_size, seed=args.seed, checkpointing=args.checkpointing,
                         grad_accumulation_steps=args.grad_accumulation_steps)
    train_s_in = trains_s_in(dm, config)
    sync = GradientAllReduce(group, core.get_router(dm).num_experts)
    resumed_from = str(args.resume) if args.resume else None
    stamps = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        if group.rank != 0:
            return
        if step == start_step + 1 or step % 10 == 0 or step == args.steps:
            log.info("step %d/%d loss %.5f (%.2f s)", step, args.steps, loss, stamps[-1] - stamps[-2])
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            info = _info(step, args.steps, True, resumed_from, group, args.streams, "checkpoint")
            core.save_scales(out, _live_scales(start, sync.params, train_s_in, info), dm)

    with torch.inference_mode(False), torch.enable_grad(), grad_ready(dm):
        # Contiguous copies: a channels-last latent makes every CPU convolution of a step many times slower.
        sets = [SampleSet(base.process_latent_in(lat.to(device)).float().contiguous(),
                          index if len(set(index)) > 1 else index[0])
                for lat, index in data.groups]
        result = train_scales(dm, start, sets, loss_fn, config, on_step, stop_exceptions=(CollectiveError,),
                              start_step=start_step, sync=sync, generators=streams)
    if result.partial:  # another rank failed: keep the last complete step, resumable, then stop like it
        if group.rank == 0 and result.steps_done > start_step:
            info = _info(result.steps_done, args.steps, True, resumed_from, group, args.streams, "a rank failed")
            try:
                core.save_scales(out, dataclasses.replace(result.scales, info=info), dm)
                log.warning("the scales of step %d were saved to %s (continue with --resume)", result.steps_done, out)
            except Exception as e:  # the others already know the run failed: report, do not fail a second time
                log.error("could not save the scales of step %d to %s: %s", result.steps_done, out, e)
        raise group.failure or CollectiveError("stopped")
    # Identical gradients and identical optimizer steps keep the ranks' scales bit-identical; check it, cheaply.
    group.agree("the trained scales", _digest(result.scales))
    record = {
        "world_size": group.world, "backend": group.backend or "none", "streams_per_rank": args.streams,
        "batch_size_per_rank": args.batch_size, "start_step": start_step, "steps_done": result.steps_done,
        "losses": [s["loss"] for s in group.traffic.steps], "experts": [s["experts"] for s in group.traffic.steps],
        "payload_bytes": [s["payload"] for s in group.traffic.steps],
        "socket_bytes": [s["written"] for s in group.traffic.steps],
        "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
        "scales_values": start.num_values(), "scales_fp32_bytes": 4 * start.num_values(),
    }
    if group.rank == 0:
        info = _info(result.steps_done, args.steps, False, resumed_from, group, args.streams)
        core.save_scales(out, dataclasses.replace(result.scales, info=info), dm)
        record["file_bytes"] = out.stat().st_size
        log.info("wrote %s (%d steps, %d process%s)", out, result.steps_done, group.world, "es" * (group.world > 1))
        if args.report:
            Path(args.report).write_text(json.dumps(record, indent=1))
    group.check(what="saved")  # a failed save on rank 0 ends every rank with its error
    return record


def encode(args: argparse.Namespace) -> None:
    """Pre-encode a folder of images and captions once, for runs on many processes."""
    sources.import_comfy(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    sources.pack()
    model = sources.load_model(args.model, args.bits, args.experts)
    enc = sources.encoders(model, args.vae, args.text_encoder, args.clip_type, args.resolution)
    data = data_mod.encode_folder(args.data, args.caption, enc.text, enc.vae, enc.resolution)
    data_mod.save(args.out, data)
    print(f"wrote {args.out}: {data.images} images, {len(data.captions)} captions", file=sys.stderr)
