"""Change detection for the nodes that read a file (V3 `fingerprint_inputs`): a file rewritten in place
(Save Scales with overwrite on, another program) is read again on the next prompt, and an unchanged one
keeps ComfyUI's cache hit.

A file up to HASH_LIMIT bytes (scales files, small models) is fingerprinted by a hash of its content,
computed once per version of the file and memoized by its stat identity (device, inode, size, mtime_ns,
ctime_ns): writing the file changes its mtime and ctime, replacing it by rename changes its inode, and no
program can set ctime back, so a changed file never meets a stale entry, while an unchanged one costs a
stat per prompt. A larger file is fingerprinted by that stat identity alone: hashing it would read a
multi-GB model in full before the loader reads it again (5 s for SDXL's 5.1 GB from the page cache, a second
pass over the disk for Flux dev's 22 GB), and the identity changes on the same writes. What the identity
gives up is a cache hit when a file is rewritten with the same bytes."""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Callable

_CHUNK = 8 << 20
HASH_LIMIT = 256 << 20
_MEMO_SIZE = 256  # versions of files remembered; each entry is a short string
_memo: OrderedDict[tuple, str] = OrderedDict()
_lock = threading.Lock()


def _identity(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _content_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str) -> str:
    """sha256 of the file's content, hashed again only when the file changed since the last call; above
    HASH_LIMIT bytes, the file's stat identity."""
    key = _identity(path)
    if key[3] > HASH_LIMIT:
        return "stat:" + ":".join(str(part) for part in key)
    with _lock:
        if key in _memo:
            _memo.move_to_end(key)
            return _memo[key]
    digest = _content_hash(path)
    if _identity(path) != key:  # written while it was read: hash what is there now, next time
        return f"changing:{key}"
    with _lock:
        _memo[key] = digest
        while len(_memo) > _MEMO_SIZE:
            _memo.popitem(last=False)
    return digest


def fingerprint_or_nan(resolve: Callable[[], str]) -> str | float:
    """The fingerprint of the file `resolve()` names, or NaN (never equal to itself, so ComfyUI runs the
    node, which reports the missing or unreadable file in words) when it cannot be read."""
    try:
        return file_fingerprint(resolve())
    except OSError:
        return float("nan")
