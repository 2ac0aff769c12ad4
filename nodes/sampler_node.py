"""Expert-Routed Sampler (TuneQDM): KSampler with an explicit routing policy and a routing summary."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..tuneqdm_core import get_router
from ..tuneqdm_core.routing import NUM_TRAIN_TIMESTEPS, ROUTING_MODES, TIMESTEP_RANGE, RoutingLog, RoutingPolicy
from .patcher import require_quantized, routing_of, with_routing

CATEGORY = "TuneQDM"


class ExpertRoutedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMExpertRoutedSampler",
            display_name="Expert-Routed Sampler (TuneQDM)",
            category=CATEGORY,
            description=("KSampler for TuneQDM models that states how timesteps pick experts and reports which "
                         "expert served each step. Stock samplers route by timestep intervals too; this node makes "
                         "it explicit."),
            inputs=[
                io.Model.Input("model", tooltip="A TuneQDM-quantized MODEL."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Noise schedule."),
                io.Conditioning.Input("positive", tooltip="What to include."),
                io.Conditioning.Input("negative", tooltip="What to exclude."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run."),
                io.Combo.Input("routing", options=list(ROUTING_MODES), default=ROUTING_MODES[0],
                               tooltip=f"timestep intervals: N equal intervals of {TIMESTEP_RANGE} (as trained by "
                                       "default). custom boundaries: your own cut points. fixed expert: one expert "
                                       "for every step."),
                io.String.Input("boundaries", default="250, 500, 750",
                                tooltip=f"For custom boundaries: N-1 increasing timesteps in {TIMESTEP_RANGE} (of "
                                        f"the {NUM_TRAIN_TIMESTEPS} training timesteps)."),
                io.Int.Input("fixed_expert", default=0, min=0, max=63, tooltip="For fixed expert: its index."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The denoised latent."),
                     io.String.Output(display_name="routing", tooltip="Which expert served each model call.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                routing, boundaries, fixed_expert) -> io.NodeOutput:
        from nodes import common_ksampler  # ComfyUI's own KSampler body

        require_quantized(model, "Expert-Routed Sampler")
        num_experts = get_router(model.model.diffusion_model).num_experts
        policy = RoutingPolicy.from_inputs(routing, boundaries, fixed_expert)
        policy.check(num_experts)  # before sampling starts
        log = RoutingLog()
        routed = with_routing(model, routing_of(model).with_changes(policy=policy, log=log))
        (latent,) = common_ksampler(routed, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                    latent_image, denoise=denoise)
        return io.NodeOutput(latent, log.summary(num_experts))
