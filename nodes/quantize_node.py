"""Quantize UNet (TuneQDM)."""
from __future__ import annotations

import logging

from ..tuneqdm_core import TuneQDMConfig
from .patcher import progress_callback, quantize_patcher

CATEGORY = "TuneQDM"
SCALE_MODES = ("s_out and s_in (TuneQDM)", "s_out only (PEQA)")


class QuantizeUNet:
    DESCRIPTION = ("Quantizes every Linear/Conv2d of the diffusion model to 4 or 8 bits (per output channel, "
                   "round-to-nearest) and gives it trainable separable scales, one set per timestep expert. "
                   "The input MODEL is left untouched.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("A new quantized MODEL (the input is not modified).",
                       "Layers converted and kept in float, weight bytes before and after.")
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Any diffusion model ComfyUI loads (SD 1.x, SDXL, SD3, Flux...)."}),
            "bits": (["4", "8"], {"default": "4", "tooltip": "Weight bits. W4 packs two weights per byte."}),
            "experts": ("INT", {"default": 4, "min": 1, "max": 8,
                                "tooltip": "Timestep experts: the 1000 timesteps are split into this many equal "
                                           "intervals, each with its own scales. 1 = no timestep experts."}),
            "scales": (list(SCALE_MODES), {"default": SCALE_MODES[0],
                                           "tooltip": "Which scales training may change. PEQA (the baseline) "
                                                      "trains s_out only, with 1 expert."}),
            "s_in_init": (["ones", "normal"], {"default": "ones",
                                               "tooltip": "Initial input-channel scales: all 1 (reference code) "
                                                          "or N(1, 0.01) (paper)."}),
            "keep_float": ("STRING", {"default": "", "multiline": False,
                                      "tooltip": "Comma-separated layer-name patterns to leave in float, "
                                                 "e.g. '*conv_in*, *out.2*'. Empty: quantize all."}),
        }}

    def quantize(self, model, bits, experts, scales, s_in_init, keep_float):
        bits = int(bits)
        patterns = tuple(p.strip() for p in keep_float.split(",") if p.strip())
        config = TuneQDMConfig(bits=bits, experts=experts, train_s_in=scales == SCALE_MODES[0],
                               s_in_init=s_in_init, keep_float=patterns)
        quantized, report = quantize_patcher(model, config, progress=progress_callback())
        text = report.summary()
        logging.info(text)
        print(text)
        return (quantized, text)
