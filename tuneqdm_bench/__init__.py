"""Benchmarks of the pack: `python -m tuneqdm_bench <command>` (see __main__.py). They run the core on
ComfyUI's own models (comfy_unet.py), in real ComfyUI servers, and on the embedded default model
(tuneqdm_demo), with the checkout's host and generated files from tuneqdm_fixtures."""
