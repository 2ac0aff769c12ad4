"""Train TuneQDM Scales: DreamBooth-style personalization of a quantized MODEL inside a graph.

Images are encoded once with the VAE and conditioning is reused, so neither the VAE nor the text
encoder needs to stay loaded during the steps. Each sample is noised with the model's own schedule and
scored in the model's own prediction space (eps, v or flow): the loss on the denoised estimate is
divided by d(denoised)/d(output), the factor that ComfyUI's `model_sampling` applies.
"""
from __future__ import annotations

import logging
import os
import time

import comfy.model_management
import comfy.utils
import torch

from ..tuneqdm_core import model_config, save_scales, scales_of
from ..tuneqdm_core.train import NonFiniteLossError, SampleSet, TrainConfig, train_scales
from . import folders
from .file_nodes import SCALES_TYPE
from .loss_plot import loss_curve_image
from .patcher import require_quantized, routing_of, with_routing
from .routing import sigma_of_timestep
from .trainable import grad_ready

CATEGORY = "TuneQDM"


def _latents(vae, images: torch.Tensor | None, resolution: int, what: str, base) -> torch.Tensor | None:
    if images is None:
        return None
    if images.shape[0] == 0:
        raise ValueError(f"{what}: empty image batch")
    pixels = comfy.utils.common_upscale(images[..., :3].movedim(-1, 1), resolution, resolution, "bilinear", "center")
    return base.process_latent_in(vae.encode(pixels.movedim(1, -1))).float()


def _cond_kwargs(base, conditioning, what: str, x: torch.Tensor, device) -> dict:
    if not conditioning:
        raise ValueError(f"{what}: empty conditioning")
    context, options = conditioning[0]
    params = dict(options, cross_attn=context.to(device).clone(), device=device, noise=x)
    conds = base.extra_conds(**params)
    # Clones: conditioning made under inference mode must not reach autograd as inference tensors.
    return {k: c.process_cond(batch_size=x.shape[0], device=device).cond.clone() for k, c in conds.items()}


