#!/usr/bin/env python3
"""The pack's workflows in two formats, one source of truth.

`example_workflows/api/<name>.json` holds a workflow in ComfyUI's API format (what `POST /prompt`
takes: `{"<id>": {"class_type": ..., "inputs": {...}, "_meta": {"title": ...}}}`); it is the only copy
anyone edits. `example_workflows/<name>.json` is the same workflow in the UI (litegraph) format that
users drag onto the canvas and that ComfyUI serves as the pack's templates (it lists the folder's
top-level .json files only, so api/ stays out of the templates menu); it is GENERATED from the API file
and the workflow's guide (titled groups and a note, scripts/workflow_guides.py) by `api_to_ui` and
never edited by hand.

    python scripts/workflows.py --server http://127.0.0.1:8188          # regenerate every UI file
    python scripts/workflows.py --server http://127.0.0.1:8188 --check  # exit 1 if one differs
    python scripts/workflows.py --start [--check]   # same, against a throwaway server of this checkout

The node definitions come from the server's `/object_info`, so they are the ones users get. The UI
format follows what ComfyUI's frontend (comfyui_frontend_package 1.32) writes when it saves a
workflow, and what its bundled templates (comfyui_workflow_templates) contain:

* inputs: first every socket input (a non-widget input, linked or not), then only the widget inputs
  that are linked (`"widget": {"name": ...}`), each in `input_order` order (required, then
  optional); optional inputs get `"shape": 7` (hollow circle). A link's target slot is the index in
  this list, as the frontend's `compressWidgetInputSlots` makes it when it saves.
* widgets_values: one value per widget in the same order, linked widgets included (with their
  default as a placeholder), plus the "control after generate" value right after an INT widget whose
  `control_after_generate` option is true (or, when the option is absent, that is named `seed` or
  `noise_seed`) or a COMBO widget whose option is true, and the frontend-only widgets its extensions
  add (the "upload" button of image/video combos, the audio player and upload of audio nodes).
* outputs: `name` (output_name), `type`, `"shape": 6` for list outputs, `slot_index`, `links`.

Only standard-library modules are used.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import sys
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when loaded by file path
from workflow_guides import GUIDES, Guide  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO_ROOT / "example_workflows"

# Widget types the frontend builds for an input (ComfyWidgets plus the custom widgets its core
# extensions register); any other input type is a socket. `widgetType` in the options overrides.
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "COLOR", "IMAGECOMPARE",
    "CHART", "GALLERIA", "TEXTAREA", "AUDIOUPLOAD", "AUDIO_RECORD", "AUDIO_UI", "LOAD_3D",
    "PREVIEW_3D", "WEBCAM",
})
SEED_NAMES = ("seed", "noise_seed")  # INT widgets that get a control widget unless told otherwise
CONTROL_VALUE = "fixed"  # the control value written after such widgets: replays the same prompt
# Inputs that frontend extensions add to some node types (name, widget type, value it saves).
_AUDIO_UI = ("audioUI", "AUDIO_UI", None)  # Comfy.AudioWidget
_PREVIEW_3D = ("image", "PREVIEW_3D", "")  # Comfy.Preview3D, Comfy.SaveGLB
CLASS_UI_INPUTS = {
    "LoadAudio": (_AUDIO_UI,), "SaveAudio": (_AUDIO_UI,), "PreviewAudio": (_AUDIO_UI,),
    "SaveAudioMP3": (_AUDIO_UI,), "SaveAudioOpus": (_AUDIO_UI,),
    "Preview3D": (_PREVIEW_3D,), "SaveGLB": (_PREVIEW_3D,),
}
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})  # frontend-only nodes: no part of the prompt

SHAPE_HOLLOW_CIRCLE = 7  # RenderShape.HollowCircle: optional input
SHAPE_GRID = 6  # LiteGraph.GRID_SHAPE: list output

# Layout (canvas units): columns by graph depth, nodes stacked top to bottom in a column.
ORIGIN = (50, 50)
COLUMN_GAP = 80
ROW_GAP = 70  # includes the title bar, which is drawn above a node's pos
NODE_TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT in frontend 1.35
GROUP_TITLE_HEIGHT = 50  # a group's title bar at font size 24
GROUP_FONT_SIZE = 24
GROUP_PADDING = 20
GROUP_GAP = 60
GROUP_COLOR = "#3f789e"
NOTE_TYPE = "MarkdownNote"
NOTE_SIZE = (660, 190)
# Where the page opens a workflow: content's top-left at (x, y) screen pixels, right of the sidebar
# and below the toolbar, zoomed to show VIEW_WIDTH pixels of graph, never below MIN_VIEW_SCALE.
VIEW_MARGIN = (80, 110)
VIEW_WIDTH = 1500
MIN_VIEW_SCALE = 0.6
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
MULTILINE_HEIGHT = 100
NODE_WIDTH = 315
BARE_NODE_WIDTH = 210  # no widgets
MULTILINE_WIDTH = 400
# Room a node's preview takes once the workflow has run (measured in frontend 1.35.9 with the pack's
# demo): an image node grows by its preview area, whatever the batch (the page fits a grid into it);
# a text preview keeps its size and scrolls, so it gets enough room to read a report. (min width, extra height)
IMAGE_PREVIEW = (NODE_WIDTH, 232)
TEXT_PREVIEW = (400, 160)
PREVIEWS = {"SaveImage": IMAGE_PREVIEW, "PreviewImage": IMAGE_PREVIEW, "LoadImage": IMAGE_PREVIEW,
            "PreviewAny": TEXT_PREVIEW}


class WorkflowError(ValueError):
    """A graph that cannot be converted (unknown node or input, a value where a link must be...)."""


# ---- node definitions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # the frontend's type: "COMBO" for a list of options, else the declared type
    options: dict[str, Any]
    optional: bool
    widget: bool  # a widget on the node (else a socket)
    control: bool = False  # followed by a "control after generate" widget
    ui_only: bool = False  # added by a frontend extension; never part of the prompt
    ui_value: Any = None  # the value such a widget saves


@dataclass(frozen=True)
class NodeSpec:
    class_type: str
    display_name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[tuple[str, str, bool], ...]  # (name, type, is_list)
    sockets: tuple[InputSpec, ...] = field(init=False)
    widgets: tuple[InputSpec, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sockets", tuple(i for i in self.inputs if not i.widget))
        object.__setattr__(self, "widgets", tuple(i for i in self.inputs if i.widget))

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name and not i.ui_only), None)

    @property
    def widget_count(self) -> int:
        """Length of widgets_values: every widget, plus one per control widget."""
        return sum(2 if w.control else 1 for w in self.widgets)


def _spec_type(spec: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return "UNKNOWN", {}
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(spec[0], list):
        return "COMBO", options
    if isinstance(spec[0], str):
        return spec[0], options
    return "UNKNOWN", options


def _make_input(name: str, spec: Any, optional: bool) -> InputSpec:
    type_, options = _spec_type(spec)
    widget_type = options.get("widgetType") or type_
    widget = widget_type in WIDGET_TYPES and not options.get("forceInput")
    control = False
    if widget and widget_type == "INT":
        flag = options.get("control_after_generate")  # JS: flag ?? SEED_NAMES.includes(name)
        control = bool(flag) if flag is not None else name in SEED_NAMES
    elif widget and widget_type == "COMBO":
        control = bool(options.get("control_after_generate"))
    return InputSpec(name, type_, options, optional, widget, control)


def node_spec(class_type: str, object_info: dict[str, Any]) -> NodeSpec:
    """The inputs and outputs the frontend builds for a node type, in its order."""
    node_def = object_info.get(class_type)
    if node_def is None:
        raise WorkflowError(f"node type {class_type!r} is not in /object_info (is its pack loaded?)")
    declared = node_def.get("input") or {}
    required = dict(declared.get("required") or {})
    optional = dict(declared.get("optional") or {})

    # Frontend extensions add required inputs in beforeRegisterNodeDef (in this order).
    extra: dict[str, tuple[str, Any]] = {}
    for name, type_, value in CLASS_UI_INPUTS.get(class_type, ()):
        extra[name] = (type_, value)
    audio = required.get("audio")
    if audio is not None and _spec_type(audio)[1].get("audio_upload") is True:  # Comfy.UploadAudio
        extra["upload"] = ("AUDIOUPLOAD", None)
    for spec in required.values():  # Comfy.UploadImage: the first media combo gets a button
        type_, options = _spec_type(spec)
        if type_ == "COMBO" and any(options.get(k) is True for k in
                                    ("image_upload", "video_upload", "animated_image_upload")):
            extra["upload"] = ("IMAGEUPLOAD", "image")
            break

    # `required[name] = ...` in JS: a new key goes last, an existing one keeps its place.
    for name, (type_, value) in extra.items():
        required[name] = InputSpec(name, type_, {}, False, True, ui_only=True, ui_value=value)

    # getOrderedInputSpecs: input_order (required, then optional), then every input it does not
    # name, required before optional (so the extensions' inputs come last). An optional input
    # replaces a required one of the same name, as in transformNodeDefV1ToV2.
    order = node_def.get("input_order") or {}
    names = [(n, False) for n in order.get("required") or [] if n in required and n not in optional]
    names += [(n, True) for n in order.get("optional") or [] if n in optional]
    seen = {n for n, _ in names}
    names += [(n, False) for n in required if n not in seen and n not in optional]
    names += [(n, True) for n in optional if n not in seen]

    inputs = []
    for name, is_optional in names:
        spec = optional[name] if is_optional else required[name]
        inputs.append(spec if isinstance(spec, InputSpec) else _make_input(name, spec, is_optional))

    out_types = node_def.get("output") or []
    out_names = node_def.get("output_name") or []
    out_lists = node_def.get("output_is_list") or []
    outputs = []
    for k, out_type in enumerate(out_types):
        name = out_names[k] if k < len(out_names) and out_names[k] else f"output_{k}"
        outputs.append((name, "COMBO" if isinstance(out_type, list) else str(out_type),
                        bool(out_lists[k]) if k < len(out_lists) else False))
    display = node_def.get("display_name") or node_def.get("name") or class_type
    return NodeSpec(class_type, display, tuple(inputs), tuple(outputs))


def _placeholder(spec: InputSpec) -> Any:
    """The value a linked widget keeps (the frontend's default for a new widget)."""
    if spec.ui_only:
        return spec.ui_value
    if "default" in spec.options:
        return spec.options["default"]
    # Not the first combo option: lists of model files differ from machine to machine.
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(spec.type)


def _is_link(value: Any) -> bool:
    # The rule ComfyUI's executor uses to tell a link from a value.
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) \
        and not isinstance(value[1], bool) and isinstance(value[0], (str, int))


