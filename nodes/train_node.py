"""Train TuneQDM Scales: DreamBooth-style personalization of a quantized MODEL inside a graph.

Training data comes as an IMAGE batch encoded here with the VAE, or as ComfyUI's dataset lists (latents
and one caption's conditioning per image, resolution buckets of several sizes): training_data.py. Latents
are made once, so neither the VAE nor the text encoder needs to stay loaded during the steps. The loss is
the model's own objective (training_objective.py); each sample's expert is picked by the MODEL's routing
policy (custom boundaries included), which the trained scales carry on.

The cancel button ends the prompt as interrupted (ComfyUI's own state: nothing downstream runs, nothing
is cached), after the scales of the last complete step are saved under a new name marked partial; the
`resume` input continues from such a file.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..tuneqdm_core import get_router, load_scales, model_config, save_scales, scales_of
from ..tuneqdm_core.errors import NonFiniteLossError, SettingError, TrainingDataError
from ..tuneqdm_core.objective import ERROR_FUNCTIONS
from ..tuneqdm_core.scales import ScaleSet
from ..tuneqdm_core.train import TrainConfig, TrainResult, train_scales, training_record
from . import folders, lora
from .file_nodes import Scales, describe, fingerprint_of
from .loss_plot import loss_curve_image
from .patcher import require_quantized, routing_of, with_routing
from .trainable import grad_ready
from .training_data import DataKind, TrainingData, gather
from .training_objective import model_objective

CATEGORY = "TuneQDM"
NO_RESUME = "[None]"


def _first(value, default=None):
    """INPUT_IS_LIST hands every input over as a list: the widget's value, or an unconnected optional's default."""
    if value is None:
        return default
    return value[0] if isinstance(value, list) else value


def _with_lora(model, dm, device):
    """A LoRA on the MODEL (stock loaders after quantizing) takes part in training as it does in sampling;
    its tensors are copied outside inference mode so that autograd may save them."""
    adapters = {name: tuple(a.to(device, torch.float32, copy=True) for a in found)
                for name, found in lora.adapters_for(model, dm, device, torch.float32).items()}
    lora.log_applied(lora.count(adapters), "during training")
    return get_router(dm).route(adapters=adapters)


def _start(model, resume_name: str, steps: int) -> tuple[ScaleSet, int]:
    """The scales to start from, routed by the MODEL's policy, or a file's to resume (with the policy it was
    trained with), and the steps already done."""
    routing, dm = routing_of(model), model.model.diffusion_model
    if resume_name == NO_RESUME:
        start = routing.scales or scales_of(dm)
        return dataclasses.replace(start, policy=routing.policy_for(model.model)), 0
    start = load_scales(folders.full_path(folders.SCALES, resume_name), dm)
    start_step = int(start.info.get("steps_done", "0"))
    if start_step >= steps:
        raise SettingError(f"resume: {resume_name} already has {start_step} steps; set steps above {start_step} "
                         "to continue it")
    return start, start_step


class _Progress:
    """ComfyUI's progress bar, log lines and cancel button for train_scales' on_step / should_stop."""

    def __init__(self, steps: int, start_step: int) -> None:
        self.steps, self.start_step = steps, start_step
        self.bar = comfy.utils.ProgressBar(steps)
        self.bar.update_absolute(start_step, steps)
        self.interrupted = False

    def on_step(self, step: int, loss: float) -> None:
        if step == self.start_step + 1 or step % 10 == 0 or step == self.steps:
            logging.info("TuneQDM train: step %d/%d loss %.5f", step, self.steps, loss)
        try:
            self.bar.update_absolute(step, self.steps)
        except comfy.model_management.InterruptProcessingException:
            self.interrupted = True  # ComfyUI's progress hook saw the cancel button (and cleared its flag)

    def should_stop(self) -> bool:
        if comfy.model_management.processing_interrupted():
            comfy.model_management.interrupt_current_processing(False)  # raised again once saved
            self.interrupted = True
        return self.interrupted


def _train(model, start: ScaleSet, start_step: int, data: TrainingData, config: TrainConfig,
           loss_function: str, resumed_from: str | None) -> TrainResult:
    """Run train_scales on the MODEL's device; a non-finite loss saves the last finite scales first."""
    base, dm = model.model, model.model.diffusion_model
    # The steps need only this model: every other one on the device (the VAE that just encoded the images,
    # text encoders) is unloaded first, as ComfyUI's own trainer does. On a CPU-only host nothing is freed:
    # the loaders' cached outputs keep those models in RAM.
    comfy.model_management.load_models_gpu([model], memory_required=1e20, force_full_load=True)
    device = model.load_device
    noise_gen = torch.Generator().manual_seed(config.seed + 1 + start_step)
    loss_fn = model_objective(base, data.conds, device, ERROR_FUNCTIONS[loss_function],
                              lambda x0, t: torch.randn(x0.shape, generator=noise_gen))
    progress = _Progress(config.steps, start_step)
    try:
        with torch.inference_mode(False), torch.enable_grad(), grad_ready(dm), _with_lora(model, dm, device):
            return train_scales(dm, start, data.sample_sets(device), loss_fn, config, progress.on_step,
                                progress.should_stop,
                                stop_exceptions=(comfy.model_management.InterruptProcessingException,),
                                start_step=start_step)
    except NonFiniteLossError as e:
        record = training_record(e.result.steps_done, config.steps, True, resumed_from, "non-finite loss")
        path = folders.output_path(folders.SCALES, time.strftime("tuneqdm_recovered_%Y%m%d-%H%M%S"))
        save_scales(path, dataclasses.replace(e.result.scales, info=record), dm)
        raise NonFiniteLossError(f"{e}; the last finite scales were saved to {path}", e.result) from None


