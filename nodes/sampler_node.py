"""Expert-Routed Sampler (TuneQDM): KSampler with an explicit routing policy and a routing summary."""
from __future__ import annotations

import comfy.samplers

from ..tuneqdm_core import get_router
from ..tuneqdm_core.routing import NUM_TRAIN_TIMESTEPS, ROUTING_MODES, TIMESTEP_RANGE, RoutingLog, RoutingPolicy
from .patcher import require_quantized, routing_of, with_routing

CATEGORY = "TuneQDM"


class ExpertRoutedSampler:
    DESCRIPTION = ("KSampler for TuneQDM models that states how timesteps pick experts and reports which expert "
                   "served each step. Stock samplers route by timestep intervals too; this node makes it explicit.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "routing")
    OUTPUT_TOOLTIPS = ("The denoised latent.", "Which expert served each model call.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A TuneQDM-quantized MODEL."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampling algorithm."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Noise schedule."}),
            "positive": ("CONDITIONING", {"tooltip": "What to include."}),
            "negative": ("CONDITIONING", {"tooltip": "What to exclude."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to denoise."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Fraction of the schedule to run."}),
            "routing": (list(ROUTING_MODES), {"default": ROUTING_MODES[0],
                                              "tooltip": f"timestep intervals: N equal intervals of {TIMESTEP_RANGE} "
                                                         "(as trained by default). custom boundaries: your own cut points. "
                                                         "fixed expert: one expert for every step."}),
            "boundaries": ("STRING", {"default": "250, 500, 750",
                                      "tooltip": "For custom boundaries: N-1 increasing timesteps in "
                                                 f"{TIMESTEP_RANGE} (of the {NUM_TRAIN_TIMESTEPS} training timesteps)."}),
            "fixed_expert": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": "For fixed expert: its index."}),
        }}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               routing, boundaries, fixed_expert):
        from nodes import common_ksampler  # ComfyUI's own KSampler body

        require_quantized(model, "Expert-Routed Sampler")
        num_experts = get_router(model.model.diffusion_model).num_experts
        policy = RoutingPolicy.from_inputs(routing, boundaries, fixed_expert)
        policy.check(num_experts)  # before sampling starts
        log = RoutingLog()
        routed = with_routing(model, routing_of(model).with_changes(policy=policy, log=log))
        (latent,) = common_ksampler(routed, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                    latent_image, denoise=denoise)
        return (latent, log.summary(num_experts))
