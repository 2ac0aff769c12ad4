"""The pack's two safetensors formats, written atomically and checked thoroughly on load.

- scales file: only s_out/s_in per expert. Stored as fp16 offsets from their init (s_out - s0 and
  s_in - 1): s_in sits near 1 where fp16's step is 1e-3, larger than what training moves it, while
  the offsets keep fp16's full relative precision. SD 1.5 with 4 experts: about 4.9 MB.
- quantized-model file: the whole quantized state dict (packed integers, zero points, base steps,
  scales, biases, norms...) plus the layer specs, so the float model never has to be loaded again.

Both carry metadata (format, version, the model's whole TuneQDMConfig as JSON, fingerprint of the
quantized base model, layer names and shapes) and a sha256, so truncation and corruption are reported as
such rather than surfacing as odd numbers. Version 2 hashes the metadata too (a changed layer list or bit width is
corruption, not a different model); version 1 files, whose sha256 covers the tensors only, still load.
Files written before the config was recorded (no `tuneqdm.config`) load with defaults for what they lack
(`file_config`); the separate bits / experts / train_s_in entries stay, which older packs read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import TuneQDMConfig
from .errors import FileFormatError, FileMissingError, ModelMismatchError, SettingError
from .model import (build_quantized_skeleton, file_state_dict, fingerprint, layer_spec, model_config,
                    quantized_layers, specs_coded, specs_grouped)
from .routing import RoutingPolicy
from .scales import ScaleSet, check_compatible

FORMAT_VERSION = "1"  # sha256 over the tensors only: the embedded default model's files (tuneqdm_demo/files.py)
METADATA_HASH_VERSION = "2"  # sha256 over tensors and metadata: what scales and quantized-model files are written in
GROUPED_VERSION = "3"  # as 2, and layers may be group-wise (a `group_size` in their spec): older readers refuse it
CODED_VERSION = "4"  # as 3, and group steps may be step codes (`group_steps` in a spec): older readers refuse it
READABLE_VERSIONS = (FORMAT_VERSION, METADATA_HASH_VERSION, GROUPED_VERSION, CODED_VERSION)
SHA_KEY = "tuneqdm.sha256"
CONFIG_KEY = "tuneqdm.config"  # the model's TuneQDMConfig, whole (to_json); scales files: with the scales' routing
INFO_PREFIX = "tuneqdm.train."  # ScaleSet.info entries (training provenance) in a scales file
MAX_NAME_BYTES = 255  # the longest file name the usual file systems (ext4, APFS, NTFS) accept
SCALES_FORMAT = "tuneqdm-scales"
MODEL_FORMAT = "tuneqdm-quantized-model"


@dataclass(frozen=True)
class FileHeader:
    format: str
    version: str
    config: TuneQDMConfig
    fingerprint: str
    layers: dict
    metadata: dict[str, str]

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def experts(self) -> int:
        return self.config.experts


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 of the tensors and, from format version 2 on, of every metadata entry but the hash itself."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    if metadata is not None:
        entries = sorted((k, v) for k, v in metadata.items() if k != SHA_KEY)
        h.update(json.dumps(entries, separators=(",", ":")).encode())
    return h.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write next to the target, fsync, then rename: a crash or an interrupt never leaves a half file
    under the real name, and an existing file is replaced only by a complete one."""
    path = Path(path)
    if len(path.name.encode()) > MAX_NAME_BYTES:
        raise SettingError(f"file name too long: {len(path.name.encode())} bytes, at most {MAX_NAME_BYTES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short temporary name of its own: one derived from the target's would pass the file-name limit
    # for legal target names near it.
    fd, tmp_name = tempfile.mkstemp(prefix=".tuneqdm-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_verified(path: str | os.PathLike, expected_format: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a TuneQDM safetensors file of `expected_format`, after checking its format,
    version and sha256: a foreign, truncated or corrupted file raises FileFormatError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileMissingError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every parse failure
        raise FileFormatError(f"{path.name}: not a readable safetensors file (truncated or not safetensors): {e}") from None
    fmt = meta.get("tuneqdm.format")
    if fmt is None:
        raise FileFormatError(f"{path.name}: a safetensors file, but not a TuneQDM file (no tuneqdm.format metadata)")
    if fmt != expected_format:
        raise FileFormatError(f"{path.name}: is a {fmt} file, expected a {expected_format} file")
    version = meta.get("tuneqdm.version")
    if version not in READABLE_VERSIONS:
        raise FileFormatError(f"{path.name}: format version {version}, this pack reads {', '.join(READABLE_VERSIONS)}")
    expected = digest(tensors) if version == "1" else digest(tensors, meta)
    if expected != meta.get(SHA_KEY):
        covered = "its tensors" if version == "1" else "its tensors and metadata"
        raise FileFormatError(f"{path.name}: corrupted (sha256 of {covered} does not match the one recorded in it)")
    return meta, tensors


def file_format(path: str | os.PathLike) -> str | None:
    """The tuneqdm.format recorded in a file's header (tensors are not read), None when there is none or
    the file cannot be parsed: enough to sort files into lists, not to trust them."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("tuneqdm.format")
    except Exception:  # any parse failure means "not known to be ours"
        return None


def read_header(path: str | os.PathLike, expected_format: str,
                defaults: TuneQDMConfig | None = None) -> tuple[FileHeader, dict[str, torch.Tensor]]:
    """Header (the recorded config among it; see `file_config` for `defaults`) and tensors of a verified file."""
    path = Path(path)
    meta, tensors = read_verified(path, expected_format)
    try:
        layers = json.loads(meta["tuneqdm.layers"])
        config = file_config(meta, layers if expected_format == MODEL_FORMAT else None, defaults)
        header = FileHeader(expected_format, meta["tuneqdm.version"], config, meta["tuneqdm.fingerprint"], layers, meta)
    except (KeyError, ValueError, TypeError, FileFormatError) as e:  # ValueError: the config's SettingError, RoutingError
        raise FileFormatError(f"{path.name}: metadata incomplete or corrupted ({e})") from None
    return header, tensors


def file_config(meta: dict[str, str], layers: dict | None, defaults: TuneQDMConfig | None = None) -> TuneQDMConfig:
    """The TuneQDMConfig a file records. Files written before the whole config was recorded give bits,
    experts and train_s_in; the rest comes from `defaults` (a scales file: the model it is loaded onto),
    else from the layer specs (a model file's group size: that of its first layer, 0 (per channel) for
    files from before groups) and the field defaults (s_in init 'ones', nothing kept in float, uniform
    intervals)."""
    if defaults is not None:
        # Files that did not record a routing policy were trained and sampled by uniform intervals.
        defaults = dataclasses.replace(defaults, routing=RoutingPolicy())
    recorded = {"bits": int(meta["tuneqdm.bits"]), "experts": int(meta["tuneqdm.experts"]),
                "train_s_in": meta["tuneqdm.train_s_in"] == "1"}
    if CONFIG_KEY in meta:
        config = TuneQDMConfig.from_json(json.loads(meta[CONFIG_KEY]), defaults)
        if any(getattr(config, k) != v for k, v in recorded.items()):
            raise FileFormatError(f"{CONFIG_KEY} disagrees with the bits / experts / train_s_in entries")
        return config
    if defaults is None and layers:
        recorded["group_size"] = int(next(iter(layers.values())).get("group_size", 0))
    return TuneQDMConfig.from_json(recorded, defaults)


def _version(fmt: str, layers: dict) -> str:
    """The oldest version whose readers understand the file (scales files never changed since 2)."""
    if fmt != MODEL_FORMAT:
        return METADATA_HASH_VERSION
    if specs_coded(layers):
        return CODED_VERSION
    return GROUPED_VERSION if specs_grouped(layers) else METADATA_HASH_VERSION


def _metadata(fmt: str, cfg: TuneQDMConfig, fp: str, layers: dict, tensors: dict[str, torch.Tensor],
              extra: dict[str, str] | None) -> dict[str, str]:
    meta = dict(extra or {})
    meta.update({
        "tuneqdm.format": fmt, "tuneqdm.bits": str(cfg.bits),
        "tuneqdm.version": _version(fmt, layers),
        "tuneqdm.experts": str(cfg.experts), "tuneqdm.train_s_in": "1" if cfg.train_s_in else "0",
        CONFIG_KEY: json.dumps(cfg.to_json(), separators=(",", ":")), "tuneqdm.fingerprint": fp,
        "tuneqdm.layers": json.dumps(layers, separators=(",", ":")),
    })
    meta[SHA_KEY] = digest(tensors, meta)
    return meta


# ---- scales files -------------------------------------------------------------------------------

def save_scales(path: str | os.PathLike, scales: ScaleSet, module: nn.Module,
                extra_metadata: dict[str, str] | None = None) -> None:
    """Save `scales`, which must fit the quantized `module` (its base steps define the encoding)."""
    check_compatible(scales, module)
    layers = dict(quantized_layers(module))
    tensors: dict[str, torch.Tensor] = {}
    for name, (s_out, s_in) in scales.tensors.items():
        base = layers[name].base_scale.detach().to(s_out.device, torch.float32)
        tensors[f"{name}.s_out"] = (s_out.detach().float() - base).half()
        tensors[f"{name}.s_in"] = (s_in.detach().float() - 1.0).half()
    shapes = {name: [o.shape[1], i.shape[1]] for name, (o, i) in scales.tensors.items()}
    cfg = dataclasses.replace(model_config(module), routing=scales.policy)
    extra = {INFO_PREFIX + k: str(v) for k, v in scales.info.items()}
    extra.update(extra_metadata or {})
    atomic_save(tensors, path, _metadata(SCALES_FORMAT, cfg, scales.fingerprint, shapes, tensors, extra))


def load_scales(path: str | os.PathLike, module: nn.Module) -> ScaleSet:
    """Read a scales file for the quantized `module`; refuse, naming the first mismatch, a file made
    for other bits, another number of experts, other layers or another base model."""
    header, tensors = read_header(path, SCALES_FORMAT, defaults=model_config(module))
    name = Path(path).name
    layers = dict(quantized_layers(module))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_name, (n_out, n_in) in header.layers.items():
        m = layers.get(layer_name)
        if m is None:
            raise ModelMismatchError(f"{name}: has scales for layer {layer_name!r}, which this model does not have")
        if (n_out, n_in) != (m.out_channels, m.in_channels):
            raise ModelMismatchError(f"{name}: layer {layer_name!r} is {n_out}x{n_in} in the file, "
                                     f"{m.out_channels}x{m.in_channels} in this model")
        d_out, d_in = tensors[f"{layer_name}.s_out"], tensors[f"{layer_name}.s_in"]
        base = m.base_scale.detach().float().cpu()
        out[layer_name] = (d_out.float() + base, d_in.float() + 1.0)
    info = {k[len(INFO_PREFIX):]: v for k, v in header.metadata.items() if k.startswith(INFO_PREFIX)}
    scales = ScaleSet(out, header.bits, header.experts, header.fingerprint, info, header.config.routing)
    check_compatible(scales, module, source=name)  # bits, experts, layers, base model: first mismatch
    return scales.to(next(m.s_out.device for m in layers.values()))


# ---- quantized-model files ----------------------------------------------------------------------

def save_quantized_model(path: str | os.PathLike, module: nn.Module,
                         extra_metadata: dict[str, str] | None = None) -> None:
    """Save a whole quantized model (state dict + layer specs), so it loads without the float model."""
    cfg = model_config(module)
    tensors = file_state_dict(module)
    layers = {name: layer_spec(m) for name, m in quantized_layers(module)}
    atomic_save(tensors, path, _metadata(MODEL_FORMAT, cfg, fingerprint(module), layers, tensors, extra_metadata))


def read_quantized_model(path: str | os.PathLike) -> tuple[FileHeader, dict[str, torch.Tensor]]:
    """Header and state dict of a quantized-model file, checked for integrity."""
    return read_header(path, MODEL_FORMAT)


def load_quantized_model(path: str | os.PathLike, skeleton: nn.Module) -> nn.Module:
    """Fill `skeleton`, the float architecture (build it under `torch.device("meta")` to allocate no
    float weights), with a quantized-model file: its Linear/Conv2d layers become quantized layers and
    every tensor is taken from the file."""
    header, tensors = read_quantized_model(path)
    load_into_skeleton(skeleton, header, tensors, Path(path).name)
    return skeleton


def load_into_skeleton(skeleton: nn.Module, header: FileHeader, tensors: dict[str, torch.Tensor], source: str) -> None:
    try:
        build_quantized_skeleton(skeleton, header.layers, header.config)
    except ModelMismatchError as e:
        raise ModelMismatchError(f"{source}: {e}") from None
    own = file_state_dict(skeleton)
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ModelMismatchError(f"{source}: does not fit this architecture: {first} "
                                 f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    for k, t in tensors.items():
        if tuple(own[k].shape) != tuple(t.shape):
            raise ModelMismatchError(f"{source}: does not fit this architecture: tensor {k!r} is {tuple(t.shape)} in the file, "
                                     f"{tuple(own[k].shape)} in this architecture")
    skeleton.load_state_dict(tensors, strict=True, assign=True)
    for _, m in quantized_layers(skeleton):
        # assign=True brings the file's tensors in as they are: restore which scales are trainable.
        m.s_in.requires_grad_(header.config.train_s_in)
        if m.bias is not None:
            m.bias.requires_grad_(False)
    if fingerprint(skeleton) != header.fingerprint:
        raise FileFormatError(f"{source}: fingerprint does not match its own contents")
