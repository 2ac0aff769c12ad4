"""The pack's embedded default: a small text-to-image model of handwritten digits (data, pixel codec,
text encoder, files) and what measures it (classifier, metrics, a plain sampler). Plain torch; the
model itself is a ComfyUI UNet, built where ComfyUI is importable (nodes/, bench/host.py)."""
