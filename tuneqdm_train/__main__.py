"""`python -m tuneqdm_train train|encode ...`: train TuneQDM scales headless, as one process or under torchrun.

    python -m tuneqdm_train train --model default --data images/ --caption "a sks digit" --out sks.safetensors
    torchrun --nproc_per_node 2 -m tuneqdm_train train --model unet.safetensors --data data.safetensors --out s.safetensors

A rank that fails tells the others, which stop with its rank and error; every rank exits non-zero.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from tuneqdm_core.errors import CollectiveError

from . import distributed, trainer


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="`default` (the embedded digits model, quantized here) or a "
                   "quantized-model .safetensors file from Save Quantized UNet")
    p.add_argument("--bits", type=int, default=4, help="with --model default: weight bits")
    p.add_argument("--experts", type=int, default=4, help="with --model default: timestep experts")
    p.add_argument("--caption", help="caption of images without a .txt beside them")
    p.add_argument("--vae", help="VAE .safetensors (not needed for the default model)")
    p.add_argument("--text-encoder", help="text encoder .safetensors (not needed for the default model)")
    p.add_argument("--clip-type", default="stable_diffusion", help="ComfyUI CLIPType of --text-encoder")
    p.add_argument("--resolution", type=int, help="square size images are resized to (default 64 for the default "
                   "model, else 512)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m tuneqdm_train", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train scales (one process, or every rank under torchrun)")
    _model_arguments(t)
    t.add_argument("--data", required=True, help="a folder of images (+ .txt captions) or pre-encoded .safetensors")
    t.add_argument("--out", required=True, help="the scales file rank 0 writes (.safetensors)")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=1, help="samples per step on each rank")
    t.add_argument("--streams", type=int, default=1, help="seed streams per rank, the batch split evenly over them: one "
                   "process with --streams W --batch-size W*b draws what W ranks at --batch-size b draw")
    t.add_argument("--lr-s-out", type=float, default=3e-6)
    t.add_argument("--lr-s-in", type=float, default=1e-4)
    t.add_argument("--no-s-in", dest="train_s_in", action="store_false", help="train s_out only")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--loss", default="MSE", help="MSE, L1, Huber or SmoothL1")
    t.add_argument("--grad-accumulation-steps", type=int, default=1)
    t.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="no activation checkpointing (faster, more memory)")
    t.add_argument("--save-every", type=int, default=0, help="rank 0 also writes --out every this many steps "
                   "(marked partial, resumable)")
    t.add_argument("--resume", help="a scales file of an earlier run (e.g. a partial --out): continue up to --steps")
    t.add_argument("--report", help="rank 0 writes the run's record (losses, experts, bytes exchanged) as JSON here")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait for the other ranks")
    e = sub.add_parser("encode", help="encode a folder of images and captions once, for `train --data`")
    _model_arguments(e)
    e.add_argument("--data", required=True, help="the folder of images")
    e.add_argument("--out", required=True, help="the .safetensors file to write")
    return top


class Terminated(Exception):
    """A signal to stop (torchrun's agent stopping its workers, a Ctrl-C): handled like any failure, so that
    the other ranks are told and an atomic write in progress removes its temporary file."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


@record  # under torchrun: the failing rank's error goes into the agent's failure summary
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "encode":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("encode runs as one process (not under torchrun)")
        trainer.encode(args)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    group = distributed.start(args.timeout)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[rank {group.rank}/{group.world}] %(message)s" if group.distributed else "%(message)s")
    log = logging.getLogger("tuneqdm_train")
    try:
        trainer.run(args, group)
        return 0
    except CollectiveError as e:  # every rank raised it: nobody to tell
        log.error("stopped: %s", e)
        group.finish()
        raise
    except BaseException as e:
        message = f"{type(e).__name__}: {e}"
        log.error("failed: %s", message)  # the traceback follows, from the interpreter
        group.fail(message)
        raise
    finally:
        group.close()


if __name__ == "__main__":
    sys.exit(main())
