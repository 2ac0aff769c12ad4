"""Real, loadable model files with random weights, for the tests and benchmarks.

No model weights can be downloaded on the test machines, so the tests make their own files:

* `write_tiny_sd15_checkpoint(path)`: one .safetensors checkpoint in the original Stable Diffusion layout
  (`model.diffusion_model.*`, `cond_stage_model.transformer.text_model.*`, `first_stage_model.*`) that the
  stock `CheckpointLoaderSimple` loads as MODEL, CLIP and VAE and detects as SD1.5. The UNet is cut down to
  one level (SD1.5 detection checks model_channels 320 and context_dim 768, not the depth), the CLIP-L text
  encoder and the SD VAE are full size, so every tensor the loader expects is present.
* `write_sd15_unet(path, full_size)`: a diffusion-model-only file for the stock `UNETLoader`
  (models/diffusion_models); `full_size=True` is the real 859,520,964-parameter SD1.5 UNet architecture.

Key names and shapes come from ComfyUI's own classes, built on the meta device, and its own
`process_*_state_dict_for_saving` renames, never from hand-written lists. Files are written tensor by tensor
(a streaming safetensors writer): the whole model is never held in memory, and the next tensor is generated
while the previous one is written. Every tensor has its own seeded generator, so a file is reproducible.

Initialisation: Linear/Conv weights ~ N(0, 1/fan_in) (variance-preserving), embeddings ~ N(0, 0.02),
GroupNorm/LayerNorm weights 1, all biases 0, CLIP `position_ids` = arange(77) as int64 like real SD1.5 files.
Outputs are meaningless but finite and not constant.

Importing this module does not import ComfyUI; the functions that need its classes import it lazily from the
checkout's host (`host.import_comfy`, with `--cpu` set first). Files are cached in `paths.asset_cache_dir()`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .host import import_comfy
from .paths import asset_cache_dir

#: Bumped whenever the layout or initialisation of generated files changes: cached files are then rewritten.
ASSET_VERSION = "1"
#: Parameter count of the real SD1.5 UNet (ComfyUI's SD15 config); `write_sd15_unet(full_size=True)` has it.
SD15_UNET_PARAMS = 859_520_964

# ---- configurations -------------------------------------------------------------------------------------

# The SD1.5 UNet in the form comfy.model_detection.detect_unet_config returns it (see its `SD15` entry in
# unet_config_from_diffusers_unet); comfy.supported_models.SD15 adds num_heads 8 / num_head_channels -1.
SD15_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# One level, one res block + one transformer block per input level, the usual middle block: 25.8M params.
SD15_TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "num_res_blocks": [1], "transformer_depth": [1], "channel_mult": [1], "transformer_depth_output": [1, 1],
}
# The SD1.x/2.x VAE, as comfy.sd.VAE builds it when it finds `decoder.conv_in.weight` and `post_quant_conv`.
SD_VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
SD_VAE_EMBED_DIM = 4
CLIP_POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"

_SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "int64": "I64",
                       "float8_e4m3fn": "F8_E4M3"}
_DTYPE_ALIASES = {"fp16": "float16", "float16": "float16", "half": "float16", "fp32": "float32",
                  "float32": "float32", "float": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


# ---- tensor specifications ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file: its key, shape and how to fill it (`normal` with `std`, `ones`, `zeros`, `arange`)."""

    name: str
    shape: tuple[int, ...]
    init: str
    std: float = 0.0
    dtype: str | None = None  # a torch dtype name for this tensor alone (e.g. float8_e4m3fn); None: the file's

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _module_specs(module: Any) -> dict[str, TensorSpec]:
    """TensorSpecs for every parameter and buffer of a (meta-device) module, chosen by the owning layer type."""
    import torch

    specs: dict[str, TensorSpec] = {}
    for mod_name, mod in module.named_modules():
        own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for pname, tensor in own:
            if tensor is None:
                continue
            key = f"{mod_name}.{pname}" if mod_name else pname
            shape = tuple(tensor.shape)
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                init, std = ("ones" if pname == "weight" else "zeros"), 0.0
            elif isinstance(mod, torch.nn.Embedding):
                init, std = "normal", 0.02
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                if pname == "bias":
                    init, std = "zeros", 0.0
                else:
                    fan_in = tensor.numel() // shape[0]
                    init, std = "normal", fan_in ** -0.5
            else:
                # e.g. SD1ClipModel's logit_scale: dropped by the SD15 saving filter; anything else new in a
                # future ComfyUI should fail loudly rather than be written with a guessed value.
                init, std = "unknown", 0.0
            specs[key] = TensorSpec(key, shape, init, std)
    return specs


