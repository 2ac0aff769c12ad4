"""The example workflows in ComfyUI's own page: headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium; nothing downloaded at run time) on a real ComfyUI 0.8.0 server with the pack.

Each workflow opens from the templates menu (Templates -> Extensions -> ComfyUI-TuneQDM) with its
thumbnail shown, no missing-node warning, no dialog and no console error from the pack, laid out with
no two nodes or groups overlapping; the prompt the page would send is the workflow's API copy; and the
demo runs from the Run button to success, still with nothing overlapping once its previews are shown.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tuneqdm_fixtures import browser as comfy_page
from tuneqdm_fixtures.graph import output_files
from tuneqdm_fixtures.host import host_version
from tuneqdm_fixtures.paths import checkout
from tuneqdm_fixtures.server import PACK_FOLDER, ComfyServer

pytestmark = pytest.mark.server

REPO_ROOT = checkout()
WORKFLOWS_DIR = REPO_ROOT / "example_workflows"
NAMES = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
DEMO = "default_model_demo"
# The demo as a user would try it quickly: fewer training and sampling steps (it runs 100 + 9 x 20).
DEMO_STEPS = 3




@pytest.fixture(scope="module")
def page(request: pytest.FixtureRequest) -> Any:
    reason = comfy_page.browser_missing()
    if reason:
        pytest.skip(f"no headless browser here: {reason}")
    if host_version()[:2] != (0, 8):
        pytest.skip("the page checks are written against ComfyUI 0.8.0's page (frontend 1.35); "
                    f"this host is {'.'.join(map(str, host_version()))}")
    server: ComfyServer = request.getfixturevalue("comfy_server")  # started only when the page can be driven
    with comfy_page.ComfyPage(server.url) as opened:
        opened.console()  # start-up noise (no user.css, no favicon) is the page's, not the pack's
        yield opened


def _pack_errors(entries: list[dict[str, Any]], name: str | None = None) -> list[str]:
    """Console errors that name the pack, its templates or the workflow `name`."""
    marks = ("tuneqdm", PACK_FOLDER.lower(), "workflow_templates") + ((name.lower(),) if name else ())
    return [e["message"] for e in entries
            if e.get("level") == "SEVERE" and any(m in e["message"].lower() for m in marks)]


def _overlaps(boxes: dict[str, list[float]]) -> list[tuple[str, str]]:
    """Pairs of nodes, or pairs of groups, whose boxes intersect."""
    def meet(a: list[float], b: list[float]) -> bool:
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    keys = sorted(boxes)
    return [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]
            if a.startswith("group:") == b.startswith("group:") and meet(boxes[a], boxes[b])]


def _misplaced(boxes: dict[str, list[float]], notes: list[str]) -> list[str]:
    """Nodes that no group holds entirely, and notes that a group overlaps (the note stands apart)."""
    groups = [b for k, b in boxes.items() if k.startswith("group:")]

    def inside(n: list[float], g: list[float]) -> bool:
        return g[0] <= n[0] and g[1] <= n[1] and n[0] + n[2] <= g[0] + g[2] and n[1] + n[3] <= g[1] + g[3]

    def meet(a: list[float], b: list[float]) -> bool:
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    return [k for k, b in boxes.items() if not k.startswith("group:") and (
        any(meet(b, g) for g in groups) if k in notes else not any(inside(b, g) for g in groups))]


def _notes(page: Any) -> list[str]:
    return page.js("return app.graph._nodes.filter(n => n.type === 'MarkdownNote' || n.type === 'Note')"
                   ".map(n => String(n.id))")


def _declared_inputs(node_def: dict[str, Any]) -> set[str]:
    declared = node_def.get("input") or {}
    return set(declared.get("required") or {}) | set(declared.get("optional") or {})


def test_templates_dialog_shows_every_workflow_with_its_thumbnail(page: Any) -> None:
    assert NAMES, "example_workflows/ holds no workflow"
    page.open_templates_dialog(PACK_FOLDER)
    # The dialog fetches each thumbnail (/api/workflow_templates/<pack>/<name>.jpg) and shows it from a blob.
    thumbs = page.wait_until(lambda: (lambda found: found if len(found) == len(NAMES) else None)(page.js(
        "const out = {};"
        "for (const card of document.querySelectorAll('[data-testid^=template-workflow-]')) {"
        "  const img = card.querySelector('img');"
        "  if (img && img.complete && img.naturalWidth > 0)"
        "    out[card.dataset.testid.slice('template-workflow-'.length)] = img.naturalWidth;"
        "}"
        "return out;")), 60, "every thumbnail to load")
    assert sorted(thumbs) == NAMES
    page.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}))")
    assert _pack_errors(page.console()) == []  # no thumbnail 404, no failed template request


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_from_the_templates_menu_and_queues_its_api_copy(
        page: Any, comfy_server: ComfyServer, name: str) -> None:
    page.console()
    page.open_template(PACK_FOLDER, name)

    assert page.missing_node_types() == []
    assert page.dialogs() == []
    assert _pack_errors(page.console(), name) == []

    boxes = page.boxes()
    assert _overlaps(boxes) == []
    notes = _notes(page)
    assert len(notes) == 1
    assert _misplaced(boxes, notes) == []

    api = json.loads((WORKFLOWS_DIR / "api" / f"{name}.json").read_text(encoding="utf-8"))
    sent = page.prompt()
    assert sorted(sent, key=int) == sorted(api, key=int)
    object_info = comfy_server.object_info()
    for node_id, expected in api.items():
        got = sent[node_id]
        assert got["class_type"] == expected["class_type"], node_id
        declared = _declared_inputs(object_info[expected["class_type"]])
        # The page adds the values of its own preview widgets (PreviewAny's `preview`, `previewMode`),
        # which the node does not declare; every declared input is sent exactly as in the API copy.
        assert {k: v for k, v in got["inputs"].items() if k in declared} == expected["inputs"], node_id
        assert not set(expected["inputs"]) - declared, node_id


def test_demo_runs_from_the_run_button(page: Any, comfy_server: ComfyServer) -> None:
    page.open_template(PACK_FOLDER, DEMO)
    assert page.set_widgets("steps", DEMO_STEPS) == 10  # the training node and the nine samplers
    sent_before = len(page.queued())
    page.click_run()
    queued = page.wait_until(lambda: page.queued()[sent_before:], 60, "the page to queue the prompt")
    assert len(queued) == 1 and queued[0]["prompt_id"], queued
    entry = comfy_server.wait(queued[0]["prompt_id"], timeout=600)
    assert comfy_server.execution_error(entry) is None, comfy_server.execution_error(entry)
    assert entry["status"]["status_str"] == "success"

    names = [p.name for p in output_files(entry, comfy_server.output_dir)]
    for model in ("float", "w4", "w4_tuneqdm"):
        for prompt in ("sks", "three", "seven"):
            assert sum(n.startswith(f"{model}_{prompt}_") for n in names) == 8, (model, prompt, names)
    assert any(n.startswith("loss_curve") for n in names)

    # The page got every result, and shows them once drawn: an 8-image grid on each sample's Save Image
    # node, the loss curve, the reports' text. Every node in view, so every preview is drawn and sized.
    images = page.js("const out = {}; for (const [id, o] of Object.entries(app.nodeOutputs || {}))"
                     "  if (o.images) out[id] = o.images.length; return out;")
    assert sorted(images.values()) == [1] + [8] * 9, images
    page.fit_graph()
    page.wait_until(lambda: page.js(
        "return app.graph._nodes.filter(n => n.type === 'SaveImage').every(n => n.imgs && n.imgs.length"
        "  && n.imgs.every(i => i.complete && i.naturalWidth > 0))"), 60, "every image preview to be drawn")
    page.js("app.canvas.setDirty(true, true)")
    time.sleep(1.0)  # nodes resize for their previews on the next frame
    assert _overlaps(page.boxes()) == []
    assert _misplaced(page.boxes(), _notes(page)) == []
    assert _pack_errors(page.console(), DEMO) == []
