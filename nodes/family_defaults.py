"""The layers each model family keeps in float when `keep_float` says `auto`.

Kept: the layers that embed the timestep, the text or pooled conditioning and the latent's channels, and
the final projection. The first feed every block and the last writes the prediction itself, so their
rounding error is not averaged out by anything downstream (Q-Diffusion and PTQ4DM keep the first and last
layers in full precision for this reason); together they are under 1% of each family's parameters.
Modulation projections stay quantized in every family: they are 27% of Flux dev and 31% of SD3.5, which
would undo the memory the pack exists for.

SD 1.x / 2.x keep nothing: the method (METHOD.md) quantizes every Linear and Conv2d of their UNet,
time embedding and conv_in/conv_out included, and its published figures are for that.
"""
from __future__ import annotations

from dataclasses import replace

from ..tuneqdm_core import TuneQDMConfig

AUTO = "auto"

# Keyed by ComfyUI's supported_models class names; subclasses (SSD1B, FluxSchnell, WAN21_I2V...) inherit.
KEEP_FLOAT_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "SDXL": ("time_embed.*", "label_emb.*", "input_blocks.0.0", "out.2"),
    "SD3": ("x_embedder.*", "t_embedder.*", "y_embedder.*", "context_embedder", "final_layer.linear"),
    "Flux": ("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.linear"),
    "WAN21_T2V": ("text_embedding.*", "time_embedding.*", "head.head"),
}


def family_of(model_config: object) -> str | None:
    """The table's family for a ComfyUI model config, by its class or the nearest base class listed."""
    for cls in type(model_config).__mro__:
        if cls.__name__ in KEEP_FLOAT_BY_FAMILY:
            return cls.__name__
    return None


def resolve_keep_float(config: TuneQDMConfig, model_config: object) -> tuple[TuneQDMConfig, str | None]:
    """`config` with the `auto` entry of keep_float replaced by the family's patterns (the other patterns
    stay), and a note for the report saying what `auto` chose; (config, None) when `auto` is not used."""
    if AUTO not in config.keep_float:
        return config, None
    family = family_of(model_config)
    chosen = KEEP_FLOAT_BY_FAMILY[family] if family else ()
    rest = tuple(p for p in config.keep_float if p != AUTO)
    name = type(model_config).__name__ if model_config is not None else "a model without a ComfyUI model config"
    if chosen:
        note = f"keep_float auto for {name}: {', '.join(chosen)}"
    else:
        note = f"keep_float auto for {name}: no layer kept in float (every Linear/Conv2d quantized)"
    return replace(config, keep_float=tuple(dict.fromkeys(chosen + rest))), note