def _rename(specs: dict[str, TensorSpec], fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, TensorSpec]:
    """Applies one of ComfyUI's key-renaming functions to a spec dict and renames the specs to match."""
    renamed = fn(dict(specs))
    out = {}
    for key, spec in renamed.items():
        if spec.init == "unknown":
            raise ValueError(f"no initialisation rule for {key} (shape {spec.shape})")
        out[key] = TensorSpec(key, spec.shape, spec.init, spec.std)
    return out


def _sd15_model_config(unet_config: Mapping[str, Any]) -> Any:
    comfy = import_comfy()
    return comfy.supported_models.SD15(dict(unet_config))


def sd15_unet(unet_config: Mapping[str, Any], device: Any = "meta") -> Any:
    """ComfyUI's own SD1.5-family `UNetModel` for `unet_config` (as detect_unet_config returns it; SD15 adds
    its heads), with ComfyUI's operations, which leave the weights uninitialised: on the meta device (the
    default) it is the structure alone, with no storage."""
    import torch

    comfy = import_comfy()
    model_config = _sd15_model_config(unet_config)
    with torch.device(device):
        return comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
            **model_config.unet_config, device=device, operations=comfy.ops.disable_weight_init)


def sd15_unet_specs(full_size: bool = False, prefix: str = "") -> dict[str, TensorSpec]:
    """The SD1.5 UNet's tensors (full size or the one-level cut-down), keys prefixed with `prefix`."""
    unet = sd15_unet(SD15_UNET_CONFIG if full_size else SD15_TINY_UNET_CONFIG)
    return _rename(_module_specs(unet), lambda sd: {prefix + k: v for k, v in sd.items()})


def sd15_clip_specs() -> dict[str, TensorSpec]:
    """The CLIP-L text encoder's tensors under the checkpoint's `cond_stage_model.transformer.text_model.*` keys."""
    import torch

    comfy = import_comfy()
    model_config = _sd15_model_config(SD15_TINY_UNET_CONFIG)
    with torch.device("meta"):
        clip = comfy.sd1_clip.SD1ClipModel(device="meta")
    # Keys come as clip_l.transformer.text_model.*; SD15's saving filter drops text_projection and logit_scale
    # (real SD1.5 checkpoints have neither) and renames clip_l. -> cond_stage_model.
    specs = _rename(_module_specs(clip), model_config.process_clip_state_dict_for_saving)
    # Real SD1.5 checkpoints carry the HF position_ids buffer (ComfyUI ignores it); keep it, with its real values.
    n_pos = specs["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].shape[0]
    specs[CLIP_POSITION_IDS_KEY] = TensorSpec(CLIP_POSITION_IDS_KEY, (1, n_pos), "arange")
    return specs


def sd_vae_specs(prefix: str = "first_stage_model.") -> dict[str, TensorSpec]:
    """The SD1.x VAE (AutoencoderKL, 83.7M parameters), keys prefixed with `prefix`."""
    import torch

    comfy = import_comfy()
    with torch.device("meta"):
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=SD_VAE_EMBED_DIM)
    return _rename(_module_specs(vae), lambda sd: {prefix + k: v for k, v in sd.items()})


def sd15_checkpoint_specs() -> dict[str, TensorSpec]:
    """Every tensor of the tiny SD1.5 checkpoint, in the original SD checkpoint layout."""
    import_comfy()  # model_config below needs the host importable
    model_config = _sd15_model_config(SD15_TINY_UNET_CONFIG)
    specs = _rename(sd15_unet_specs(full_size=False), model_config.process_unet_state_dict_for_saving)
    specs.update(sd15_clip_specs())
    specs.update(_rename(sd_vae_specs(prefix=""), model_config.process_vae_state_dict_for_saving))
    return specs


# ---- streaming safetensors writer --------------------------------------------------------------------------

