"""Headless TuneQDM training, data-parallel over processes and machines (torchrun / torch.distributed).

`python -m tuneqdm_train train ...` trains the scales of a quantized model with the Train TuneQDM Scales
node's own loop and objective (tuneqdm_core.train.train_scales, nodes.training_objective) and writes the
scales file Load Scales reads. ComfyUI is imported as a library (its model classes build the model), so
this package lives outside the ComfyUI-free core. Modules: `distributed` (process group, gradient and
expert exchange, failure propagation), `sources` (models, encoders), `data` (image folders, pre-encoded
data), `trainer` (one rank's run).
"""
