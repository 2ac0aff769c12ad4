"""Train TuneQDM Scales: DreamBooth-style personalization of a quantized MODEL inside a graph.

Training data comes as an IMAGE batch encoded here with the VAE, or as ComfyUI's dataset lists (latents
and one caption's conditioning per image, resolution buckets of several sizes). Latents are made once,
so neither the VAE nor the text encoder needs to stay loaded during the steps. Each sample is noised
with the model's own schedule and scored in the model's own prediction space (eps, v or flow): the
error on the denoised estimate is divided by d(denoised)/d(output), the factor that ComfyUI's
`model_sampling` applies.

The cancel button ends the prompt as interrupted (ComfyUI's own state: nothing downstream runs, nothing
is cached), after the scales of the last complete step are saved under a new name marked partial; the
`resume` input continues from such a file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Callable

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..tuneqdm_core import get_router, load_scales, model_config, save_scales, scales_of
from ..tuneqdm_core.train import NonFiniteLossError, SampleSet, TrainConfig, TrainResult, train_scales
from . import folders, lora
from .dataset_inputs import LatentGroup, conditioning_per_image, group_latents, images_to_batch
from .file_nodes import Scales, describe, fingerprint_of
from .loss_plot import loss_curve_image
from .patcher import require_quantized, routing_of, with_routing
from .routing import sigma_of_timestep
from .trainable import grad_ready

CATEGORY = "TuneQDM"
NO_RESUME = "[None]"
LOSS_FUNCTIONS = {
    "MSE": lambda err: err.pow(2),
    "L1": lambda err: err.abs(),
    "Huber": lambda err: torch.nn.functional.huber_loss(err, torch.zeros_like(err), reduction="none"),
    "SmoothL1": lambda err: torch.nn.functional.smooth_l1_loss(err, torch.zeros_like(err), reduction="none"),
}


def _cond_kwargs(base, pair, x: torch.Tensor, device) -> dict:
    context, options = pair
    params = dict(options, cross_attn=context.to(device).clone(), device=device, noise=x)
    conds = base.extra_conds(**params)
    # Clones: conditioning made under inference mode must not reach autograd as inference tensors.
    return {k: c.process_cond(batch_size=x.shape[0], device=device).cond.clone() for k, c in conds.items()}


def prediction_loss(base, conds: list, device, error_of, noise) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The training loss of `base` (a ComfyUI BaseModel) for train_scales: each sample noised with the model's own
    schedule and scored in its own prediction space; `conds[i]` is a [context, options] pair, `error_of` one of
    LOSS_FUNCTIONS, `noise(x0, t)` the noise for a batch. Shared with the headless trainer (tuneqdm_train)."""
    ms = base.model_sampling

    def loss_fn(x0, t, cond_index):
        eps = noise(x0, t)
        x0 = x0.to(device)
        sigma = sigma_of_timestep(ms, t).to(device)
        xt = ms.noise_scaling(sigma, eps.to(device), x0)
        kwargs = _cond_kwargs(base, conds[cond_index], xt, device)
        denoised = base.apply_model(xt, sigma, transformer_options={}, **kwargs).float()
        slope = ms.calculate_denoised(sigma, torch.ones_like(xt), xt) - ms.calculate_denoised(sigma, torch.zeros_like(xt), xt)
        return error_of((denoised - x0) / slope).flatten(1).mean(1)

    return loss_fn


def _first(value, default=None):
    """INPUT_IS_LIST hands every input over as a list: the widget's value, or an unconnected optional's default."""
    if value is None:
        return default
    return value[0] if isinstance(value, list) else value


def _encode_images(vae, images: list, resolution: int, base, what: str) -> torch.Tensor:
    def resize(image: torch.Tensor) -> torch.Tensor:
        return comfy.utils.common_upscale(image.movedim(-1, 1), resolution, resolution, "bilinear", "center").movedim(1, -1)

    pixels = images_to_batch(images, what, resize)
    return base.process_latent_in(vae.encode(pixels)).float()


