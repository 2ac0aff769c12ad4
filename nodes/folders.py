"""The pack's model folder: models/tuneqdm/ for quantized UNets and scales files."""
from __future__ import annotations

import os

import folder_paths

FOLDER = "tuneqdm"


def register() -> None:
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})


def files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")]


def full_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def output_path(filename_prefix: str) -> str:
    """models/tuneqdm/<prefix>.safetensors; the prefix may hold sub-folders but may not leave the folder."""
    root = os.path.abspath(folder_paths.get_folder_paths(FOLDER)[0])
    name = filename_prefix if filename_prefix.endswith(".safetensors") else filename_prefix + ".safetensors"
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"filename_prefix {filename_prefix!r} points outside models/{FOLDER}/")
    return path