@dataclass(frozen=True)
class Asset:
    """A written (or reused) file. Usable as a path: `Path(asset)`, `str(asset)`, `open(asset)`, `asset.name`."""

    path: Path
    parameters: int
    nbytes: int
    seconds: float
    reused: bool
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:  # str(asset) is the path, as for a Path (repr() still shows every field)
        return str(self.path)


def _dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."), "")
    if name not in ("float16", "float32", "bfloat16"):
        raise ValueError(f"unsupported weight dtype {dtype!r}: use float16, float32 or bfloat16")
    return getattr(torch, name)


def _make_tensor(spec: TensorSpec, dtype: Any, seed: int) -> Any:
    import torch

    if spec.init == "arange":
        return torch.arange(spec.numel, dtype=torch.int64).reshape(spec.shape)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.dtype is not None and spec.dtype != str(dtype).removeprefix("torch."):
        # A tensor stored in another dtype than the file's (fp8 weights): made in the file's dtype, then cast.
        return _make_tensor(TensorSpec(spec.name, spec.shape, spec.init, spec.std), dtype, seed).to(
            getattr(torch, spec.dtype))
    if spec.init == "normal":
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) & (2**63 - 1))
        # normal_ straight into the target dtype: one pass, no fp32 copy, ~280M values/s on 2 cores (randn + mul
        # + cast from fp32 is ~155M/s). std >= 0.004 is far above fp16's subnormal range: nothing underflows.
        return torch.empty(spec.shape, dtype=dtype).normal_(0.0, spec.std, generator=gen)
    raise ValueError(f"no initialisation rule for {spec.name}: {spec.init}")


def _tensor_dtype_name(spec: TensorSpec, dtype: Any) -> str:
    if spec.init == "arange":
        return "int64"
    return spec.dtype or str(dtype).removeprefix("torch.")


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensors and `__metadata__`), read without loading any tensor."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        return json.loads(f.read(n))


def count_parameters(path: str | os.PathLike[str], include_int: bool = False) -> int:
    """Number of floating-point values stored in a .safetensors file, from its header alone."""
    total = 0
    for key, info in read_safetensors_header(path).items():
        if key == "__metadata__" or (not include_int and info["dtype"].startswith(("I", "U", "BOOL"))):
            continue
        n = 1
        for s in info["shape"]:
            n *= s
        total += n
    return total


def write_safetensors_streaming(path: str | os.PathLike[str], specs: Iterable[TensorSpec], dtype: Any = "fp16",
                                seed: int = 0, metadata: Mapping[str, str] | None = None) -> Asset:
    """Writes the tensors described by `specs` to `path`, generating each one just before it is written.

    Holds at most two tensors in memory (one being written, the next being generated in a worker thread).
    The file appears atomically (written to a temporary name, then renamed), so an interrupted run never
    leaves a truncated file for the cache to pick up.
    """
    import torch

    dtype = _dtype(dtype)
    specs = list(specs)
    path = Path(path)
    start = time.perf_counter()
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        tname = _tensor_dtype_name(spec, dtype)
        nbytes = spec.numel * {"int64": 8, "float32": 4, "float8_e4m3fn": 1}.get(tname, 2)
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[tname], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw_header = json.dumps(header, separators=(",", ":")).encode()
    raw_header += b" " * (-len(raw_header) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=1) as pool:
            f.write(struct.pack("<Q", len(raw_header)))
            f.write(raw_header)
            pending = pool.submit(_make_tensor, specs[0], dtype, seed) if specs else None
            for i, spec in enumerate(specs):
                tensor = pending.result()
                pending = pool.submit(_make_tensor, specs[i + 1], dtype, seed) if i + 1 < len(specs) else None
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes != header[spec.name]["data_offsets"][1] - header[spec.name]["data_offsets"][0]:
                    raise AssertionError(f"{spec.name}: wrote {data.nbytes} bytes, header says otherwise")
                f.write(memoryview(data))
                del tensor, data
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    params = sum(s.numel for s in specs if s.init != "arange")
    return Asset(path, params, path.stat().st_size, time.perf_counter() - start, False,
                 dict(header.get("__metadata__", {})))


