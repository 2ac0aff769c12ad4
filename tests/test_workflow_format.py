"""The pack's workflows: API format (example_workflows/api/*.json) is the source, UI format is generated.

scripts/workflows.py converts an API graph to the UI (litegraph) format with the node definitions of
a real server's /object_info. These tests keep the committed UI files equal to that conversion, check
the conversion's structure on stock-node graphs (links on both ends, widget counts, a lossless round
trip) and against a workflow template that ships with ComfyUI, and check that ComfyUI serves the UI
files as the pack's templates.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tuneqdm_fixtures.paths import checkout
from tuneqdm_fixtures.server import PACK_FOLDER, ComfyServer

REPO_ROOT = checkout()

pytestmark = pytest.mark.server

WORKFLOWS_DIR = REPO_ROOT / "example_workflows"
SCRIPT = REPO_ROOT / "scripts" / "workflows.py"


def _load_converter() -> Any:
    spec = importlib.util.spec_from_file_location("tuneqdm_scripts_workflows", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


wf = _load_converter()

API_FILES = sorted((WORKFLOWS_DIR / "api").glob("*.json"))


@pytest.fixture(scope="module")
def object_info(comfy_server_unchecked: ComfyServer) -> dict[str, Any]:
    return comfy_server_unchecked.object_info()


def _get(server: ComfyServer, path: str) -> Any:
    with urllib.request.urlopen(server.url + path, timeout=60) as resp:
        return json.loads(resp.read())


# ---- (a) the committed UI files are the conversion of their API sources --------------------------

@pytest.mark.parametrize("api_path", API_FILES or [None], ids=[p.stem for p in API_FILES] or ["none"])
def test_committed_ui_workflow_is_generated_from_its_api_source(
        api_path: Path | None, object_info: dict[str, Any]) -> None:
    if api_path is None:
        pytest.skip("example_workflows/api/ holds no API-format workflow yet, so there is nothing to compare")
    api = json.loads(api_path.read_text(encoding="utf-8"))
    ui_file = wf.ui_path(api_path)
    regenerate = "regenerate it: .venv/bin/python scripts/workflows.py --start (or --server URL)"
    assert ui_file.is_file(), f"{ui_file.relative_to(REPO_ROOT)} missing; {regenerate}"
    assert api_path.stem in wf.GUIDES, f"no guide (groups, note) for {api_path.stem} in scripts/workflow_guides.py"
    generated = wf.api_to_ui(api, object_info, wf.GUIDES[api_path.stem])
    committed = json.loads(ui_file.read_text(encoding="utf-8"))
    where = ui_file.relative_to(REPO_ROOT)
    assert committed == generated, f"{where} differs from its API source; {regenerate}"
    assert ui_file.read_text(encoding="utf-8") == wf.dumps(generated), \
        f"{where} is not formatted as the generator writes it; {regenerate}"
    # And the UI file queues exactly the API graph.
    assert wf.ui_to_api(committed, object_info) == api


# ---- (b) structure of the conversion on stock-node graphs ---------------------------------------

def _invert_graph() -> dict[str, Any]:
    return {
        "1": {"inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}, "class_type": "EmptyImage"},
        "2": {"inputs": {"image": ["1", 0]}, "class_type": "ImageInvert"},
        "3": {"inputs": {"filename_prefix": "invert", "images": ["2", 0]}, "class_type": "SaveImage",
              "_meta": {"title": "Save Image"}},
    }


def _txt2img_graph() -> dict[str, Any]:
    return {
        "3": {"inputs": {"seed": 156680208700286, "steps": 20, "cfg": 7.5, "sampler_name": "euler",
                         "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
                         "negative": ["7", 0], "latent_image": ["5", 0]},
              "class_type": "KSampler", "_meta": {"title": "KSampler"}},
        "4": {"inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
              "class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"}},
        "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage"},
        "6": {"inputs": {"text": "a glass bottle with a galaxy inside", "clip": ["4", 1]},
              "class_type": "CLIPTextEncode", "_meta": {"title": "Positive prompt"}},
        "7": {"inputs": {"text": "blurry, watermark", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
              "_meta": {"title": "Negative prompt"}},
        "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
        "9": {"inputs": {"filename_prefix": "txt2img", "images": ["8", 0]}, "class_type": "SaveImage"},
    }


def _linked_widget_graph() -> dict[str, Any]:
    """Widget inputs fed by links: the seed from a PrimitiveInt, width and height from another."""
    graph = _txt2img_graph()
    graph["10"] = {"inputs": {"value": 7}, "class_type": "PrimitiveInt", "_meta": {"title": "Seed"}}
    graph["11"] = {"inputs": {"value": 640}, "class_type": "PrimitiveInt"}
    graph["3"]["inputs"]["seed"] = ["10", 0]
    graph["5"]["inputs"]["width"] = ["11", 0]
    graph["5"]["inputs"]["height"] = ["11", 0]
    return graph


GRAPHS = {"invert": _invert_graph, "txt2img": _txt2img_graph, "linked_widgets": _linked_widget_graph}

STOCK_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _expected_widget_count(node_def: dict[str, Any]) -> int:
    """Written independently of the converter: one value per widget input, one more after an INT
    that has control_after_generate (or, without the option, is named seed/noise_seed)."""
    count = 0
    for section in ("required", "optional"):
        for name, spec in (node_def["input"].get(section) or {}).items():
            type_ = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = spec[1] if len(spec) > 1 else {}
            if type_ in STOCK_WIDGET_TYPES and not options.get("forceInput"):
                count += 1
                if type_ == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                    count += 1
    return count


@pytest.mark.parametrize("graph_name", list(GRAPHS))
def test_conversion_is_structurally_valid(graph_name: str, object_info: dict[str, Any]) -> None:
    api = GRAPHS[graph_name]()
    ui = wf.api_to_ui(copy.deepcopy(api), object_info)

    assert list(ui) == ["id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups",
                        "config", "extra", "version"]
    assert ui["version"] == 0.4 and ui["groups"] == [] and ui["config"] == {}
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert sorted(nodes) == sorted(int(k) for k in api)
    assert ui["last_node_id"] == max(nodes)
    assert ui["last_link_id"] == len(ui["links"]) == sum(
        1 for node in api.values() for v in node["inputs"].values() if isinstance(v, list))
    assert sorted({node["order"] for node in nodes.values()}) == list(range(len(nodes)))

    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids)
    for link_id, origin, origin_slot, target, target_slot, type_ in ui["links"]:
        out = nodes[origin]["outputs"][origin_slot]
        assert link_id in out["links"] and out["type"] == type_ and out["slot_index"] == origin_slot
        inp = nodes[target]["inputs"][target_slot]
        assert inp["link"] == link_id
        # the link is the API graph's link, into the input of the same name
        name = inp.get("widget", {}).get("name", inp["name"])
        assert api[str(target)]["inputs"][name] == [str(origin), origin_slot]
    for node in nodes.values():
        for out in node["outputs"]:
            for link_id in out["links"]:
                assert ui["links"][link_id - 1][1:3] == [node["id"], out["slot_index"]]
        for inp in node["inputs"]:
            if inp["link"] is not None:
                assert ui["links"][inp["link"] - 1][3:5] == [node["id"], node["inputs"].index(inp)]

    for key, api_node in api.items():
        node, node_def = nodes[int(key)], object_info[api_node["class_type"]]
        assert list(node) == ["id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs"] \
            + (["title"] if "_meta" in api_node else []) + ["properties", "widgets_values"]
        assert node["type"] == api_node["class_type"] and node["mode"] == 0 and node["flags"] == {}
        assert node["properties"] == {"Node name for S&R": api_node["class_type"]}
        assert node.get("title") == api_node.get("_meta", {}).get("title")
        assert len(node["widgets_values"]) == _expected_widget_count(node_def)
        assert [(o["name"], o["type"]) for o in node["outputs"]] == \
            list(zip(node_def["output_name"], node_def["output"]))
        # sockets first, then only the widget inputs that are linked, each declared as a widget
        kinds = ["widget" in inp for inp in node["inputs"]]
        assert kinds == sorted(kinds)
        for inp in node["inputs"]:
            if "widget" in inp:
                assert inp["widget"] == {"name": inp["name"]} and inp["link"] is not None
                assert inp["type"] in STOCK_WIDGET_TYPES

    xs = {nid: node["pos"][0] for nid, node in nodes.items()}
    for _, origin, _, target, _, _ in ui["links"]:
        assert xs[origin] < xs[target], "nodes are laid out left to right along the links"

    assert wf.ui_to_api(ui, object_info) == api, "UI -> API must give back the original graph"
    assert wf.dumps(wf.api_to_ui(copy.deepcopy(api), object_info)) == wf.dumps(ui), "output is deterministic"


def test_ksampler_widgets_follow_the_frontend_layout(object_info: dict[str, Any]) -> None:
    ui = wf.api_to_ui(_txt2img_graph(), object_info)
    ksampler = next(node for node in ui["nodes"] if node["type"] == "KSampler")
    # As in the frontend's default graph: seed, its control value, steps, cfg, sampler, scheduler, denoise.
    assert ksampler["widgets_values"] == [156680208700286, "fixed", 20, 7.5, "euler", "normal", 1.0]
    assert [(i["name"], i["type"]) for i in ksampler["inputs"]] == [
        ("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
        ("latent_image", "LATENT")]

    ui = wf.api_to_ui(_linked_widget_graph(), object_info)
    ksampler = next(node for node in ui["nodes"] if node["type"] == "KSampler")
    seed_link = ksampler["inputs"][-1]
    assert {k: v for k, v in seed_link.items() if k != "link"} == \
        {"name": "seed", "type": "INT", "widget": {"name": "seed"}}
    assert len(ksampler["widgets_values"]) == 7 and ksampler["widgets_values"][1] == "fixed"
    primitive = next(node for node in ui["nodes"] if node["id"] == 10)
    assert primitive["widgets_values"] == [7, "fixed"]  # PrimitiveInt: control_after_generate: true


def test_graphs_the_ui_format_cannot_hold_are_refused(object_info: dict[str, Any]) -> None:
    graph = _invert_graph()
    del graph["1"]["inputs"]["color"]
    with pytest.raises(wf.WorkflowError, match="color"):
        wf.api_to_ui(graph, object_info)  # the frontend would send a value the API graph does not
    graph = _invert_graph()
    graph["2"]["inputs"]["image"] = "not a link"
    with pytest.raises(wf.WorkflowError, match="socket input 'image'"):
        wf.api_to_ui(graph, object_info)
    graph = _invert_graph()
    graph["2"]["inputs"]["image"] = ["9", 0]
    with pytest.raises(wf.WorkflowError, match="missing node 9"):
        wf.api_to_ui(graph, object_info)
    with pytest.raises(wf.WorkflowError, match="NoSuchNode"):
        wf.api_to_ui({"1": {"class_type": "NoSuchNode", "inputs": {}}}, object_info)
    with pytest.raises(wf.WorkflowError, match="ids"):
        wf.api_to_ui({"a": _invert_graph()["1"]}, object_info)


def _template(name: str) -> dict[str, Any] | None:
    # Where default.json lives moved between template package versions (0.3.75 and 0.8.0 pin different ones).
    for package in ("comfyui_workflow_templates_media_image", "comfyui_workflow_templates_media_other",
                    "comfyui_workflow_templates"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / "templates" / name
            if path.is_file():
                return json.loads(path.read_text(encoding="utf-8"))
    return None


def test_conversion_matches_the_frontends_default_template(object_info: dict[str, Any]) -> None:
    """The frontend-made default.json template (SD1.5 text to image) and our conversion of its API
    graph agree node by node: inputs, outputs, link ends and widget values (layout, link numbering
    and the control mode aside)."""
    template = _template("default.json")
    if template is None:
        pytest.skip("ComfyUI's workflow templates package (default.json) is not installed")
    api = wf.ui_to_api(template, object_info)
    assert api["3"]["class_type"] == "KSampler" and api["3"]["inputs"]["positive"] == ["6", 0]
    ui = wf.api_to_ui(api, object_info)

    def link_ends(workflow: dict[str, Any]) -> dict[int, tuple[int, int, int, int, str]]:
        return {link[0]: tuple(link[1:]) for link in workflow["links"]}

    ours, theirs = link_ends(ui), link_ends(template)
    assert sorted(ours.values()) == sorted(theirs.values())
    reference = {node["id"]: node for node in template["nodes"]}
    for node in ui["nodes"]:
        ref = reference[node["id"]]
        assert node["type"] == ref["type"]
        assert [(i["name"], i["type"], ours[i["link"]][:2]) for i in node["inputs"]] == \
               [(i["name"], i["type"], theirs[i["link"]][:2]) for i in ref["inputs"]]
        def outputs(n: dict[str, Any], ends: dict[int, tuple[int, int, int, int, str]]) -> list[Any]:
            return [(o["name"], o["type"], o["slot_index"], sorted(ends[k][2:4] for k in o["links"] or []))
                    for o in n["outputs"]]

        assert outputs(node, ours) == outputs(ref, theirs)
        values = ["fixed" if v == "randomize" else v for v in ref["widgets_values"]]
        assert node["widgets_values"] == values


def test_cli_regenerates_and_checks(object_info: dict[str, Any], comfy_server_unchecked: ComfyServer,
                                    tmp_path: Path) -> None:
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "invert.json").write_text(json.dumps(_invert_graph(), indent=2), encoding="utf-8")
    cli = [sys.executable, str(SCRIPT), "--server", comfy_server_unchecked.url, "--workflows", str(tmp_path)]

    check = subprocess.run(cli + ["--check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 1, check.stdout + check.stderr  # the UI file does not exist yet
    write = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert write.returncode == 0, write.stdout + write.stderr
    expected = wf.dumps(wf.api_to_ui(_invert_graph(), object_info))
    assert (tmp_path / "invert.json").read_text(encoding="utf-8") == expected
    check = subprocess.run(cli + ["--check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr

    (tmp_path / "invert.json").write_text("{}\n", encoding="utf-8")  # a hand edit
    check = subprocess.run(cli + ["--check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 1 and "DIFFERS" in check.stdout
    assert (tmp_path / "invert.json").read_text(encoding="utf-8") == "{}\n"  # --check writes nothing


# ---- (c) ComfyUI serves the UI workflows as the pack's templates ----------------------------------

def test_server_lists_the_packs_ui_workflows(comfy_server_unchecked: ComfyServer) -> None:
    names = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    if not names:
        pytest.skip("example_workflows/ holds no UI-format workflow yet")
    templates = _get(comfy_server_unchecked, "/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == names, templates
    for name in names:
        served = _get(comfy_server_unchecked, f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
        assert served == json.loads((WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))
        # The thumbnail the templates dialog asks for (frontend 1.35: always <name>.jpg for a pack's templates).
        url = f"{comfy_server_unchecked.url}/api/workflow_templates/{PACK_FOLDER}/{name}.jpg"
        with urllib.request.urlopen(url, timeout=60) as resp:
            thumbnail = resp.read()
        assert thumbnail[:3] == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"  # regenerate: scripts/thumbnails.py
        assert thumbnail == (WORKFLOWS_DIR / f"{name}.jpg").read_bytes()
        assert len(thumbnail) < 100_000, f"{name}.jpg is {len(thumbnail)} bytes; the dialog shows it ~240 px wide"