def _gather(base, vae, resolution: int, images, latents, conditioning, what: str,
            cond_what: str) -> tuple[list[LatentGroup], list]:
    """One kind of training data (a subject, class images) -> latent groups of one size each, and their conditioning."""
    if images is not None and latents is not None:
        raise ValueError(f"connect either {what} (with a vae) or latents, not both")
    if conditioning is None:
        raise ValueError(f"{what} and {cond_what} must be connected together")
    if latents is not None:
        groups, pairs = group_latents(latents, conditioning, "latents", cond_what)
        return [LatentGroup(base.process_latent_in(g.latents).float(), g.conds) for g in groups], pairs
    if vae is None:
        raise ValueError(f"{what} need a vae to encode them (or give latents from ComfyUI's dataset nodes instead)")
    encoded = _encode_images(_first(vae), images, resolution, base, what)
    pairs, index = conditioning_per_image(conditioning, encoded.shape[0], cond_what)
    return [LatentGroup(encoded, index)], pairs


def _partial_info(done: int, planned: int, partial: bool, resumed_from: str | None,
                  stopped_by: str = "interrupted") -> dict[str, str]:
    info = {"steps_done": str(done), "steps_planned": str(planned), "partial": "1" if partial else "0"}
    if partial:
        info["stopped_by"] = stopped_by
    if resumed_from:
        info["resumed_from"] = resumed_from
    return info


@contextlib.contextmanager
def _with_lora(model, dm, device):
    """A LoRA on the MODEL (stock loaders after quantizing) takes part in training as it does in sampling;
    its tensors are copied outside inference mode so that autograd may save them."""
    adapters = {name: tuple(a.to(device, torch.float32, copy=True) for a in found)
                for name, found in lora.adapters_for(model, dm, device, torch.float32).items()}
    lora.log_applied(lora.count(adapters), "during training")
    with get_router(dm).route(adapters=adapters):
        yield


