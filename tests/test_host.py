"""The test host itself: a real ComfyUI server driven over HTTP by tuneqdm_fixtures/server.py."""

import os

import pytest

from tuneqdm_fixtures.paths import checkout
from tuneqdm_fixtures.server import ComfyError, ComfyServer

REPO_ROOT = checkout()

pytestmark = pytest.mark.server


def test_server_lists_stock_nodes(comfy_server_unchecked: ComfyServer) -> None:
    info = comfy_server_unchecked.object_info()
    assert {"KSampler", "CheckpointLoaderSimple", "UNETLoader", "SaveImage"} <= info.keys()


def test_pack_nodes_are_registered(comfy_server: ComfyServer) -> None:
    names = [name for name in comfy_server.object_info() if name.startswith("TuneQDM")]
    assert names, "no TuneQDM* node in /object_info"


def test_invalid_graph_is_refused_with_the_server_error(comfy_server_unchecked: ComfyServer) -> None:
    with pytest.raises(ComfyError) as caught:
        comfy_server_unchecked.queue({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert caught.value.status == 400
    assert caught.value.details["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode" in str(caught.value)


def test_graph_runs_and_writes_to_the_temporary_output_dir(comfy_server_unchecked: ComfyServer) -> None:
    server = comfy_server_unchecked
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "host_test"}},
    }
    entry = server.run(graph, timeout=60, check=True)
    assert entry["status"]["completed"] is True
    assert server.execution_error(entry) is None
    assert list(server.output_dir.glob("host_test_*.png"))
    assert REPO_ROOT not in server.output_dir.resolve().parents  # tests never write into the checkout


def test_execution_error_extracts_the_message_data() -> None:
    error = {"node_id": "3", "node_type": "KSampler", "exception_message": "boom"}
    entry = {"status": {"completed": False, "messages": [["execution_start", {}], ["execution_error", error]]}}
    assert ComfyServer.execution_error(entry) == error
    assert ComfyServer.execution_error({"status": {"completed": True, "messages": []}}) is None


def test_stop_ends_the_server_process_by_pid() -> None:
    server = ComfyServer(custom_nodes={}).start()  # no custom nodes: a short-lived, fast instance
    pid, base_dir = server.pid, server.base_dir
    assert pid is not None and base_dir is not None
    assert "KSampler" in server.object_info()
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not base_dir.exists()