def _cached_or_write(path: str | os.PathLike[str], specs_fn: Callable[[], dict[str, TensorSpec]], kind: str,
                     dtype: Any, seed: int, force: bool) -> Asset:
    """Reuses `path` when its metadata says it is this exact asset and its size is complete; else writes it."""
    dtype = _dtype(dtype)
    path = Path(path)
    metadata = {"format": "pt", "tuneqdm_asset": kind, "tuneqdm_asset_version": ASSET_VERSION,
                "tuneqdm_asset_dtype": str(dtype).removeprefix("torch."), "tuneqdm_asset_seed": str(seed)}
    if path.is_file() and not force:
        start = time.perf_counter()
        try:
            header = read_safetensors_header(path)
        except (ValueError, OSError, json.JSONDecodeError):
            header = {}
        meta = header.get("__metadata__", {})
        if meta == metadata:
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            if path.stat().st_size == 8 + n + end:
                return Asset(path, count_parameters(path), path.stat().st_size, time.perf_counter() - start,
                             True, meta)
    specs = specs_fn()
    return write_safetensors_streaming(path, specs.values(), dtype=dtype, seed=seed, metadata=metadata)


# ---- public writers ----------------------------------------------------------------------------------------

def write_tiny_sd15_checkpoint(path: str | os.PathLike[str], *, dtype: Any = "fp16", seed: int = 0,
                               force: bool = False) -> Asset:
    """A CheckpointLoaderSimple-loadable SD1.5 checkpoint: cut-down UNet, full CLIP-L and full SD VAE.

    About 235M values (25.8M UNet + 123.1M CLIP + 83.7M VAE + position_ids), 470 MB in fp16. An existing file
    written by the same generator version, dtype and seed is reused (`asset.reused`); `force` rewrites it.
    """
    return _cached_or_write(path, sd15_checkpoint_specs, "sd15-tiny-checkpoint", dtype, seed, force)


def write_sd15_unet(path: str | os.PathLike[str], full_size: bool, *, dtype: Any = "fp16", seed: int = 0,
                    force: bool = False) -> Asset:
    """A UNETLoader-loadable SD1.5 diffusion model (bare `input_blocks.*` keys, as in models/diffusion_models).

    full_size=True: the real SD1.5 architecture, 859,520,964 parameters (1.72 GB fp16, 3.44 GB fp32).
    full_size=False: the same one-level cut-down UNet as in `write_tiny_sd15_checkpoint` (25.8M parameters).
    Cached like the checkpoint.
    """
    kind = "sd15-unet-full" if full_size else "sd15-unet-tiny"
    return _cached_or_write(path, lambda: sd15_unet_specs(full_size=full_size), kind, dtype, seed, force)


#: File names of the cached assets (shared by every test module, so each is generated once per machine).
TINY_SD15_CKPT = "tiny_sd15.safetensors"
TINY_SD15_UNET = "tiny_sd15_unet.safetensors"
FULL_SD15_UNET = "sd15_unet_full_{dtype}.safetensors"


def cached_tiny_sd15_checkpoint() -> Asset:
    """The tiny SD1.5 checkpoint in `asset_cache_dir()` (written on first use, ~2 s; reused after)."""
    return write_tiny_sd15_checkpoint(asset_cache_dir() / TINY_SD15_CKPT)


def cached_sd15_unet(full_size: bool, dtype: Any = "fp16") -> Asset:
    """A UNet-only file in `asset_cache_dir()`; the full-size one is 1.7 GB (fp16) and takes 6-13 s to write."""
    if not full_size:
        return write_sd15_unet(asset_cache_dir() / TINY_SD15_UNET, full_size=False)
    name = FULL_SD15_UNET.format(dtype=str(_dtype(dtype)).removeprefix("torch."))
    return write_sd15_unet(asset_cache_dir() / name, full_size=True, dtype=dtype)


def install(src: str | os.PathLike[str], folder: str | os.PathLike[str], name: str | None = None) -> Path:
    """Puts a (cached) file into a server's model folder: hard link, else symlink, else copy. Returns the new path.

    A new entry changes the folder's mtime, which is what makes ComfyUI's folder_paths re-scan its cached file
    list, so the server sees the file on the next /prompt or /object_info without a restart.
    """
    src = Path(src)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (name or src.name)
    if dst.exists() or dst.is_symlink():
        if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(dst, src)):
            return dst
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        try:
            dst.symlink_to(src.resolve())
        except OSError:
            shutil.copyfile(src, dst)
    return dst


