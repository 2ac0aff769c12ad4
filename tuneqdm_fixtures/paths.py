"""Where the development checkout is, and what `make setup` built in it. The only place outside the pack
that locates the checkout: the fixtures, benchmarks, scripts and tests all ask here."""
from __future__ import annotations

import os
from pathlib import Path


def checkout() -> Path:
    """The development checkout: the folder that holds this package (and the pack beside it)."""
    return Path(__file__).resolve().parents[1]


def host_dir() -> Path:
    """The ComfyUI host the tests and benchmarks run: `.comfyui` (0.8.0) unless $TUNEQDM_TEST_HOST names
    another tree of the checkout (`make test` also runs the server tests on .comfyui-0.3.75, the oldest
    supported host)."""
    return checkout() / os.environ.get("TUNEQDM_TEST_HOST", ".comfyui")


def python() -> Path:
    """The checkout's interpreter (the `.venv` of `make setup`), which ComfyUI servers are started with."""
    return checkout() / ".venv" / "bin" / "python"


def asset_cache_dir() -> Path:
    """Where generated files are kept between sessions: $TUNEQDM_ASSET_CACHE, else .pytest_cache/ (git-ignored)."""
    env = os.environ.get("TUNEQDM_ASSET_CACHE")
    folder = Path(env) if env else checkout() / ".pytest_cache" / "tuneqdm-assets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH, for `python -m` children (the
    benchmarks run each measurement in a process of its own)."""
    path = os.pathsep.join(filter(None, [str(checkout()), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)
