"""Workflows as users saved them with version 0.2.0 of the pack (tests/fixtures/workflows_0_2_0, frozen
copies: UI format with positional `widgets_values`, and their API-format twins) still load and run.

The UI files name no widget: a widget value is matched to an input by its position among the node's
widget inputs in /object_info order. Reading each UI node through today's /object_info must therefore
give exactly the named inputs of the same node in the API copy; a renamed, reordered, added or removed
widget input breaks that, and a renamed socket input is missing from /object_info."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tuneqdm_fixtures.checkpoints import install, write_tiny_sd15_checkpoint
from tuneqdm_fixtures.graph import output_files
from tuneqdm_fixtures.paths import asset_cache_dir
from tuneqdm_fixtures.server import ComfyServer

pytestmark = pytest.mark.server

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "workflows_0_2_0"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds a control widget after these even when not asked to
PACK_PREFIX = "TuneQDM"


def ui_workflow(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def api_workflow(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "api" / f"{name}.json").read_text())


def _type_and_options(spec: list) -> tuple[str, dict[str, Any]]:
    """An /object_info input spec -> (type, options); a combo is ['COMBO', {'options': [...]}] (V3) or
    [[...], {...}] (V1), both given here as 'COMBO' with its options under 'options'."""
    options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(spec[0], list):
        options["options"] = spec[0]
        return "COMBO", options
    return spec[0], options


def widget_inputs(node_def: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(name, type, options, has a control widget) of each widget input, in the order the frontend lays
    the widgets out: input_order's required inputs, then its optional ones."""
    declared = node_def["input"]
    order = node_def.get("input_order") or {k: list(v) for k, v in declared.items()}
    widgets = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            type_, options = _type_and_options(declared[section][name])
            if type_ not in WIDGET_TYPES or options.get("forceInput"):
                continue
            flag = options.get("control_after_generate")
            control = bool(flag) if flag is not None else (type_ == "INT" and name in SEED_NAMES)
            widgets.append((name, type_, options, control))
    return widgets


def _value_problem(name: str, type_: str, options: dict[str, Any], value: Any) -> str | None:
    if type_ == "COMBO":
        looks_like_file = isinstance(value, str) and re.search(r"\.[A-Za-z0-9]+$", value)
        if not looks_like_file and value not in options.get("options", []):
            return f"{name}={value!r} is not one of {options.get('options')}"
    elif type_ == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}={value!r} is not a BOOLEAN"
    elif type_ in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (type_ == "INT" and value != int(value)):
            return f"{name}={value!r} is not an {type_}"
        if not options.get("min", value) <= value <= options.get("max", value):
            return f"{name}={value!r} outside [{options.get('min')}, {options.get('max')}]"
    elif type_ == "STRING" and not isinstance(value, str):
        return f"{name}={value!r} is not a STRING"
    return None


