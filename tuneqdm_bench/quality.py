"""`python -m tuneqdm_bench quality`: the seed's DreamBooth comparison on the embedded default
model. Each row fine-tunes (or not) the model on the five images of the held-out digit with the prompt
"a sks digit", then samples that prompt and the ordinary prompts of the nine other digits, and is
scored by the bundled classifier (tuneqdm_demo.metrics) over several seeds: mean and spread.

Scale training is `tuneqdm_core.train.train_scales`, the Train TuneQDM Scales node's loop; float full
fine-tuning (DreamBooth) is plain AdamW on every weight with the same loss, data, steps and batch.
Sampling is DDIM with classifier-free guidance (no x0 clamping, like ComfyUI's samplers), every call
routed by its timestep.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tuneqdm_core.config import TuneQDMConfig
from tuneqdm_core.model import quantize_model, tensor_bytes
from tuneqdm_core.routing import NUM_TRAIN_TIMESTEPS
from tuneqdm_core.scales import scales_of
from tuneqdm_core.train import SampleSet, TrainConfig, train_scales
from tuneqdm_demo import data
from tuneqdm_demo.diffusion import Scales, ddim_sample
from tuneqdm_demo.diffusion import loss_fn as diffusion_loss
from tuneqdm_demo.files import MODEL_TYPE, UNET_FILE, UNET_FORMAT, load_file
from tuneqdm_demo.metrics import Judge, load_classifier
from tuneqdm_demo.model import alphas_cumprod, default_base_model
from tuneqdm_demo.text import TextEncoder
from tuneqdm_fixtures.host import import_comfy

LATENT_SHAPE = (4, 8, 8)
OTHER_DIGITS = [d for d in range(10) if d != data.SUBJECT_CLASS]


@dataclass(frozen=True)
class Row:
    name: str
    quant: TuneQDMConfig | None = None  # None: the float model
    train: str = "none"  # none | scales | full


ROWS = [
    Row("float, no fine-tuning"),
    Row("float full fine-tuning (DreamBooth)", train="full"),
    Row("W8, no fine-tuning", TuneQDMConfig(bits=8, experts=1)),
    Row("W4, no fine-tuning", TuneQDMConfig(bits=4, experts=1)),
    Row("PEQA W8", TuneQDMConfig.peqa(8), "scales"),
    Row("PEQA W4", TuneQDMConfig.peqa(4), "scales"),
    Row("MCSU only W4 (s_in, 1 expert)", TuneQDMConfig(bits=4, experts=1), "scales"),
    Row("TAS only W4 (s_out, 4 experts)", TuneQDMConfig(bits=4, experts=4, train_s_in=False), "scales"),
    Row("TuneQDM W8, 2 experts", TuneQDMConfig(bits=8, experts=2), "scales"),
    Row("TuneQDM W8, 4 experts", TuneQDMConfig(bits=8, experts=4), "scales"),
    Row("TuneQDM W4, 2 experts", TuneQDMConfig(bits=4, experts=2), "scales"),
    Row("TuneQDM W4, 4 experts", TuneQDMConfig(bits=4, experts=4), "scales"),
    Row("TuneQDM W4, 8 experts", TuneQDMConfig(bits=4, experts=8), "scales"),
    Row("TuneQDM W4, 4 experts, s_in ~ N(1, 0.01)", TuneQDMConfig(bits=4, experts=4, s_in_init="normal"), "scales"),
]
METRICS = ("subject_fidelity", "subject_accuracy", "prompt_fidelity")
V_PREDICTION = MODEL_TYPE == "V_PREDICTION"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        state, self.info = load_file(UNET_FILE, UNET_FORMAT)
        import_comfy()
        base = default_base_model(state)
        self.float_net = base.diffusion_model.eval().requires_grad_(False)
        self.alphas = alphas_cumprod(base)
        encoder = TextEncoder()
        self.subject_ctx = encoder.encode(data.SUBJECT_PROMPT)[0]
        self.uncond = encoder.encode("")[0]
        self.digit_ctx = {d: encoder.encode(data.caption(d))[0] for d in OTHER_DIGITS}
        images = data.subject_images()
        self.subject_latents = data.grey_to_latent(data.image_to_grey(images)) * data.LATENT_SCALE
        self.judge = Judge(load_classifier(), images, data.SUBJECT_CLASS)

    def model_for(self, row: Row, seed: int) -> tuple[nn.Module, Scales | None, float]:
        """-> (the model after the row's fine-tuning, trained scales to sample with, training seconds)."""
        net = copy.deepcopy(self.float_net)
        if row.quant is not None:
            quantize_model(net, dataclasses.replace(row.quant, seed=seed))
        gen = torch.Generator().manual_seed(seed)
        loss_fn = diffusion_loss(net, self.alphas, [self.subject_ctx], gen, V_PREDICTION)
        samples = [SampleSet(self.subject_latents, 0)]
        a = self.args
        start, scales = time.perf_counter(), None
        if row.train == "scales":
            # s_out starts at the quantization step, 17x smaller at W8 than at W4: the same relative rate
            # needs a learning rate in proportion (one absolute rate over-trains W8 until every prompt
            # draws the subject).
            lr_s_out = a.lr_s_out * (2 ** 4 - 1) / (2 ** row.quant.bits - 1)
            config = TrainConfig(steps=a.steps, batch_size=a.batch, seed=seed, lr_s_out=lr_s_out, lr_s_in=a.lr_s_in,
                                 train_s_in=row.quant.train_s_in, checkpointing=False)
            scales = train_scales(net, scales_of(net), samples, loss_fn, config).scales.tensors
        elif row.train == "full":
            self._full_finetune(net, loss_fn, seed)
        return net.eval().requires_grad_(False), scales, time.perf_counter() - start

    def _full_finetune(self, net: nn.Module, loss_fn, seed: int) -> None:
        a = self.args
        net.train().requires_grad_(True)
        opt = torch.optim.AdamW(net.parameters(), lr=a.lr_full, weight_decay=1e-2)
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(a.steps):
            idx = torch.randint(len(self.subject_latents), (a.batch,), generator=gen)
            t = torch.rand(a.batch, generator=gen) * NUM_TRAIN_TIMESTEPS
            loss = loss_fn(self.subject_latents[idx], t, 0).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()

    def sample(self, net: nn.Module, scales: Scales | None, context: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x0 = ddim_sample(net, self.alphas, context, self.uncond, n, LATENT_SHAPE, self.args.sample_steps,
                         self.args.cfg, gen, V_PREDICTION, scales)
        return data.grey_to_image(data.latent_to_grey(x0 / data.LATENT_SCALE))

    def score(self, net: nn.Module, scales: Scales | None, seed: int) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        a = self.args
        subject = self.sample(net, scales, self.subject_ctx, a.samples, 10_000 + seed)
        digits = torch.tensor(OTHER_DIGITS).repeat_interleave(a.prompt_samples)
        others = self.sample(net, scales, torch.cat([self.digit_ctx[int(d)] for d in digits]), len(digits),
                             20_000 + seed)
        scores = {"subject_fidelity": self.judge.subject_fidelity(subject),
                  "subject_accuracy": self.judge.subject_accuracy(subject),
                  "prompt_fidelity": float((self.judge.predictions(others) == digits).float().mean())}
        return scores, subject, others[::a.prompt_samples]


def _grid(rows: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """One line per row: its first subject samples, then one sample per other digit's prompt."""
    from PIL import Image

    cell = rows[0][1].shape[1]
    width = max(len(r[1]) for r in rows)
    canvas = torch.ones(len(rows) * (cell + 4), width * (cell + 2), 3)
    for i, (_, images) in enumerate(rows):
        for j, img in enumerate(images):
            y, x = i * (cell + 4), j * (cell + 2)
            canvas[y:y + cell, x:x + cell] = img
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray((canvas.clamp(0, 1) * 255).byte().numpy()).save(tmp)
    tmp.replace(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps; at batch 4, the 400 samples of the paper's 400 steps at batch 1")
    p.add_argument("--batch", type=int, default=4)
    # The paper's rate, relative: 400 steps of 3e-6 can move an SD1.x s_out (about 5e-3) by about 24%, and
    # s_in (about 1) by 0.1%; here 100 steps may move s_out (median step 0.018 at W4) and s_in by about 24%.
    p.add_argument("--lr-s-out", type=float, default=4e-5, help="at W4; scaled by the quantization step for other bits")
    p.add_argument("--lr-s-in", type=float, default=2.4e-3)
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--samples", type=int, default=32, help="'a sks digit' samples per seed")
    p.add_argument("--prompt-samples", type=int, default=8, help="samples per other digit's prompt per seed")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--rows", default="", help="comma-separated row numbers (1-based) to run; default all")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG of sample grids (first seed) here")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    bench = Bench(args)
    chosen = [ROWS[int(i) - 1] for i in args.rows.split(",")] if args.rows else ROWS
    results, grid = [], []
    for row in chosen:
        per_seed, seconds = [], []
        for seed in range(args.seeds):
            net, scales, secs = bench.model_for(row, seed)
            scores, subject, others = bench.score(net, scales, seed)
            per_seed.append(scores)
            seconds.append(secs)
            if seed == 0:
                grid.append((row.name, torch.cat([subject[:8], others])))
            print(f"[quality] {row.name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                  file=sys.stderr, flush=True)
        results.append({"row": row.name, "weight_bytes": tensor_bytes(net), "train_seconds": statistics.fmean(seconds),
                        **{m: (statistics.fmean(s[m] for s in per_seed),
                               statistics.pstdev(s[m] for s in per_seed)) for m in METRICS}})
    if args.grid is not None:
        _grid(grid, args.grid)
    settings = {k: v for k, v in vars(args).items() if k not in ("grid", "json", "command")}
    if args.json:
        print(json.dumps({"settings": settings, "model": bench.info, "rows": results}, indent=1, default=str))
    else:
        print(f"settings: {settings}")
        print(table(results))
    return 0


def table(results: list[dict]) -> str:
    """The README's markdown table: mean ± spread (population std over seeds) per metric."""
    lines = ["| row | subject fidelity (cos) | subject accuracy | prompt fidelity | weight bytes | train s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        cells = " | ".join(f"{r[m][0]:.3f} ± {r[m][1]:.3f}" for m in METRICS)
        lines.append(f"| {r['row']} | {cells} | {r['weight_bytes']:,} | {r['train_seconds']:.1f} |")
    return "\n".join(lines)
