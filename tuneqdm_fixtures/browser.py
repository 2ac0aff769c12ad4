"""ComfyUI's page in headless Chromium, driven by Selenium: open the pack's templates, read the graph
and the prompt it would queue, press Run, take screenshots. Used by tests/test_browser.py and
scripts/thumbnails.py.

The browser and its driver are the system's (Debian's `chromium` and `chromium-driver`); the driver's
path is given to Selenium, so Selenium Manager never downloads one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("TUNEQDM_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("TUNEQDM_CHROMEDRIVER", "/usr/bin/chromedriver"))
# No sandbox (root in CI containers), no GPU, and nothing that phones home at start-up.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")
WINDOW = (1600, 1000)
NODE_TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above a node's pos

# Installed into the page once it is up: records every missing-node warning the page would show, and
# every prompt it sends (the body's `prompt` and the id the server gave it).
_HOOKS = """
window.__tuneqdm = {missing: [], queued: []};
const show = app.showMissingNodesError.bind(app);
app.showMissingNodesError = (types, ...rest) => {
    window.__tuneqdm.missing.push(...types.map(t => (typeof t === 'string' ? t : t.type)));
    return show(types, ...rest);
};
const queue = app.api.queuePrompt.bind(app.api);
app.api.queuePrompt = async (number, data, ...rest) => {
    const answer = await queue(number, data, ...rest);
    window.__tuneqdm.queued.push({prompt: data.output, prompt_id: answer && answer.prompt_id});
    return answer;
};
"""


class PageError(RuntimeError):
    """The page did not do what was asked in time (a template that does not open, a run that fails)."""


def browser_missing() -> str | None:
    """Why the page cannot be driven here, or None when it can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"{path} not found: install Debian's {package} (scripts/setup.sh does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed in this venv (scripts/setup.sh installs it)"
    return None


