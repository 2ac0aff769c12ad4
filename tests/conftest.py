import os
import sys
from pathlib import Path

# Triton kernels run on CPU tensors only in interpreter mode, and the mode must be chosen before the
# first @triton.jit function executes. The ComfyUI servers started below inherit it too.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from tuneqdm_fixtures.server import PACK_FOLDER, ComfyServer  # noqa: E402

NODE_PREFIX = "TuneQDM"


@pytest.fixture(scope="session")
def comfy_server_unchecked() -> Iterator[ComfyServer]:
    """One real ComfyUI server for the whole session, whether or not the pack loaded in it."""
    server = ComfyServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(comfy_server_unchecked: ComfyServer) -> ComfyServer:
    """The session's server, failing (never skipping) every test that needs it if the pack did not load."""
    server = comfy_server_unchecked
    failed = [line for line in server.log_text().splitlines() if "IMPORT FAILED" in line and PACK_FOLDER in line]
    ours = [name for name in server.object_info() if name.startswith(NODE_PREFIX)]
    if failed or not ours:
        reason = failed[0].strip() if failed else f"no {NODE_PREFIX}* node in /object_info"
        pytest.fail(f"the {PACK_FOLDER} pack did not load: {reason}\n--- server log tail ---\n"
                    f"{server.log_tail(80)}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def comfy_models_dir(comfy_server: ComfyServer) -> Path:
    """The server's models folder; tests put files in models/diffusion_models, checkpoints, tuneqdm."""
    for sub in ("diffusion_models", "checkpoints", "tuneqdm"):
        (comfy_server.models_dir / sub).mkdir(parents=True, exist_ok=True)
    return comfy_server.models_dir
