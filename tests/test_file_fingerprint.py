"""The loaders' change detection (nodes/file_fingerprint.py): a fingerprint follows the file's content,
and the content is hashed once per version of the file, not on every prompt; a file above HASH_LIMIT is
never read for it, and its fingerprint still changes with every write and replacement."""
from __future__ import annotations

import hashlib
import math
import time

import pytest

from tuneqdm_fixtures.host import import_pack


@pytest.fixture(scope="module")
def fingerprint():
    """The module as the pack loads it (its package imports ComfyUI)."""
    import_pack()
    from tuneqdm_pack.nodes import file_fingerprint

    return file_fingerprint


@pytest.fixture
def hashes(fingerprint, monkeypatch) -> list[str]:
    """The paths whose content is hashed, in order."""
    seen: list[str] = []
    real = fingerprint._content_hash

    def counting(path: str) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(fingerprint, "_content_hash", counting)
    return seen


def test_the_fingerprint_is_the_content_hash_and_an_unchanged_file_is_hashed_once(fingerprint, hashes, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 100_000)
    first = fingerprint.file_fingerprint(str(path))
    assert first == hashlib.sha256(b"a" * 100_000).hexdigest()
    for _ in range(5):  # one per prompt
        assert fingerprint.file_fingerprint(str(path)) == first
    assert hashes == [str(path)]


def test_a_file_rewritten_in_place_with_the_same_size_gets_a_new_fingerprint(fingerprint, hashes, tmp_path):
    path = tmp_path / "scales.safetensors"
    path.write_bytes(b"a" * 1000)
    first = fingerprint.file_fingerprint(str(path))
    inode = path.stat().st_ino
    with open(path, "r+b") as f:
        f.write(b"b" * 1000)
    assert path.stat().st_ino == inode and path.stat().st_size == 1000
    second = fingerprint.file_fingerprint(str(path))
    assert second == hashlib.sha256(b"b" * 1000).hexdigest() != first
    assert len(hashes) == 2


def test_equal_content_in_two_files_gives_equal_fingerprints(fingerprint, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert fingerprint.file_fingerprint(str(a)) == fingerprint.file_fingerprint(str(b))


def test_a_missing_file_gets_a_fingerprint_that_never_matches(fingerprint, tmp_path):
    def missing() -> str:
        raise FileNotFoundError("not in models/tuneqdm/scales/")

    assert math.isnan(fingerprint.fingerprint_or_nan(missing))
    assert math.isnan(fingerprint.fingerprint_or_nan(lambda: str(tmp_path / "gone.safetensors")))


def test_a_large_file_is_not_read_and_its_fingerprint_follows_writes_and_replacements(fingerprint, hashes, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr(fingerprint, "HASH_LIMIT", 4096)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 10_000)
    first = fingerprint.file_fingerprint(str(path))
    assert fingerprint.file_fingerprint(str(path)) == first  # unchanged: ComfyUI's cache holds
    # Kernels before multigrain timestamps advance mtime by clock ticks; prompts are further apart than that.
    time.sleep(0.05)
    with open(path, "r+b") as f:  # in place, same size and inode
        f.write(b"b" * 10_000)
    second = fingerprint.file_fingerprint(str(path))
    time.sleep(0.05)
    replacement = tmp_path / "new.safetensors"
    replacement.write_bytes(b"b" * 10_000)
    replacement.replace(path)  # how an atomic save or a download manager replaces a file
    third = fingerprint.file_fingerprint(str(path))
    assert len({first, second, third}) == 3
    assert hashes == []  # never read