class ComfyPage:
    """One headless Chromium on a ComfyUI server's page, with a fresh profile."""

    def __init__(self, url: str, window: tuple[int, int] = WINDOW) -> None:
        self.url = url.rstrip("/")
        self.window = window
        self.driver: Any = None
        self._profile: str | None = None

    def __enter__(self) -> "ComfyPage":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, timeout: float = 120.0) -> "ComfyPage":
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        reason = browser_missing()
        if reason:
            raise PageError(reason)
        self._profile = tempfile.mkdtemp(prefix="tuneqdm-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self._profile}")
        options.add_argument(f"--window-size={self.window[0]},{self.window[1]}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.driver.set_script_timeout(timeout)
        self.driver.get(self.url)
        self.wait_until(lambda: self.js("return !!(window.app && app.graph && app.extensionManager "
                                   "&& app.extensionManager.command)"), timeout, "the page to start")
        self.js(_HOOKS)
        return self

    def close(self) -> None:
        if self.driver is not None:
            self.driver.quit()
            self.driver = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    # ---- page access ------------------------------------------------------------------------

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def js_async(self, body: str, *args: Any) -> Any:
        """Runs `body` (an async function body that returns a value) and returns that value."""
        script = ("const done = arguments[arguments.length - 1];"
                  f"(async (...args) => {{ {body} }})(...Array.from(arguments).slice(0, -1))"
                  ".then(done, e => done({__error: String(e && e.stack || e)}));")
        result = self.driver.execute_async_script(script, *args)
        if isinstance(result, dict) and "__error" in result:
            raise PageError(f"script failed in the page: {result['__error']}")
        return result

    def console(self) -> list[dict[str, Any]]:
        """The console entries logged since the last call (SEVERE = errors and failed requests)."""
        return self.driver.get_log("browser")

    def wait_until(self, ready: Any, timeout: float, what: str) -> Any:
        """The first truthy value of `ready()`, polled until `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                raise PageError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.25)

    # ---- templates --------------------------------------------------------------------------

    def open_templates_dialog(self, module: str, timeout: float = 60.0) -> None:
        """The Templates dialog showing `module`'s category (under Extensions), as a user opens it."""
        from selenium.webdriver.common.by import By

        self.js("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        category = self.wait_until(lambda: self.driver.find_elements(
            By.XPATH, f"//div[contains(@class, 'cursor-pointer')][normalize-space(.)='{module}']"),
            timeout, f"the templates dialog's {module} category")
        category[0].click()

    def open_template(self, module: str, name: str, timeout: float = 60.0) -> None:
        """Opens a custom-node template the way a user does: the Templates dialog, the module's
        category, then the template's card."""
        from selenium.webdriver.common.by import By

        self.open_templates_dialog(module, timeout)
        card = self.wait_until(lambda: self.driver.find_elements(
            By.CSS_SELECTOR, f"[data-testid='template-workflow-{name}']"), timeout, f"the {name} card")
        opened_before = self.js("return app.extensionManager.workflow.openWorkflows.map(w => w.path)")
        card[0].click()
        # A new tab named after the template ("<name> (2)" when one is open already), dialog closed.
        self.wait_until(lambda: self.js(
            "const [name, before] = arguments;"
            "const w = app.extensionManager.workflow.activeWorkflow;"
            "return !!w && !before.includes(w.path) && (w.filename === name || w.filename.startsWith(name + ' ('))"
            "  && app.graph._nodes.length > 0"
            "  && !document.querySelector(\"[data-testid^='template-workflow-']\")", name, opened_before),
            timeout, f"the {name} workflow to open")
        time.sleep(1.0)  # the page draws and sizes the new graph on the next frames

    def missing_node_types(self) -> list[str]:
        """Node types the page warned about, plus any node it could not build."""
        warned = self.js("return window.__tuneqdm.missing.slice()")
        unknown = self.js("return app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                          ".map(n => n.type)")
        return sorted(set(warned) | set(unknown))

    def dialogs(self) -> list[str]:
        """The text of every dialog on screen."""
        return self.js("return Array.from(document.querySelectorAll('[role=dialog]'))"
                       ".map(d => d.innerText.trim())")

    # ---- the graph ----------------------------------------------------------------------------

    def prompt(self) -> dict[str, Any]:
        """The API-format prompt the Run button would send for the open graph."""
        return self.js_async("return (await app.graphToPrompt()).output;")

    def boxes(self) -> dict[str, list[float]]:
        """Every node's box on the canvas, title bar included, as [x, y, width, height]; keys are
        node ids, and `group:<title>` for groups."""
        return self.js(
            "const out = {};"
            "for (const n of app.graph._nodes) out[String(n.id)] = "
            f"  [n.pos[0], n.pos[1] - {NODE_TITLE_HEIGHT}, n.size[0], n.size[1] + {NODE_TITLE_HEIGHT}];"
            "for (const g of app.graph._groups) out['group:' + g.title] = Array.from(g._bounding);"
            "return out;")

    def set_widgets(self, name: str, value: Any) -> int:
        """Sets every widget called `name` on the canvas (as a user would type it); returns how many."""
        return self.js(
            "let count = 0;"
            "for (const n of app.graph._nodes) for (const w of (n.widgets || [])) "
            "  if (w.name === arguments[0]) { w.value = arguments[1]; w.callback?.(w.value); count++; }"
            "app.graph.setDirtyCanvas(true, true); return count;", name, value)

    def queued(self) -> list[dict[str, Any]]:
        """Every prompt the page sent to POST /prompt: {"prompt": ..., "prompt_id": ...}."""
        return self.js("return window.__tuneqdm.queued.slice()")

    def click_run(self) -> None:
        from selenium.webdriver.common.by import By

        buttons = self.driver.find_elements(By.XPATH, "//button[normalize-space(.)='Run']")
        if not buttons:
            raise PageError("no Run button on the page")
        buttons[0].click()

    # ---- pictures -----------------------------------------------------------------------------

    def fit_graph(self, margin: float = 40.0) -> tuple[int, int, int, int]:
        """Fits the whole graph into the canvas area clear of the page's menus, with text drawn at any
        zoom and no minimap, canvas info or zoom menu, so that every node is drawn; returns the graph's
        box (left, top, right, bottom) in window pixels."""
        width, height = self.js("return [window.innerWidth, window.innerHeight]")
        self.js("app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);"
                "app.extensionManager.setting.set('Comfy.Minimap.Visible', false);"
                "app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', false);"
                "app.extensionManager.setting.set('Comfy.Graph.CanvasMenu', false);")
        box = self.js(
            "const [l, t, r, b, boxes, m] = arguments;"
            "let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;"
            "for (const [x, y, w, h] of Object.values(boxes)) {"
            "  x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h); }"
            "x0 -= m; y0 -= m; x1 += m; y1 += m;"
            "const scale = Math.min((r - l) / (x1 - x0), (b - t) / (y1 - y0));"
            "app.canvas.ds.scale = scale;"
            "app.canvas.ds.offset = [l / scale - x0, t / scale - y0];"
            "app.canvas.setDirty(true, true);"
            "return [l, t, Math.round(l + (x1 - x0) * scale), Math.round(t + (y1 - y0) * scale)];",
            80, 110, width - 20, height - 20, self.boxes(), margin)
        time.sleep(1.5)  # DOM widgets (text areas, notes) follow the canvas on the next frames
        return tuple(box)

    def screenshot_graph(self, margin: float = 40.0) -> tuple[bytes, tuple[int, int, int, int]]:
        """A PNG of the window with the whole graph in view (`fit_graph`), and the graph's box in it."""
        box = self.fit_graph(margin)
        return self.driver.get_screenshot_as_png(), box