def _save_partial_and_stop(scales: ScaleSet, result: TrainResult, steps: int, start_step: int, dm) -> None:
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


def training_report(scales: ScaleSet, result: TrainResult, steps: int, start_step: int, seconds: float,
                    data: TrainingData) -> tuple[torch.Tensor, str]:
    """The loss-curve image and the report text of a finished run."""
    logging.info("TuneQDM train: %s in %.1f s", describe(scales.info), seconds)
    curves = result.expert_curves(scales.experts)
    title = f"TuneQDM loss per expert: {result.steps_done}/{steps} steps, {seconds:.0f} s"
    last = [f"{c[-1][1]:.4f}" if c else "-" for c in curves]
    resumed = f" (resumed at step {start_step})" if start_step else ""
    report = (f"complete: {result.steps_done}/{steps} steps in {seconds:.1f} s{resumed}\n"
              f"samples per expert: {[len(c) for c in curves]}\nlast loss per expert: {last}\n"
              f"routing: {scales.policy.describe()}\n{data.describe()}")
    return loss_curve_image(curves, steps, title), report


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
                io.Combo.Input("loss_function", options=list(ERROR_FUNCTIONS), default="MSE", optional=True,
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
        model, steps, resume_name = _first(model), _first(steps), _first(resume, NO_RESUME)
        require_quantized(model, "Train TuneQDM Scales")
        dm = model.model.diffusion_model
        train_s_in = bool(_first(train_s_in))
        if train_s_in and not model_config(dm).train_s_in:
            logging.info("TuneQDM train: this MODEL was quantized with s_out only (PEQA); s_in stays frozen")
        if instance_images is None and latents is None:
            raise TrainingDataError("connect instance_images (with a vae) or latents (from ComfyUI's dataset nodes)")
        data = gather(model.model, _first(vae), _first(resolution), [
            DataKind(instance_images, latents, instance_conditioning, False, "instance_images", "instance_conditioning"),
            DataKind(instance_images_2, None, instance_conditioning_2, False, "instance_images_2", "instance_conditioning_2"),
            DataKind(class_images, None, class_conditioning, True, "class_images", "class_conditioning")])
        start, start_step = _start(model, resume_name, steps)
        config = TrainConfig(steps=steps, lr_s_out=_first(lr_s_out), lr_s_in=_first(lr_s_in), train_s_in=train_s_in,
                             batch_size=_first(batch_size), seed=_first(seed), prior_weight=_first(prior_weight, 1.0),
                             checkpointing=bool(_first(gradient_checkpointing, True)),
                             grad_accumulation_steps=_first(grad_accumulation_steps, 1))
        resumed_from = None if resume_name == NO_RESUME else resume_name
        started = time.perf_counter()
        result = _train(model, start, start_step, data, config, _first(loss_function, "MSE"), resumed_from)
        seconds = time.perf_counter() - started
        scales = dataclasses.replace(result.scales, info=training_record(result.steps_done, steps, result.partial,
                                                                         resumed_from))
        if result.partial:
            _save_partial_and_stop(scales, result, steps, start_step, dm)
        curve, report = training_report(scales, result, steps, start_step, seconds, data)
        trained = with_routing(model, routing_of(model).with_changes(scales=scales, policy=scales.policy))
        return io.NodeOutput(trained, scales, curve, report, {"loss": list(result.losses)})
