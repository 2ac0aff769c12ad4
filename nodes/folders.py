"""The pack's model folders: quantized UNets in models/tuneqdm/unet/, scales files in models/tuneqdm/scales/,
each with its own dropdown. Files that earlier versions wrote into the shared models/tuneqdm/ still load:
each dropdown also lists them, except the ones whose header says they are of the other kind."""
from __future__ import annotations

import os
import re

import folder_paths

from ..tuneqdm_core.errors import FileMissingError, SettingError
from ..tuneqdm_core.fileio import MAX_NAME_BYTES, MODEL_FORMAT, SCALES_FORMAT, file_format

FOLDER = "tuneqdm"  # the shared folder of earlier versions
SCALES = "tuneqdm_scales"
UNETS = "tuneqdm_unets"
EXT = ".safetensors"
_SUBFOLDER = {SCALES: "scales", UNETS: "unet"}
_FORMAT = {SCALES: SCALES_FORMAT, UNETS: MODEL_FORMAT}
_COUNTER_DIGITS = 5


def register() -> None:
    shared = os.path.join(folder_paths.models_dir, FOLDER)
    for name, path in ((FOLDER, shared), (SCALES, os.path.join(shared, _SUBFOLDER[SCALES])),
                       (UNETS, os.path.join(shared, _SUBFOLDER[UNETS]))):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, path, is_default=True)
        paths, exts = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | {EXT})


def _inside(path: str, roots: list[str]) -> bool:
    path = os.path.abspath(path)
    return any(os.path.commonpath([os.path.abspath(r), path]) == os.path.abspath(r) for r in roots)


def files(kind: str) -> list[str]:
    """The dropdown of `kind` (SCALES or UNETS): its own folder first, then the shared folder's files that
    are not known to be of the other kind (unreadable ones included, so that loading them says why)."""
    own = [f for f in folder_paths.get_filename_list(kind) if f.endswith(EXT)]
    kind_roots = [p for k in (SCALES, UNETS) for p in folder_paths.get_folder_paths(k)]
    other = next(fmt for k, fmt in _FORMAT.items() if k != kind)
    legacy = []
    for name in folder_paths.get_filename_list(FOLDER):
        path = folder_paths.get_full_path(FOLDER, name)
        if not name.endswith(EXT) or name in own or path is None or _inside(path, kind_roots):
            continue
        if file_format(path) != other:
            legacy.append(name)
    return own + legacy


def full_path(kind: str, name: str) -> str:
    path = folder_paths.get_full_path(kind, name) or folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileMissingError(f"{name}: not in models/{FOLDER}/{_SUBFOLDER[kind]}/ nor in models/{FOLDER}/")
    return path


def check_prefix(filename_prefix: str) -> str:
    """The prefix without '.safetensors', or ValueError saying why it cannot name a visible, loadable file."""
    if "\x00" in filename_prefix:
        raise SettingError(f"filename_prefix {filename_prefix!r} contains a NUL character, which no file name can hold")
    stem = filename_prefix.removesuffix(EXT)
    parts = re.split(r"[/\\]", stem)
    if not parts[-1].strip():
        raise SettingError(f"filename_prefix {filename_prefix!r} names no file (empty, or ends with '/'): "
                         "give a name such as 'my_scales' or 'subject/v1'")
    for i, part in enumerate(parts):
        if part.startswith(".") and (i == len(parts) - 1 or part not in (".", "..")):
            raise SettingError(f"filename_prefix {filename_prefix!r}: {part!r} starts with '.', which makes a hidden "
                             "file or folder that no dropdown lists")
    longest = len(f"{parts[-1]}_{0:0{_COUNTER_DIGITS}}{EXT}".encode())
    if longest > MAX_NAME_BYTES:
        raise SettingError(f"filename_prefix {filename_prefix!r}: the file name would be {longest} bytes with the counter "
                         f"and {EXT}; at most {MAX_NAME_BYTES}, so at most "
                         f"{MAX_NAME_BYTES - longest + len(parts[-1].encode())} bytes for the last part")
    return stem


def output_path(kind: str, filename_prefix: str, overwrite: bool = False) -> str:
    """Where to save: models/tuneqdm/<kind>/<prefix>.safetensors. When that file exists and `overwrite` is
    off, the next free <prefix>_00001.safetensors, <prefix>_00002... (numbered like ComfyUI's save nodes),
    so that a save never replaces a file unless asked to. The prefix may hold sub-folders, never leave the folder."""
    stem = check_prefix(filename_prefix)
    root = os.path.abspath(folder_paths.get_folder_paths(kind)[0])
    path = os.path.abspath(os.path.join(root, stem + EXT))
    if os.path.commonpath([root, path]) != root:
        raise SettingError(f"filename_prefix {filename_prefix!r} points outside models/{FOLDER}/{_SUBFOLDER[kind]}/")
    if overwrite or not os.path.exists(path):
        return path
    folder, base = os.path.split(path[: -len(EXT)])
    pattern = re.compile(re.escape(base) + rf"_(\d{{{_COUNTER_DIGITS},}}){re.escape(EXT)}$")
    taken = [int(m[1]) for f in os.listdir(folder) if (m := pattern.match(f))]
    counter = max(taken, default=0) + 1
    return os.path.join(folder, f"{base}_{counter:0{_COUNTER_DIGITS}}{EXT}")


def relative_name(kind: str, path: str) -> str:
    """A saved file's name as its dropdown lists it."""
    root = os.path.abspath(folder_paths.get_folder_paths(kind)[0])
    return os.path.relpath(path, root).replace(os.sep, "/")
