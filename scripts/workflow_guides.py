"""What the UI format of each example workflow adds to its API graph: titled groups and a note.

`scripts/workflows.py` lays a workflow out from its guide: the note on top, then the groups in columns
(left to right), each column's groups stacked top to bottom; group titles are numbered in that reading
order. Every node of the API graph belongs to exactly one group. None of this reaches the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    title: str
    nodes: tuple[int, ...]


@dataclass(frozen=True)
class Guide:
    note: str  # Markdown: what the workflow does, then what to change first
    columns: tuple[tuple[Group, ...], ...]


GUIDES: dict[str, Guide] = {
    "default_model_demo": Guide(
        note=(
            "## TuneQDM on the embedded default model (no files needed)\n"
            "Loads the pack's small digits model, quantizes its UNet to **W4** with 4 timestep experts, trains "
            "TuneQDM scales on five images of a zero (a digit it never saw) with the prompt *a sks digit*, then "
            "samples that prompt and two ordinary ones from the float model, the W4 model before training and the "
            "W4 TuneQDM model (8 images each).\n\n"
            "**Change first:** `steps` in *Train TuneQDM Scales* (its 100 steps take about 30 s on a quiet "
            "2-core CPU), the prompts in group 2, or the quantizer's `bits`."
        ),
        columns=(
            (Group("1. Load", (1, 7)), Group("2. Prompts and latent", (2, 3, 4, 5, 13))),
            (Group("3. Quantize", (6, 11)), Group("4. Train and save scales", (8, 9, 10, 12))),
            (Group("5. Sample: float", (14, 15, 16, 17, 18, 19, 20, 21, 22)),
             Group("6. Sample: W4 before training", (23, 24, 25, 26, 27, 28, 29, 30, 31)),
             Group("7. Sample: W4 TuneQDM", (32, 33, 34, 35, 36, 37, 38, 39, 40))),
        ),
    ),
    "float_vs_w8_vs_w4": Guide(
        note=(
            "## Float vs W8 vs W4, side by side\n"
            "Samples one prompt with the same seed from the float UNet and from W8 and W4 copies made by "
            "*Quantize UNet (TuneQDM)*, and saves the three images as one batch.\n\n"
            "**Change first:** the checkpoint in *Load Checkpoint*, then the prompt."
        ),
        columns=(
            (Group("1. Load", (1,)), Group("2. Prompts and latent", (2, 3, 4))),
            (Group("3. Quantize", (7, 10)),),
            (Group("4. Sample", (5, 6, 8, 9, 11, 12)),),
            (Group("5. Compare", (13, 14, 15)),),
        ),
    ),
    "load_quantized_and_scales": Guide(
        note=(
            "## Sample from saved files\n"
            "Loads a quantized UNet (`models/tuneqdm/unet/`) and a scales file (`models/tuneqdm/scales/`), "
            "then samples with each step routed to the expert of its timestep. Text encoder and VAE come from "
            "the checkpoint. Run *quantize_and_sample* or *train_subject* first to make the files.\n\n"
            "**Change first:** `unet_name` and `scales_name`, then the checkpoint (the one the UNet came from)."
        ),
        columns=(
            (Group("1. Load", (1, 2, 3)), Group("2. Prompts and latent", (4, 5, 6))),
            (Group("3. Sample", (7, 8, 9, 10)),),
        ),
    ),
    "quantize_and_sample": Guide(
        note=(
            "## Quantize, sample, save\n"
            "Quantizes the checkpoint's UNet to **W4** with 4 timestep experts (untrained scales), samples with "
            "expert routing, and saves the quantized UNet and its scales for *load_quantized_and_scales*.\n\n"
            "**Change first:** the checkpoint in *Load Checkpoint*, then `bits` and `experts` in the quantizer."
        ),
        columns=(
            (Group("1. Load", (1,)), Group("2. Prompts and latent", (4, 5, 6))),
            (Group("3. Quantize and save", (2, 3, 11, 12)),),
            (Group("4. Sample", (7, 8, 9, 10)),),
        ),
    ),
    "train_subject": Guide(
        note=(
            "## Teach a W4 model a subject (TuneQDM)\n"
            "Quantizes the UNet to W4, trains only its quantization scales on three images of your subject with "
            "the prompt *a photo of sks dog*, saves the scales, and samples the trained model.\n\n"
            "**Change first:** the three subject images (put them in ComfyUI's `input/`), the instance prompt, "
            "and `steps` in *Train TuneQDM Scales* (400 at 512 px takes long on a CPU)."
        ),
        columns=(
            (Group("1. Load model and subject images", (1, 4, 5, 6, 7, 8)),),
            (Group("2. Quantize", (2,)), Group("3. Train and save scales", (3, 9, 10, 11, 12))),
            (Group("4. Sample the trained model", (13, 14, 15, 16, 17, 18)),),
        ),
    ),
}
