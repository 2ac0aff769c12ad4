# Development entry points. `make setup` builds the cached .venv and .comfyui host (fast when done).
PYTHON := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo

setup:
	bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest tests -q -ra --timeout=900 $(PYTEST_ARGS)

demo: setup
	$(PYTHON) scripts/demo.py