def _node_id(key: str) -> int:
    if not isinstance(key, str) or not key.isdigit() or str(int(key)) != key or int(key) < 1:
        raise WorkflowError(f"API node id {key!r}: the UI format needs ids that are positive integers "
                            "written without leading zeros")
    return int(key)


# ---- API -> UI ----------------------------------------------------------------------------------

def api_to_ui(api_graph: dict[str, Any], object_info: dict[str, Any], guide: Guide | None = None) -> dict[str, Any]:
    """The UI (litegraph) workflow for an API-format graph, laid out in the guide's groups with its note
    (without a guide: no groups, no note); deterministic for a given input."""
    ids = {key: _node_id(key) for key in api_graph}
    specs: dict[int, NodeSpec] = {}
    for key, node in api_graph.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise WorkflowError(f"API node {key}: no class_type")
        specs[ids[key]] = node_spec(node["class_type"], object_info)

    # Every node's UI inputs: sockets, then linked widgets; each (spec, origin or None).
    node_inputs: dict[int, list[tuple[InputSpec, tuple[int, int] | None]]] = {}
    values: dict[int, list[Any]] = {}
    for key in sorted(api_graph, key=ids.__getitem__):
        nid, node, spec = ids[key], api_graph[key], specs[ids[key]]
        given = node.get("inputs") or {}
        where = f"node {key} ({spec.class_type})"
        for name in given:
            if spec.input(name) is None:
                raise WorkflowError(f"{where}: no input {name!r} in its definition")
        origins: dict[str, tuple[int, int]] = {}
        for name, value in given.items():
            if _is_link(value):
                origin_key, slot = str(value[0]), value[1]
                if origin_key not in ids:
                    raise WorkflowError(f"{where}: input {name!r} links to missing node {origin_key}")
                n_out = len(specs[ids[origin_key]].outputs)
                if not 0 <= slot < n_out:
                    raise WorkflowError(f"{where}: input {name!r} links to output {slot} of node "
                                        f"{origin_key}, which has {n_out}")
                origins[name] = (ids[origin_key], slot)
            elif not spec.input(name).widget:
                raise WorkflowError(f"{where}: socket input {name!r} holds a value ({value!r}); "
                                    "the UI format can only link it")
        missing = [w.name for w in spec.widgets if not w.ui_only and w.name not in given]
        if missing:
            raise WorkflowError(f"{where}: widget input(s) {', '.join(missing)} missing; the UI "
                                "sends every widget value, so write them out in the API graph")
        slots = [(s, origins.get(s.name)) for s in spec.sockets]
        slots += [(w, origins[w.name]) for w in spec.widgets if w.name in origins]
        node_inputs[nid] = slots
        widgets_values: list[Any] = []
        for w in spec.widgets:
            linked = w.ui_only or w.name in origins
            widgets_values.append(_placeholder(w) if linked else copy.deepcopy(given[w.name]))
            if w.control:
                widgets_values.append(CONTROL_VALUE)
        values[nid] = widgets_values

    # Links, numbered by target node, then target slot.
    links: list[list[Any]] = []
    input_links: dict[tuple[int, int], int] = {}
    output_links: dict[tuple[int, int], list[int]] = {}
    for nid in sorted(node_inputs):
        for slot, (_, origin) in enumerate(node_inputs[nid]):
            if origin is None:
                continue
            link_id = len(links) + 1
            links.append([link_id, origin[0], origin[1], nid, slot, specs[origin[0]].outputs[origin[1]][1]])
            input_links[(nid, slot)] = link_id
            output_links.setdefault(origin, []).append(link_id)

    edges = {nid: sorted({o[0] for _, o in node_inputs[nid] if o is not None}) for nid in node_inputs}
    order = _execution_order(edges)
    layout = _layout(edges, specs, api_graph, ids, guide)
    positions, sizes = layout.positions, layout.sizes

    nodes = []
    for key in sorted(api_graph, key=ids.__getitem__):
        nid, spec, meta = ids[key], specs[ids[key]], api_graph[key].get("_meta") or {}
        ui_node: dict[str, Any] = {
            "id": nid,
            "type": spec.class_type,
            "pos": list(positions[nid]),
            "size": list(sizes[nid]),
            "flags": {},
            "order": order[nid],
            "mode": 0,
            "inputs": [_ui_input(s, input_links.get((nid, k))) for k, (s, _) in enumerate(node_inputs[nid])],
            "outputs": [_ui_output(name, type_, is_list, k, output_links.get((nid, k), []))
                        for k, (name, type_, is_list) in enumerate(spec.outputs)],
        }
        if "title" in meta:
            ui_node["title"] = meta["title"]
        ui_node["properties"] = {"Node name for S&R": spec.class_type}
        ui_node["widgets_values"] = values[nid]
        nodes.append(ui_node)
    if guide is not None and layout.note is not None:
        nodes.append({
            "id": max(ids.values(), default=0) + 1, "type": NOTE_TYPE, "pos": list(layout.note),
            "size": list(NOTE_SIZE), "flags": {}, "order": len(nodes), "mode": 0, "inputs": [],
            "outputs": [], "title": "About this workflow", "properties": {}, "widgets_values": [guide.note],
        })
    groups = [{"id": k + 1, "title": title, "bounding": bounding, "color": GROUP_COLOR,
               "font_size": GROUP_FONT_SIZE, "flags": {}} for k, (title, bounding) in enumerate(layout.groups)]

    canonical = json.dumps(api_graph, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tuneqdm:workflow:{digest}")),
        "revision": 0,
        "last_node_id": max((node["id"] for node in nodes), default=0),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": _view(layout)},
        "version": 0.4,
    }