class TrainScales:
    DESCRIPTION = ("Fine-tunes only the quantization scales of a TuneQDM MODEL on a few subject images "
                   "(DreamBooth-style): each step draws a timestep per sample and updates only that timestep's "
                   "expert. Interrupting stops after the current step and returns what was trained so far.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", SCALES_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("model", "scales", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("A clone of the MODEL sampling with the trained scales.", "The trained scales (wire into Save Scales).",
                       "Training loss per expert.", "Steps done, samples per expert, time.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A TuneQDM-quantized MODEL."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images once, before the steps."}),
                "instance_images": ("IMAGE", {"tooltip": "3-10 images of the subject; resized and center-cropped."}),
                "instance_conditioning": ("CONDITIONING", {"tooltip": "E.g. 'a photo of sks dog'."}),
                "steps": ("INT", {"default": 400, "min": 1, "max": 100000}),
                "lr_s_out": ("FLOAT", {"default": 3e-6, "min": 0.0, "max": 1.0, "step": 1e-7, "round": False,
                                       "tooltip": "Learning rate of the output-channel scales (near 1e-3..1e-2)."}),
                "lr_s_in": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                      "tooltip": "Learning rate of the input-channel scales (near 1): its own rate."}),
                "train_s_in": ("BOOLEAN", {"default": True, "tooltip": "Off: s_out only (PEQA-style)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                       "tooltip": "Training images are resized and center-cropped to this square size."}),
                "checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Activation checkpointing: less memory, "
                                                                          "about a third more time."}),
            },
            "optional": {
                "class_images": ("IMAGE", {"tooltip": "Prior preservation: images of the class (e.g. dogs)."}),
                "class_conditioning": ("CONDITIONING", {"tooltip": "E.g. 'a photo of a dog'."}),
                "prior_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}),
                "instance_images_2": ("IMAGE", {"tooltip": "A second subject's images (multi-subject)."}),
                "instance_conditioning_2": ("CONDITIONING", {"tooltip": "The second subject's prompt."}),
            },
        }

    def train(self, model, vae, instance_images, instance_conditioning, steps, lr_s_out, lr_s_in, train_s_in,
              batch_size, seed, resolution, checkpointing, class_images=None, class_conditioning=None,
              prior_weight=1.0, instance_images_2=None, instance_conditioning_2=None):
        require_quantized(model, "Train TuneQDM Scales")
        base = model.model
        dm = base.diffusion_model
        train_s_in = bool(train_s_in)
        if train_s_in and not model_config(dm).train_s_in:
            logging.info("TuneQDM train: this MODEL was quantized with s_out only (PEQA); s_in stays frozen")
            train_s_in = False
        sets = [(instance_images, instance_conditioning, False, "instance_images"),
                (instance_images_2, instance_conditioning_2, False, "instance_images_2"),
                (class_images, class_conditioning, True, "class_images")]
        for images, cond, _, what in sets:
            if (images is None) != (cond is None):
                raise ValueError(f"{what} and its conditioning must be connected together")
        encoded = [(_latents(vae, im, resolution, what, base), cond, prior) for im, cond, prior, what in sets if im is not None]

        comfy.model_management.load_models_gpu([model])
        device = model.load_device
        ms = base.model_sampling
        start = routing_of(model).scales or scales_of(dm)
        noise_gen = torch.Generator().manual_seed(seed + 1)

        def loss_fn(x0, t, cond_index):
            x0 = x0.to(device)
            sigma = sigma_of_timestep(ms, t).to(device)
            noise = torch.randn(x0.shape, generator=noise_gen).to(device)
            xt = ms.noise_scaling(sigma, noise, x0)
            kwargs = _cond_kwargs(base, encoded[cond_index][1], "conditioning", xt, device)
            denoised = base.apply_model(xt, sigma, transformer_options={}, **kwargs).float()
            slope = ms.calculate_denoised(sigma, torch.ones_like(xt), xt) - ms.calculate_denoised(sigma, torch.zeros_like(xt), xt)
            return ((denoised - x0) / slope).pow(2).flatten(1).mean(1)

        config = TrainConfig(steps=steps, lr_s_out=lr_s_out, lr_s_in=lr_s_in, train_s_in=train_s_in,
                             batch_size=batch_size, seed=seed, prior_weight=prior_weight, checkpointing=checkpointing)
        bar = comfy.utils.ProgressBar(steps)
        started = time.perf_counter()

        interrupted = False

        def on_step(step: int, loss: float) -> None:
            nonlocal interrupted
            if step == 1 or step % 10 == 0 or step == steps:
                logging.info("TuneQDM train: step %d/%d loss %.5f", step, steps, loss)
            try:
                bar.update_absolute(step, steps)
            except comfy.model_management.InterruptProcessingException:
                interrupted = True  # ComfyUI's progress hook saw the interrupt button (and cleared it)

        def should_stop() -> bool:
            nonlocal interrupted
            if comfy.model_management.processing_interrupted():
                comfy.model_management.interrupt_current_processing(False)  # handled: return what we have
                interrupted = True
            return interrupted

        try:
            with torch.inference_mode(False), torch.enable_grad(), grad_ready(dm):
                data = [SampleSet(lat.to(device).clone(), i, prior) for i, (lat, _, prior) in enumerate(encoded)]
                result = train_scales(dm, start, data, loss_fn, config, on_step, should_stop,
                                      stop_exceptions=(comfy.model_management.InterruptProcessingException,))
        except NonFiniteLossError as e:
            path = folders.output_path(time.strftime("tuneqdm_recovered_%Y%m%d-%H%M%S"))
            save_scales(path, e.result.scales, dm)
            raise RuntimeError(f"{e}; the last finite scales were saved to {path}") from None
        seconds = time.perf_counter() - started
        status = "PARTIAL (interrupted)" if result.partial else "complete"
        logging.info("TuneQDM train: %s, %d/%d steps in %.1f s", status, result.steps_done, steps, seconds)
        title = f"TuneQDM loss per expert: {result.steps_done}/{steps} steps, {status}, {seconds:.0f} s"
        curves = result.expert_curves(start.experts)
        curve = loss_curve_image(curves, steps, title)
        last = [f"{c[-1][1]:.4f}" if c else "-" for c in curves]
        report = (f"{status}: {result.steps_done}/{steps} steps in {seconds:.1f} s\n"
                  f"samples per expert: {[len(c) for c in curves]}\nlast loss per expert: {last}")
        trained = with_routing(model, routing_of(model).with_changes(scales=result.scales))
        return (trained, result.scales, curve, report)
