"""The rooms of the repository import each other only as README's "Architecture" says: the core and the
kernels need neither ComfyUI nor any other room, nothing shipped with the pack imports the development
rooms (benchmarks, fixtures, scripts, tests), and nothing imports tests/. Read from the source (imports,
relative imports resolved, and importlib calls with a literal name), so a new import that breaks a rule
fails here whatever the import order at run time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tuneqdm_fixtures.paths import checkout

REPO = checkout()
SHIPPED = ("tuneqdm_core", "kernels", "nodes", "tuneqdm_demo", "tuneqdm_train")
DEVELOPMENT = ("tuneqdm_bench", "tuneqdm_fixtures", "scripts", "tests")
ROOMS = SHIPPED + DEVELOPMENT
# What each shipped room may import among the rooms (itself always). The pack itself, imported as ComfyUI
# imports it (`tuneqdm_pack`, by the headless trainer), counts as `nodes`.
ALLOWED = {
    "tuneqdm_core": {"kernels"},  # the Triton backend, imported only when a CUDA tensor asks for it
    "kernels": {"tuneqdm_core"},  # the packed layout and the errors
    "nodes": {"tuneqdm_core", "kernels", "tuneqdm_demo"},
    "tuneqdm_demo": {"tuneqdm_core"},
    "tuneqdm_train": {"tuneqdm_core", "nodes"},
}
# The default model's training script remakes assets/ from the development checkout (its ComfyUI host);
# users never run it, so it may use the fixtures.
EXCEPTIONS = {("tuneqdm_demo/train.py", "tuneqdm_fixtures")}
HOST_PACKAGES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes_comfy"}


def _imported(path: Path) -> set[str]:
    return _imported_by(path.read_text(encoding="utf-8"), path.relative_to(REPO).parts)


def _imported_by(source: str, parts: tuple[str, ...]) -> set[str]:
    """Top-level names a file at `parts` (its path in the repository) imports, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module.split(".")[0])
                continue
            package = list(parts[:-1])[: len(parts) - node.level]
            target = package + (node.module.split(".") if node.module else [a.name for a in node.names][:1])
            names.add(target[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.lstrip(".").split(".")[0])
    return {"nodes" if n == "tuneqdm_pack" else n for n in names}


def _files(room: str) -> list[Path]:
    return sorted(p for p in (REPO / room).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("room", SHIPPED)
def test_shipped_rooms_import_only_what_the_picture_allows(room):
    wrong = []
    for path in _files(room):
        rel = path.relative_to(REPO).as_posix()
        for name in _imported(path) & set(ROOMS):
            if name != room and name not in ALLOWED[room] and (rel, name) not in EXCEPTIONS:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, wrong


@pytest.mark.parametrize("room", ("tuneqdm_core", "kernels"))
def test_the_core_and_kernels_never_import_the_host(room):
    wrong = [f"{p.relative_to(REPO)} imports {n}" for p in _files(room) for n in _imported(p) & HOST_PACKAGES]
    assert not wrong, wrong


@pytest.mark.parametrize("room", [r for r in ROOMS if r != "tests"])
def test_nothing_imports_the_tests(room):
    wrong = [str(p.relative_to(REPO)) for p in _files(room)
             if "tests" in _imported(p) or "sys.path" in (text := p.read_text(encoding="utf-8"))
             and '"tests"' in text]
    assert not wrong, wrong


def test_the_checker_sees_a_forbidden_import():
    """The rules above can fail: a core file importing ComfyUI, a fixture or the tests is seen as such."""
    source = "import comfy.model_management\nfrom ..tuneqdm_fixtures import paths\nimport tests\n" \
             "importlib.import_module('tuneqdm_bench.peers')\n"
    assert _imported_by(source, ("tuneqdm_core", "probe.py")) >= {"comfy", "tuneqdm_fixtures", "tests", "tuneqdm_bench"}
    assert _imported_by("from .quant import pack\nfrom .. import kernels\n", ("tuneqdm_core", "probe.py")) == \
        {"tuneqdm_core", "kernels"}