def _ui_input(spec: InputSpec, link: int | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": spec.name}
    if spec.optional:
        entry["shape"] = SHAPE_HOLLOW_CIRCLE
    entry["type"] = spec.type
    if spec.widget:
        entry["widget"] = {"name": spec.name}
    entry["link"] = link
    return entry


def _ui_output(name: str, type_: str, is_list: bool, slot: int, links: list[int]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name}
    if is_list:
        entry["shape"] = SHAPE_GRID
    entry.update({"type": type_, "slot_index": slot, "links": sorted(links)})
    return entry


def _execution_order(edges: dict[int, list[int]]) -> dict[int, int]:
    """A topological order (Kahn), ties broken by node id; cycles go last, by id."""
    pending = {nid: set(up) for nid, up in edges.items()}
    order: dict[int, int] = {}
    while pending:
        ready = sorted(nid for nid, up in pending.items() if not up) or [min(pending)]
        nid = ready[0]
        order[nid] = len(order)
        del pending[nid]
        for up in pending.values():
            up.discard(nid)
    return order


def _layout(edges: dict[int, list[int]], specs: dict[int, NodeSpec], api_graph: dict[str, Any],
            ids: dict[str, int], guide: Guide | None) -> Layout:
    """The guide's groups in columns (each column's groups stacked), the note above them; without a
    guide, one unframed group of every node. Sizes are the ones a run leaves, so nothing overlaps then."""
    sizes = {}
    for key, nid in ids.items():
        title = (api_graph[key].get("_meta") or {}).get("title") or specs[nid].display_name
        sizes[nid] = _node_size(specs[nid], title)
    if guide is None:
        block = _group_block(sorted(edges), edges, sizes, framed=False)
        return Layout(_shifted(block.positions, ORIGIN), sizes, [], None)

    placed = [nid for column in guide.columns for group in column for nid in group.nodes]
    if sorted(placed) != sorted(edges):
        extra, missing = sorted(set(placed) - set(edges)), sorted(set(edges) - set(placed))
        raise WorkflowError(f"the guide's groups must hold every node once: missing {missing}, "
                            f"unknown {extra}, {len(placed) - len(set(placed))} repeated")
    note_top = ORIGIN[1]
    top = note_top + NOTE_SIZE[1] + GROUP_GAP + NODE_TITLE_HEIGHT
    positions: dict[int, tuple[int, int]] = {}
    groups: list[tuple[str, list[int]]] = []
    x = ORIGIN[0]
    for column in guide.columns:
        y, width = top, 0
        for group in column:
            block = _group_block(list(group.nodes), edges, sizes, framed=True, known=positions)
            positions.update(_shifted(block.positions, (x, y)))
            groups.append((group.title, [x, y, block.width, block.height]))
            y += block.height + GROUP_GAP
            width = max(width, block.width)
        x += width + GROUP_GAP
    note = (ORIGIN[0], note_top + NODE_TITLE_HEIGHT)
    return Layout(positions, sizes, groups, note)


@dataclass(frozen=True)
class Layout:
    positions: dict[int, tuple[int, int]]  # a node's pos: the top-left of its body, under the title bar
    sizes: dict[int, tuple[int, int]]
    groups: list[tuple[str, list[int]]]  # (title, [x, y, width, height]) in reading order
    note: tuple[int, int] | None  # the note's pos


@dataclass(frozen=True)
class _Block:
    positions: dict[int, tuple[int, int]]  # relative to the block's top-left
    width: int
    height: int


def _group_block(members: list[int], edges: dict[int, list[int]], sizes: dict[int, tuple[int, int]],
                 framed: bool, known: dict[int, tuple[int, int]] | None = None) -> _Block:
    """Columns by longest path from the group's sources (a source sits just left of its first consumer);
    in a column, nodes ordered by where their inputs come from, each at least as low as its first input
    in the group, so that chains (sampler, decode, save) read as rows."""
    inside = set(members)
    ups = {nid: [u for u in edges[nid] if u in inside] for nid in members}
    depth: dict[int, int] = {}

    def longest(nid: int, stack: frozenset[int] = frozenset()) -> int:
        if nid not in depth:
            cut = [u for u in ups[nid] if u not in stack]  # a cycle is cut where it closes
            depth[nid] = 1 + max((longest(u, stack | {nid}) for u in cut), default=-1)
        return depth[nid]

    for nid in sorted(members):
        longest(nid)
    consumers: dict[int, list[int]] = {nid: [] for nid in members}
    for nid in members:
        for u in ups[nid]:
            consumers[u].append(nid)
    column = dict(depth)
    for nid in members:
        if not ups[nid] and consumers[nid]:
            column[nid] = max(0, min(depth[c] for c in consumers[nid]) - 1)

    pad_x = GROUP_PADDING if framed else 0
    first_y = GROUP_TITLE_HEIGHT + GROUP_PADDING + NODE_TITLE_HEIGHT if framed else 0
    outside = dict(known or {})
    positions: dict[int, tuple[int, int]] = {}

    def mean_y(placed: dict[int, tuple[int, int]], nodes: list[int]) -> float:
        ys = [placed[u][1] for u in nodes if u in placed]
        return sum(ys) / len(ys) if ys else float("inf")

    x = pad_x
    for col in sorted(set(column.values())):
        in_column = [nid for nid in members if column[nid] == col]
        order = sorted(in_column, key=lambda n: (mean_y(positions, ups[n]), mean_y(outside, edges[n]), n))
        y = first_y
        for nid in order:
            first_up = next((positions[u][1] for u in ups[nid] if u in positions), first_y)
            y = max(y, first_up)
            positions[nid] = (x, y)
            y += sizes[nid][1] + ROW_GAP
        x += max(sizes[nid][0] for nid in in_column) + COLUMN_GAP
    width = max(positions[n][0] + sizes[n][0] for n in members) + pad_x
    height = max(positions[n][1] + sizes[n][1] for n in members) + (GROUP_PADDING if framed else 0)
    return _Block(positions, width, height)


def _shifted(positions: dict[int, tuple[int, int]], by: tuple[int, int]) -> dict[int, tuple[int, int]]:
    return {nid: (x + by[0], y + by[1]) for nid, (x, y) in positions.items()}


def _view(layout: Layout) -> dict[str, Any]:
    """Where the page opens: the top-left of the graph just below the toolbar, zoomed out as far as
    needed to show the graph's width, but not below where the page stops drawing text."""
    right = max(x + layout.sizes[n][0] for n, (x, _) in layout.positions.items())
    if layout.note is not None:
        right = max(right, layout.note[0] + NOTE_SIZE[0])
    scale = round(max(MIN_VIEW_SCALE, min(1.0, VIEW_WIDTH / (right - ORIGIN[0] + VIEW_MARGIN[0]))), 2)
    offset = [round(VIEW_MARGIN[0] / scale - ORIGIN[0], 1),
              round(VIEW_MARGIN[1] / scale - ORIGIN[1] + NODE_TITLE_HEIGHT, 1)]
    return {"scale": scale, "offset": offset}


def _node_size(spec: NodeSpec, title: str) -> tuple[int, int]:
    """The size the page gives the node (slot rows, then widget rows, multiline text taller), plus the
    room its preview takes after a run (images, text)."""
    multiline = [w for w in spec.widgets if w.type == "STRING" and w.options.get("multiline")]
    rows = max(len(spec.sockets), len(spec.outputs), 1)
    height = rows * SLOT_HEIGHT + 6
    if spec.widgets:
        height += 8 + len(multiline) * MULTILINE_HEIGHT
        height += (spec.widget_count - len(multiline)) * WIDGET_HEIGHT
    width = MULTILINE_WIDTH if multiline else NODE_WIDTH if spec.widgets else BARE_NODE_WIDTH
    width = max(width, 8 * len(title) + 60)
    preview = PREVIEWS.get(spec.class_type)
    if preview is not None:
        width, height = max(width, preview[0]), height + preview[1]
    return width, height


# ---- UI -> API ----------------------------------------------------------------------------------

def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API-format graph a UI workflow queues (what the frontend's "Export (API)" gives), for
    workflows of plain nodes: note nodes are dropped; primitive, reroute, group, subgraph, muted and
    bypassed nodes are refused."""
    links: dict[int, tuple[int, int]] = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported")

    api: dict[str, Any] = {}
    for node in sorted(ui.get("nodes") or [], key=lambda n: n["id"]):
        where = f"node {node['id']} ({node.get('type')})"
        if node.get("type") in NOTE_TYPES:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"{where}: mode {node.get('mode')} (muted/bypassed) is not supported")
        spec = node_spec(node["type"], object_info)
        linked: dict[str, list[Any]] = {}
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            if slot["link"] not in links:
                raise WorkflowError(f"{where}: input {slot['name']!r} uses missing link {slot['link']}")
            name = (slot.get("widget") or {}).get("name") or slot["name"]
            origin_id, origin_slot = links[slot["link"]]
            linked[name] = [str(origin_id), origin_slot]

        widget_values = node.get("widgets_values") or []
        by_widget: dict[str, Any] = {}
        if isinstance(widget_values, dict):
            by_widget = dict(widget_values)
        else:
            if len(widget_values) != spec.widget_count:
                raise WorkflowError(f"{where}: {len(widget_values)} widgets_values, its definition "
                                    f"has {spec.widget_count}")
            k = 0
            for w in spec.widgets:
                by_widget[w.name] = widget_values[k]
                k += 2 if w.control else 1

        inputs: dict[str, Any] = {}
        for spec_in in spec.inputs:
            if spec_in.ui_only:
                continue
            if spec_in.name in linked:
                inputs[spec_in.name] = linked[spec_in.name]
            elif spec_in.widget and spec_in.name in by_widget:
                inputs[spec_in.name] = by_widget[spec_in.name]
        unknown = set(linked) - set(inputs)
        if unknown:
            raise WorkflowError(f"{where}: links into unknown input(s) {', '.join(sorted(unknown))}")
        entry: dict[str, Any] = {"inputs": inputs, "class_type": spec.class_type}
        if "title" in node:
            entry["_meta"] = {"title": node["title"]}
        api[str(node["id"])] = entry
    for key, entry in api.items():
        for name, value in entry["inputs"].items():
            if _is_link(value) and value[0] not in api:
                raise WorkflowError(f"node {key}: input {name!r} links to node {value[0]}, which is "
                                    "not part of the prompt")
    return api


# ---- files --------------------------------------------------------------------------------------

def dumps(workflow: dict[str, Any]) -> str:
    """The committed text of a workflow file."""
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def api_files(workflows_dir: Path = WORKFLOWS_DIR) -> list[Path]:
    return sorted((workflows_dir / "api").glob("*.json"))


def ui_path(api_path: Path) -> Path:
    """example_workflows/api/<name>.json -> example_workflows/<name>.json"""
    return api_path.parent.parent / api_path.name


def render(api_path: Path, object_info: dict[str, Any]) -> str:
    api_graph = json.loads(api_path.read_text(encoding="utf-8"))
    try:
        return dumps(api_to_ui(api_graph, object_info, GUIDES.get(api_path.stem)))
    except WorkflowError as err:
        raise WorkflowError(f"{api_path}: {err}") from None


def fetch_object_info(server: str, timeout: float = 120.0) -> dict[str, Any]:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=timeout) as resp:
        return json.loads(resp.read())


def sync(object_info: dict[str, Any], check: bool, workflows_dir: Path = WORKFLOWS_DIR,
         out: Any = sys.stdout) -> int:
    """Regenerates (or, with check, compares) every UI workflow; returns the exit status."""
    sources = api_files(workflows_dir)
    if not sources:
        print(f"no API workflows in {workflows_dir / 'api'}", file=out)
    differ = 0
    for api_path in sources:
        target = ui_path(api_path)
        text = render(api_path, object_info)
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            print(f"up to date  {_rel(target)}", file=out)
        elif check:
            differ += 1
            print(f"DIFFERS     {_rel(target)} (regenerate: python scripts/workflows.py --start, or --server URL)",
                  file=out)
            diff = difflib.unified_diff((current or "").splitlines(), text.splitlines(),
                                        f"{_rel(target)} (committed)", f"{_rel(target)} (generated)",
                                        lineterm="", n=2)
            for k, line in enumerate(diff):
                if k == 40:
                    print("    ...", file=out)
                    break
                print("    " + line, file=out)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote       {_rel(target)}", file=out)
    names = {p.name for p in sources}
    for orphan in sorted(p for p in workflows_dir.glob("*.json") if p.name not in names):
        print(f"note: {_rel(orphan)} has no API source in {_rel(workflows_dir / 'api')}", file=out)
    return 1 if differ else 0


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", metavar="URL", help="a running ComfyUI with this pack loaded")
    source.add_argument("--start", action="store_true",
                        help="start a throwaway ComfyUI from this checkout's .comfyui host")
    source.add_argument("--object-info", metavar="FILE", type=Path, help="a saved /object_info answer")
    parser.add_argument("--check", action="store_true",
                        help="only compare; exit 1 if a UI workflow differs from its API source")
    parser.add_argument("--workflows", metavar="DIR", type=Path, default=WORKFLOWS_DIR,
                        help=f"the workflows folder (default: {_rel(WORKFLOWS_DIR)})")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        if args.object_info:
            object_info = json.loads(args.object_info.read_text(encoding="utf-8"))
        elif args.server:
            object_info = fetch_object_info(args.server)
        else:
            sys.path.insert(0, str(REPO_ROOT))
            os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: CPU-only host
            from tuneqdm_fixtures.server import ComfyServer
            with ComfyServer() as server:
                object_info = server.object_info()
        return sync(object_info, args.check, args.workflows)
    except (OSError, WorkflowError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
