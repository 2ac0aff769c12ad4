"""A safetensors file as a mapping of lazy tensors: keys, shapes and dtypes come from the header, and a
tensor's data is read only when something computes with it, then dropped. Reads go straight into a
fresh tensor (no memory map), so the file's pages never count towards the process's memory.

Code that inspects a state dict (a host's model detection reads shapes, and now and then a value)
can be handed the whole file this way without the file ever being in memory.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from .errors import FileFormatError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class LazyTensor:
    """Shape and dtype without data; any torch function or other attribute reads the tensor."""

    def __init__(self, file: "LazyFile", key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._file, self.key, self.shape, self.dtype = file, key, torch.Size(shape), dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    nelement = numel

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def load(self) -> torch.Tensor:
        return self._file.read(self.key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.load(), name)

    def __len__(self) -> int:
        return self.shape[0]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_loaded(args), **_loaded(kwargs or {}))

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={tuple(self.shape)}, dtype={self.dtype})"


def _loaded(value: Any) -> Any:
    if isinstance(value, LazyTensor):
        return value.load()
    if isinstance(value, (list, tuple)):
        return type(value)(_loaded(v) for v in value)
    if isinstance(value, dict):
        return {k: _loaded(v) for k, v in value.items()}
    return value


class LazyFile(Mapping[str, LazyTensor]):
    """key -> LazyTensor for every tensor of a safetensors file; `metadata` is the header's metadata."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        header = read_header(self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = header.pop("__data_start__")
        self._tensors: dict[str, LazyTensor] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for key, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise FileFormatError(f"{self.name}: tensor {key!r} has dtype {info.get('dtype')!r}, which torch cannot read")
            self._tensors[key] = LazyTensor(self, key, tuple(info["shape"]), dtype)
            start, end = info["data_offsets"]
            expected = self._tensors[key].numel() * dtype.itemsize
            if end - start != expected:
                raise FileFormatError(f"{self.name}: tensor {key!r} holds {end - start} bytes, its shape needs {expected}")
            self._offsets[key] = (start, end)

    def read(self, key: str) -> torch.Tensor:
        lazy = self._tensors[key]
        start, end = self._offsets[key]
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            got = f.readinto(memoryview(raw.numpy()))
        if got != end - start:
            raise FileFormatError(f"{self.name}: truncated: tensor {key!r} ends past the end of the file")
        return raw.view(lazy.dtype).reshape(lazy.shape)

    def __getitem__(self, key: str) -> LazyTensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_header(path: str) -> dict:
    """The safetensors JSON header, checked against the file's size (a truncated file is named as such)."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{name}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise FileFormatError(f"{name}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FileFormatError(f"{name}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{name}: not a safetensors file (its header is not a JSON object)")
    try:
        end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise FileFormatError(f"{name}: not a safetensors file (a tensor entry has no data offsets)") from None
    if 8 + n + end > size:
        raise FileFormatError(f"{name}: truncated: its header needs {8 + n + end:,} bytes, the file has {size:,}")
    header["__data_start__"] = 8 + n
    return header
