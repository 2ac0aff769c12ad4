"""Trains the pack's embedded default and writes it to assets/ (atomically):

1. the digit classifier of the quality metrics (all ten digits; seconds);
2. the text-conditioned UNet: a ComfyUI SD1.5-family model (tuneqdm_demo.files.UNET_CONFIG) on the
   digits of every class but the subject's, captioned "a handwritten digit seven" etc. through MiniLM,
   v-prediction (see files.MODEL_TYPE) with the model's own SD1.5 noise schedule. 10% of captions are
   empty (classifier-free guidance) and 10% are the bare class prompt "a handwritten digit". The EMA of
   the weights is saved.

Reproducible: a seed and a step count (not a time budget). `--steps 3000` took 18 minutes on one core of
the 2-core machine this was made on, while other work used the other.
    .venv/bin/python -m tuneqdm_demo.train [--steps N] [--seed S]

ComfyUI's classes build the UNet: the checkout's host is imported as a library (tuneqdm_fixtures.host).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch
import torch.nn.functional as F

from . import files
from .classifier import train_classifier
from .core import NUM_TRAIN_TIMESTEPS
from .data import CLASS_PROMPT, LATENT_SCALE, SUBJECT_CLASS, caption, grey_to_latent, load_digits
from .model import alphas_cumprod, default_base_model
from .text import TextEncoder

EMA_DECAY = 0.999


def train_unet(steps: int, batch: int, seed: int, lr: float) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits().without_class(SUBJECT_CLASS)
    # What ComfyUI's process_latent_in makes of the codec's latents: training sees what sampling sees.
    x0_all = grey_to_latent(data.images) * LATENT_SCALE
    encoder = TextEncoder()
    # Context per image for each caption kind: 0 its digit's caption, 1 the bare class prompt, 2 empty.
    per_digit = torch.cat([encoder.encode(caption(d))[0] for d in range(10)])
    bare, empty = encoder.encode(CLASS_PROMPT)[0], encoder.encode("")[0]
    base = default_base_model()
    net = base.diffusion_model.train()
    alphas = alphas_cumprod(base)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    params = sum(p.numel() for p in net.parameters())
    print(f"[train] UNet: {params:,} parameters, {len(x0_all)} training digits (class {SUBJECT_CLASS} held out), "
          f"{steps} steps of {batch}", flush=True)
    start, running = time.perf_counter(), None
    for step in range(steps):
        idx = torch.randint(len(x0_all), (batch,), generator=gen)
        x0, labels = x0_all[idx], data.labels[idx]
        kind = torch.bucketize(torch.rand(batch, generator=gen), torch.tensor([0.8, 0.9]))
        context = torch.where((kind == 0).view(-1, 1, 1), per_digit[labels],
                              torch.where((kind == 1).view(-1, 1, 1), bare, empty))
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=gen)
        pred = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), context=context)
        loss = F.mse_loss(pred, a.sqrt() * eps - (1 - a).sqrt() * x0)  # v-prediction
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 1 - EMA_DECAY)
        value = loss.item()
        running = value if running is None else 0.99 * running + 0.01 * value
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"[train] step {step + 1}/{steps} loss {running:.4f} {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    state = {k: v.detach().to(torch.float16) for k, v in ema.state_dict().items()}
    info = {"unet_config": files.UNET_CONFIG, "parameters": params, "steps": steps, "batch": batch, "seed": seed,
            "lr": lr, "ema_decay": EMA_DECAY, "model_type": files.MODEL_TYPE, "subject_class": SUBJECT_CLASS,
            "final_loss": running,
            "train_seconds": round(seconds, 1), "torch": torch.__version__}
    return state, info


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tuneqdm_demo.train", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-classifier", action="store_true")
    args = p.parse_args()
    from tuneqdm_fixtures.host import import_comfy

    import_comfy()
    if not args.skip_classifier:
        start = time.perf_counter()
        classifier, accuracy = train_classifier(load_digits(), seed=args.seed)
        files.save_file(files.CLASSIFIER_FILE, files.CLASSIFIER_FORMAT, classifier.state_dict(),
                        {"accuracy_on_held_out_20pct": accuracy, "seed": args.seed,
                         "train_seconds": round(time.perf_counter() - start, 1)})
        print(f"[train] classifier: {accuracy:.3f} accuracy on the 20% it did not see -> {files.CLASSIFIER_FILE}")
    state, info = train_unet(args.steps, args.batch, args.seed, args.lr)
    files.save_file(files.UNET_FILE, files.UNET_FORMAT, state, info)
    print(f"[train] UNet -> {files.UNET_FILE} ({files.UNET_FILE.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
