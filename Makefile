# Development entry points. `make setup` builds the cached .venv and .comfyui host (fast when done).
PYTHON := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo

setup:
	bash scripts/setup.sh

# The whole suite on ComfyUI 0.8.0 (the main host), then the server tests again on 0.3.75 (the oldest supported).
test: setup
	$(PYTHON) -m pytest tests -q -ra --timeout=900 $(PYTEST_ARGS)
	TUNEQDM_TEST_HOST=.comfyui-0.3.75 $(PYTHON) -m pytest tests -m server -q -ra --timeout=900 $(PYTEST_ARGS)

demo: setup
	$(PYTHON) scripts/demo.py