class TrainScales(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMTrainScales",
            display_name="Train TuneQDM Scales",
            category=CATEGORY,
            description=(
                "Fine-tunes only the quantization scales of a TuneQDM MODEL on a few subject images "
                "(DreamBooth-style): each step draws a timestep per sample and updates only that timestep's "
                "expert. Takes an IMAGE batch + VAE, or ComfyUI's dataset latents with a caption per image "
                "(resolution buckets included). Cancel ends the prompt as interrupted and saves the steps done so "
                "far to models/tuneqdm/scales/partial/ (marked partial); resume continues from such a file."),
            is_experimental=True,
            is_input_list=True,  # ComfyUI's dataset nodes give one list entry per image or per bucket
            inputs=[
                io.Model.Input("model", tooltip="A TuneQDM-quantized MODEL."),
                io.Conditioning.Input("instance_conditioning",
                                      tooltip="E.g. 'a photo of sks dog': one for all images, or one per image "
                                              "(captions, as from Make Training Dataset)."),
                io.Int.Input("steps", default=400, min=1, max=100000,
                             tooltip="Optimizer steps in all (a resumed run continues up to this many)."),
                io.Float.Input("lr_s_out", default=3e-6, min=0.0, max=1.0, step=1e-7, round=False,
                               tooltip="Learning rate of the output-channel scales (near 1e-3..1e-2)."),
                io.Float.Input("lr_s_in", default=1e-4, min=0.0, max=1.0, step=1e-6, round=False,
                               tooltip="Learning rate of the input-channel scales (near 1): its own rate."),
                io.Boolean.Input("train_s_in", default=True, tooltip="Off: s_out only (PEQA-style)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Samples per batch."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seeds the timesteps, the noise and the batches drawn."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Training IMAGEs are resized and center-cropped to this square size (latents "
                                     "are used as they are)."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the training IMAGEs once, before the steps."),
                io.Image.Input("instance_images", optional=True,
                               tooltip="3-10 images of the subject (a batch, or a list from Load Image Dataset from "
                                       "Folder)."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Instead of instance_images: latents from ComfyUI's dataset nodes (Make "
                                        "Training Dataset, Resolution Bucket, Load Training Dataset)."),
                io.Int.Input("grad_accumulation_steps", default=1, min=1, max=1024, optional=True,
                             tooltip="Batches whose gradients each step sums."),
                io.Boolean.Input("gradient_checkpointing", default=True, optional=True,
                                 tooltip="Activation checkpointing: less memory, about a third more time."),
                io.Combo.Input("loss_function", options=list(LOSS_FUNCTIONS), default="MSE", optional=True,
                               tooltip="The error measured in the model's prediction space."),
                io.Combo.Input("resume", options=[NO_RESUME] + folders.files(folders.SCALES), default=NO_RESUME,
                               optional=True, tooltip="Continue from a scales file (e.g. a partial one saved on "
                                                      "cancel) up to `steps` steps."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Prior preservation: images of the class (e.g. dogs)."),
                io.Conditioning.Input("class_conditioning", optional=True, tooltip="E.g. 'a photo of a dog'."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="Weight of the class images' loss against the subject's."),
                io.Image.Input("instance_images_2", optional=True,
                               tooltip="A second subject's images (multi-subject)."),
                io.Conditioning.Input("instance_conditioning_2", optional=True,
                                      tooltip="The second subject's prompt."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the MODEL sampling with the trained scales."),
                Scales.Output(display_name="scales", tooltip="The trained scales (wire into Save Scales)."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per expert."),
                io.String.Output(display_name="report", tooltip="Steps done, samples per expert, time."),
                io.Custom("LOSS_MAP").Output(display_name="loss_map",
                                             tooltip="Loss per step, for ComfyUI's Plot Loss Graph."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, resume=None, **_) -> str | float:
        name = _first(resume, NO_RESUME)
        return "" if name == NO_RESUME else fingerprint_of(folders.SCALES, name)

    @classmethod
    def execute(cls, model, instance_conditioning, steps, lr_s_out, lr_s_in, train_s_in, batch_size, seed, resolution,
                vae=None, instance_images=None, latents=None, grad_accumulation_steps=None, gradient_checkpointing=None,
                loss_function=None, resume=None, class_images=None, class_conditioning=None, prior_weight=None,
                instance_images_2=None, instance_conditioning_2=None) -> io.NodeOutput:
        model = _first(model)
        steps, resolution = _first(steps), _first(resolution)
        require_quantized(model, "Train TuneQDM Scales")
        base = model.model
        dm = base.diffusion_model
        train_s_in = bool(_first(train_s_in))
        if train_s_in and not model_config(dm).train_s_in:
            logging.info("TuneQDM train: this MODEL was quantized with s_out only (PEQA); s_in stays frozen")
            train_s_in = False
        if instance_images is None and latents is None:
            raise ValueError("connect instance_images (with a vae) or latents (from ComfyUI's dataset nodes)")

        kinds = [(instance_images, latents, instance_conditioning, False, "instance_images", "instance_conditioning"),
                 (instance_images_2, None, instance_conditioning_2, False, "instance_images_2", "instance_conditioning_2"),
                 (class_images, None, class_conditioning, True, "class_images", "class_conditioning")]
        conds: list = []
        sets: list[tuple[torch.Tensor, tuple[int, ...], bool, int]] = []
        for subject, (images, lats, cond, prior, what, cond_what) in enumerate(kinds):
            if images is None and lats is None:
                if cond is not None and subject > 0:
                    raise ValueError(f"{what} and {cond_what} must be connected together")
                continue
            groups, pairs = _gather(base, vae, resolution, images, lats, cond, what, cond_what)
            for g in groups:
                sets.append((g.latents, tuple(len(conds) + i for i in g.conds), prior, subject))
            conds.extend(pairs)

        resume_name = _first(resume, NO_RESUME)
        start, start_step = routing_of(model).scales or scales_of(dm), 0
        if resume_name != NO_RESUME:
            start = load_scales(folders.full_path(folders.SCALES, resume_name), dm)
            start_step = int(start.info.get("steps_done", "0"))
            if start_step >= steps:
                raise ValueError(f"resume: {resume_name} already has {start_step} steps; set steps above {start_step} "
                                 "to continue it")

        # The steps need only this model: every other one on the device (the VAE that just encoded the images,
        # text encoders) is unloaded first, as ComfyUI's own trainer does. On a CPU-only host nothing is freed:
        # the loaders' cached outputs keep those models in RAM.
        comfy.model_management.load_models_gpu([model], memory_required=1e20, force_full_load=True)
        device = model.load_device
        noise_gen = torch.Generator().manual_seed(_first(seed) + 1 + start_step)
        loss_fn = prediction_loss(base, conds, device, LOSS_FUNCTIONS[_first(loss_function, "MSE")],
                                  lambda x0, t: torch.randn(x0.shape, generator=noise_gen))

        config = TrainConfig(steps=steps, lr_s_out=_first(lr_s_out), lr_s_in=_first(lr_s_in), train_s_in=train_s_in,
                             batch_size=_first(batch_size), seed=_first(seed), prior_weight=_first(prior_weight, 1.0),
                             checkpointing=bool(_first(gradient_checkpointing, True)),
                             grad_accumulation_steps=_first(grad_accumulation_steps, 1))
        bar = comfy.utils.ProgressBar(steps)
        bar.update_absolute(start_step, steps)
        started = time.perf_counter()
        interrupted = False

        def on_step(step: int, loss: float) -> None:
            nonlocal interrupted
            if step == start_step + 1 or step % 10 == 0 or step == steps:
                logging.info("TuneQDM train: step %d/%d loss %.5f", step, steps, loss)
            try:
                bar.update_absolute(step, steps)
            except comfy.model_management.InterruptProcessingException:
                interrupted = True  # ComfyUI's progress hook saw the cancel button (and cleared its flag)

        def should_stop() -> bool:
            nonlocal interrupted
            if comfy.model_management.processing_interrupted():
                comfy.model_management.interrupt_current_processing(False)  # raised again below, once saved
                interrupted = True
            return interrupted

        resumed_from = None if resume_name == NO_RESUME else resume_name
        try:
            with torch.inference_mode(False), torch.enable_grad(), grad_ready(dm), _with_lora(model, dm, device):
                # Contiguous copies: a channels-last latent (ComfyUI's LatentUpscale makes them) makes every CPU
                # convolution of the step many times slower.
                data = [SampleSet(lat.to(device).clone(memory_format=torch.contiguous_format),
                                  c if len(set(c)) > 1 else c[0], prior, subject)
                        for lat, c, prior, subject in sets]
                result = train_scales(dm, start, data, loss_fn, config, on_step, should_stop,
                                      stop_exceptions=(comfy.model_management.InterruptProcessingException,),
                                      start_step=start_step)
        except NonFiniteLossError as e:
            record = _partial_info(e.result.steps_done, steps, True, resumed_from, "non-finite loss")
            kept = dataclasses.replace(e.result.scales, info=record)
            path = folders.output_path(folders.SCALES, time.strftime("tuneqdm_recovered_%Y%m%d-%H%M%S"))
            save_scales(path, kept, dm)
            raise RuntimeError(f"{e}; the last finite scales were saved to {path}") from None
        seconds = time.perf_counter() - started
        scales = dataclasses.replace(result.scales, info=_partial_info(result.steps_done, steps, result.partial, resumed_from))
        if result.partial:
            cls._save_partial_and_stop(scales, result, steps, start_step, dm)
        return cls._outputs(model, scales, result, steps, start_step, seconds, sets)

    @staticmethod
    def _save_partial_and_stop(scales, result: TrainResult, steps: int, start_step: int, dm) -> None:
        """Cancel: keep what was trained under a new name marked partial, then end the prompt the way ComfyUI
        ends an interrupted one, so that no downstream node (a Save Scales) runs and nothing is cached."""
        if result.steps_done > start_step:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = folders.output_path(folders.SCALES, f"partial/tuneqdm_{stamp}_{result.steps_done}of{steps}_steps")
            save_scales(path, scales, dm)
            logging.warning("TuneQDM train: interrupted after %d/%d steps; the partial scales were saved to %s "
                            "(load them with Load Scales, or continue with the resume input: %s)",
                            result.steps_done, steps, path, folders.relative_name(folders.SCALES, path))
        else:
            logging.warning("TuneQDM train: interrupted before the first step; nothing to save")
        raise comfy.model_management.InterruptProcessingException()

    @staticmethod
    def _outputs(model, scales, result: TrainResult, steps: int, start_step: int, seconds: float, sets) -> io.NodeOutput:
        status = describe(scales.info)
        logging.info("TuneQDM train: %s in %.1f s", status, seconds)
        curves = result.expert_curves(scales.experts)
        title = f"TuneQDM loss per expert: {result.steps_done}/{steps} steps, {seconds:.0f} s"
        curve = loss_curve_image(curves, steps, title)
        last = [f"{c[-1][1]:.4f}" if c else "-" for c in curves]
        sizes = ", ".join(f"{'x'.join(map(str, lat.shape[-2:]))} ({lat.shape[0]})" for lat, _, _, _ in sets)
        captions = len({i for _, c, _, _ in sets for i in c})
        resumed = f" (resumed at step {start_step})" if start_step else ""
        report = (f"complete: {result.steps_done}/{steps} steps in {seconds:.1f} s{resumed}\n"
                  f"samples per expert: {[len(c) for c in curves]}\nlast loss per expert: {last}\n"
                  f"latents: {sizes}; conditionings: {captions}")
        trained = with_routing(model, routing_of(model).with_changes(scales=scales))
        return io.NodeOutput(trained, scales, curve, report, {"loss": list(result.losses)})
