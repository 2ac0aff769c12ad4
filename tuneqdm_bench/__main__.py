"""`python -m tuneqdm_bench <command> ...`

Each command is a module of this package with `add_arguments(parser)` and `main(args) -> int`;
adding one is one line in COMMANDS. Only the chosen command's module is imported.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "memory": ("tuneqdm_bench.memory", "peak memory and time of one training step, per variant"),
    "train-memory": ("tuneqdm_bench.train_memory", "the training node's path: peak memory and step time"),
    "kernels": ("tuneqdm_bench.kernels", "fused quantized Linear per shape, and one SD 1.5 UNet sampling step"),
    "quality": ("tuneqdm_bench.quality", "the seed's DreamBooth comparison on the embedded default model"),
    "peers": ("tuneqdm_bench.peers", "each graph in its own ComfyUI server: peak memory against ComfyUI's tools"),
    "lora": ("tuneqdm_bench.lora", "one W4 SD 1.5 UNet step with and without a rank-16 LoRA at call time"),
    "fidelity": ("tuneqdm_bench.fidelity", "latent distance to fp32 against ComfyUI-GGUF Q8_0/Q4_0, and accuracy on real weights"),
    "families": ("tuneqdm_bench.families", "SDXL, SD3.5, Flux, Wan at full size: quantize time, bytes, steps, training peak"),
    "distributed": ("tuneqdm_bench.distributed", "headless training under torchrun: bytes per step, step time 1 vs 2 processes"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m tuneqdm_bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