def workflow_problems(ui: dict[str, Any], api: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """Everything that keeps the saved UI workflow from loading as it was saved, in words; [] when none."""
    problems = []
    for node in ui["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        node_def = object_info.get(node["type"])
        if node_def is None:
            problems.append(f"{where}: not in /object_info")
            continue
        declared = {**node_def["input"].get("required", {}), **node_def["input"].get("optional", {})}
        problems += [f"{where}: socket input {i['name']!r} does not exist" for i in node.get("inputs", [])
                     if i.get("link") is not None and i["name"] not in declared]
        widgets, values = widget_inputs(node_def), list(node.get("widgets_values") or [])
        read: dict[str, Any] = {}
        for name, type_, options, control in widgets:
            if not values:
                problems.append(f"{where}: no saved value for widget {name!r}")
                break
            value = values.pop(0)
            read[name] = value
            if (problem := _value_problem(name, type_, options, value)) is not None:
                problems.append(f"{where}: {problem}")
            if control and (not values or values.pop(0) not in CONTROL_VALUES):
                problems.append(f"{where}: {name!r} should be followed by its control value")
        if values and node["type"].startswith(PACK_PREFIX):  # stock nodes may add frontend-only widgets (upload)
            problems.append(f"{where}: {len(values)} saved values left over: {values}")
        api_inputs = api[str(node["id"])]["inputs"]
        expected = {k: v for k, v in api_inputs.items() if not (isinstance(v, list) and len(v) == 2
                                                                  and isinstance(v[1], int) and isinstance(v[0], str))}
        if read != expected:
            problems.append(f"{where}: widgets_values read as {read}, the API copy says {expected}")
    return problems


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict[str, Any]:
    return comfy_server.object_info()


def test_the_frozen_copies_are_the_five_workflows_of_0_2_0():
    assert NAMES == ["default_model_demo", "float_vs_w8_vs_w4", "load_quantized_and_scales",
                     "quantize_and_sample", "train_subject"]
    assert sorted(p.stem for p in (FIXTURES / "api").glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_saved_ui_workflow_loads_with_its_widget_values_in_place(name, object_info):
    ui, api = ui_workflow(name), api_workflow(name)
    assert sorted(str(n["id"]) for n in ui["nodes"]) == sorted(api), "the UI and API copies hold different nodes"
    assert any(n["type"].startswith(PACK_PREFIX) for n in ui["nodes"])
    assert workflow_problems(ui, api, object_info) == []


def _renamed(object_info: dict[str, Any], node: str, old: str, new: str) -> dict[str, Any]:
    info = copy.deepcopy(object_info)
    section = "required" if old in info[node]["input"].get("required", {}) else "optional"
    inputs = info[node]["input"][section]
    info[node]["input"][section] = {new if k == old else k: v for k, v in inputs.items()}
    info[node]["input_order"][section] = [new if k == old else k for k in info[node]["input_order"][section]]
    return info


def _swapped(object_info: dict[str, Any], node: str, a: str, b: str) -> dict[str, Any]:
    info = copy.deepcopy(object_info)
    order = info[node]["input_order"]["required"]
    i, j = order.index(a), order.index(b)
    order[i], order[j] = order[j], order[i]
    return info


@pytest.mark.parametrize("change", ["renamed widget", "swapped widgets", "renamed socket", "swapped combos"])
def test_the_check_fails_on_a_node_whose_inputs_changed(change, object_info):
    """The check above cannot pass by accident: each change a refactor could make to the train node or the
    quantizer is caught on the workflows that use them."""
    ui, api = ui_workflow("train_subject"), api_workflow("train_subject")
    changed = {
        "renamed widget": lambda: _renamed(object_info, "TuneQDMTrainScales", "lr_s_in", "lr_input_scales"),
        "swapped widgets": lambda: _swapped(object_info, "TuneQDMTrainScales", "lr_s_out", "lr_s_in"),
        "renamed socket": lambda: _renamed(object_info, "TuneQDMTrainScales", "instance_images", "images"),
        "swapped combos": lambda: _swapped(object_info, "TuneQDMQuantizeUNet", "scales", "s_in_init"),
    }[change]()
    assert workflow_problems(ui, api, object_info) == []
    assert workflow_problems(ui, api, changed) != []


# ---- the API copies run ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(comfy_server, comfy_models_dir) -> str:
    asset = write_tiny_sd15_checkpoint(asset_cache_dir() / "tiny_sd15.safetensors")
    return install(asset.path, comfy_models_dir / "checkpoints").name


def runnable(name: str, ckpt: str) -> dict[str, Any]:
    """The API copy as saved, made quick: the test checkpoint, 64-pixel latents and training images, 2 steps."""
    graph = api_workflow(name)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if "resolution" in inputs:
            inputs["resolution"] = 64
        if "steps" in inputs:
            inputs["steps"] = 2
    return graph


def test_saved_api_workflows_run(comfy_server, ckpt):
    from PIL import Image

    for i in range(3):  # train_subject's subject images
        Image.new("RGB", (80, 96), (40 * i, 90, 200)).save(comfy_server.input_dir / f"subject_{i}.png")
    # load_quantized_and_scales reads the files quantize_and_sample saves, so that one runs first.
    for name in ("quantize_and_sample", "load_quantized_and_scales", "float_vs_w8_vs_w4", "train_subject",
                 "default_model_demo"):
        entry = comfy_server.run(runnable(name, ckpt), timeout=900, check=True)
        assert output_files(entry, comfy_server.output_dir), f"{name} saved no image"
