"""Shared fixtures of the development checkout, for its tests, scripts and benchmarks (never imported by the
pack's nodes or its core):

- `paths`: where the checkout, its ComfyUI host, interpreter and asset cache are (the one place that knows);
- `host`: that ComfyUI imported as a library (CPU mode), and the pack loaded the way ComfyUI loads it;
- `server`: a real ComfyUI server process driven over HTTP (`ComfyServer`);
- `graph`: API-format graphs built in code, the checkout's workflows adapted to test-size files, outputs read back;
- `checkpoints`: loadable SD1.5 files with random weights, written tensor by tensor and cached;
- `families`: the same for SDXL, SD3.5, Flux and Wan, and the test-only custom nodes they run with;
- `demo_files`: LoRA and fp8 files derived from the embedded default model.
"""
