"""The pack's embedded default: a small text-to-image model of handwritten digits (data, pixel codec, text
encoder, files), what measures it (classifier, metrics, a plain sampler) and what trains it
(`python -m tuneqdm_demo.train`). The model itself is a ComfyUI UNet, built where ComfyUI is importable
(nodes/default_model.py in a server, `model.py` elsewhere).

Its two heavier dependencies are imported only when used, with an error that says what to install:
scikit-learn by `data.load_digits` (the digits themselves: the demo nodes' subject images, training and
the benchmarks), the MiniLM package and transformers by `text.TextEncoder`. scikit-learn stays in the
pack's requirements because the demo nodes ship with the pack; the core library imports neither.
"""
