"""Real, loadable model files with random weights, and API-graph builders, for tests.

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
`.comfyui` host (with `--cpu` set first). The graph builders (`Graph`, `add_txt2img`, `api_graph_txt2img`,
`api_graph_unet_txt2img`) need nothing but the standard library.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

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


def import_comfy() -> Any:
    """Makes the `.comfyui` host importable (CPU mode) and returns the `comfy` package."""
    from tuneqdm_core.bench.host import import_comfy as host_import_comfy

    return host_import_comfy()


def import_pack() -> Any:
    """The pack imported as ComfyUI imports it (package `tuneqdm_pack`, whose `nodes` import ComfyUI), after
    `import_comfy`: the headless trainer's own loader, so tests and trainer share one copy of its classes."""
    import_comfy()
    from tuneqdm_train.sources import pack

    return pack()


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


def sd15_unet_specs(full_size: bool = False, prefix: str = "") -> dict[str, TensorSpec]:
    """The SD1.5 UNet's tensors (full size or the one-level cut-down), keys prefixed with `prefix`."""
    import torch

    comfy = import_comfy()
    model_config = _sd15_model_config(SD15_UNET_CONFIG if full_size else SD15_TINY_UNET_CONFIG)
    with torch.device("meta"):
        unet = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
            **model_config.unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    specs = _module_specs(unet)
    return _rename(specs, lambda sd: {prefix + k: v for k, v in sd.items()})


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
    comfy = import_comfy()
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


def asset_cache_dir() -> Path:
    """Where generated files are kept between test sessions: $TUNEQDM_ASSET_CACHE, else .pytest_cache/ (git-ignored)."""
    env = os.environ.get("TUNEQDM_ASSET_CACHE")
    folder = Path(env) if env else REPO_ROOT / ".pytest_cache" / "tuneqdm-assets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


# ---- ComfyUI API graphs ------------------------------------------------------------------------------------

Ref = list  # an output reference in API format: [node_id, output_index]


@dataclass(frozen=True)
class Node:
    """A node of a `Graph`. `node.out(i)` (or `node[i]`) is a reference to its i-th output."""

    graph: "Graph"
    id: str

    @property
    def class_type(self) -> str:
        return self.graph.nodes[self.id]["class_type"]

    @property
    def inputs(self) -> dict[str, Any]:
        return self.graph.nodes[self.id]["inputs"]

    def out(self, index: int = 0) -> Ref:
        return [self.id, index]

    def __getitem__(self, index: int) -> Ref:
        return self.out(index)

    def set(self, **inputs: Any) -> "Node":
        """Sets (or overrides) inputs; a Node given as a value means its output 0."""
        self.inputs.update({k: _as_input(v) for k, v in inputs.items()})
        return self


def _as_input(value: Any) -> Any:
    if isinstance(value, Node):
        return value.out(0)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        return [value[0], value[1]]
    return value


def _is_ref(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


class Graph:
    """Builds a ComfyUI API-format prompt: `{"1": {"class_type": ..., "inputs": {...}}, ...}`.

        g = Graph()
        ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny.safetensors")
        q = g.node("TuneQDMQuantizeUNet", model=ckpt.out(0))     # any node, custom ones included
        g.node("KSampler", model=q.out(0), ...)
        server.run(g.to_api())

    `insert(ref, class_type, input_name, ...)` splices a node after an existing output (every consumer of that
    output is rewired to the new node's output 0).
    """

    def __init__(self, first_id: int = 1) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self._next_id = first_id

    def node(self, class_type: str, /, *, _id: str | int | None = None, _title: str | None = None,
             **inputs: Any) -> Node:
        """Adds a node; keyword arguments are its inputs (a Node or [id, index] for a link). `_id` fixes the id
        (default: the next free integer), `_title` sets the UI title; both are underscored so that they never
        collide with a node's own input names."""
        node_id = _id
        if node_id is None:
            while str(self._next_id) in self.nodes:
                self._next_id += 1
            node_id = self._next_id
            self._next_id += 1
        node_id = str(node_id)
        if node_id in self.nodes:
            raise ValueError(f"node id {node_id} already used")
        entry: dict[str, Any] = {"class_type": class_type, "inputs": {k: _as_input(v) for k, v in inputs.items()}}
        if _title is not None:
            entry["_meta"] = {"title": _title}
        self.nodes[node_id] = entry
        return Node(self, node_id)

    def __getitem__(self, node_id: str | int) -> Node:
        if str(node_id) not in self.nodes:
            raise KeyError(node_id)
        return Node(self, str(node_id))

    def __iter__(self) -> Iterator[Node]:
        return (Node(self, i) for i in list(self.nodes))

    def __len__(self) -> int:
        return len(self.nodes)

    def find(self, class_type: str) -> list[Node]:
        return [n for n in self if n.class_type == class_type]

    def consumers(self, ref: Ref | Node) -> list[tuple[Node, str]]:
        """Every (node, input name) that takes `ref` as input."""
        ref = _as_input(ref)
        return [(n, k) for n in self for k, v in n.inputs.items() if _is_ref(v) and v == ref]

    def rewire(self, old: Ref | Node, new: Ref | Node, skip: Iterable[Node] = ()) -> int:
        """Points every input that takes `old` at `new` instead (except on `skip` nodes); returns how many."""
        skip_ids = {n.id for n in skip}
        count = 0
        for n, k in self.consumers(old):
            if n.id not in skip_ids:
                n.inputs[k] = _as_input(new)
                count += 1
        return count

    def insert(self, ref: Ref | Node, class_type: str, input_name: str, /, **inputs: Any) -> Node:
        """Adds `class_type` taking `ref` as `input_name` and moves all of `ref`'s consumers to its output 0."""
        ref = _as_input(ref)
        new = self.node(class_type, **{input_name: ref}, **inputs)
        self.rewire(ref, new.out(0), skip=[new])
        return new

    def remove(self, node: Node | str | int) -> None:
        node_id = node.id if isinstance(node, Node) else str(node)
        users = [n.id for n in self for v in n.inputs.values() if _is_ref(v) and v[0] == node_id]
        if users:
            raise ValueError(f"node {node_id} still feeds node(s) {users}")
        del self.nodes[node_id]

    def to_api(self) -> dict[str, Any]:
        """The dict for POST /prompt's `prompt` field (a deep copy: later edits do not leak into it)."""
        missing = [(n.id, k, v[0]) for n in self for k, v in n.inputs.items() if _is_ref(v) and v[0] not in self.nodes]
        if missing:
            raise ValueError(f"inputs refer to missing nodes: {missing}")
        return copy.deepcopy(self.nodes)


@dataclass(frozen=True)
class Txt2Img:
    """The nodes `add_txt2img` created, and the MODEL/CLIP/VAE references it used."""

    graph: Graph
    model: Ref
    clip: Ref
    vae: Ref
    loader: Node | None
    positive: Node
    negative: Node
    latent: Node
    sampler: Node
    decode: Node
    save: Node
    save_latent: Node | None


def add_txt2img(g: Graph, *, ckpt_name: str | None = None, model: Ref | Node | None = None,
                clip: Ref | Node | None = None, vae: Ref | Node | None = None,
                positive: str = "a photograph of an astronaut riding a horse", negative: str = "blurry",
                width: int = 64, height: int = 64, batch_size: int = 1, seed: int = 0, steps: int = 4,
                cfg: float = 7.0, sampler_name: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
                filename_prefix: str = "tuneqdm_test", save_latent: bool = False) -> Txt2Img:
    """Adds CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage.

    MODEL, CLIP and VAE come from `CheckpointLoaderSimple(ckpt_name)` unless given as references (e.g. a MODEL
    from UNETLoader or from a custom node). `save_latent` also writes the sampled latent (SaveLatent, a
    .latent safetensors file) so a test can check it for NaN: SaveImage turns NaN pixels into 0 silently.
    """
    loader = None
    if ckpt_name is not None:
        loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    elif model is None or clip is None or vae is None:
        raise ValueError("give ckpt_name, or all of model, clip and vae")
    model_ref = _as_input(model) if model is not None else loader.out(0)
    clip_ref = _as_input(clip) if clip is not None else loader.out(1)
    vae_ref = _as_input(vae) if vae is not None else loader.out(2)
    pos = g.node("CLIPTextEncode", text=positive, clip=clip_ref)
    neg = g.node("CLIPTextEncode", text=negative, clip=clip_ref)
    latent = g.node("EmptyLatentImage", width=width, height=height, batch_size=batch_size)
    sampler = g.node("KSampler", model=model_ref, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                     scheduler=scheduler, positive=pos.out(0), negative=neg.out(0), latent_image=latent.out(0),
                     denoise=denoise)
    decode = g.node("VAEDecode", samples=sampler.out(0), vae=vae_ref)
    save = g.node("SaveImage", images=decode.out(0), filename_prefix=filename_prefix)
    save_latent_node = None
    if save_latent:
        save_latent_node = g.node("SaveLatent", samples=sampler.out(0), filename_prefix=f"latents/{filename_prefix}")
    return Txt2Img(g, model_ref, clip_ref, vae_ref, loader, pos, neg, latent, sampler, decode, save,
                   save_latent_node)


def api_graph_txt2img(ckpt_name: str, **kwargs: Any) -> dict[str, Any]:
    """The txt2img API graph for a checkpoint (keyword arguments as in `add_txt2img`)."""
    g = Graph()
    add_txt2img(g, ckpt_name=ckpt_name, **kwargs)
    return g.to_api()


def api_graph_unet_txt2img(unet_name: str, ckpt_name: str, weight_dtype: str = "default",
                           **kwargs: Any) -> dict[str, Any]:
    """txt2img with the MODEL from UNETLoader(unet_name) and CLIP/VAE from CheckpointLoaderSimple(ckpt_name)."""
    g = Graph()
    unet = g.node("UNETLoader", unet_name=unet_name, weight_dtype=weight_dtype)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    add_txt2img(g, model=unet.out(0), clip=ckpt.out(1), vae=ckpt.out(2), **kwargs)
    return g.to_api()


def output_files(history_entry: Mapping[str, Any], output_dir: str | os.PathLike[str],
                 node_id: str | None = None, kind: str = "images") -> list[Path]:
    """Paths of the files a prompt wrote (`kind` "images" for SaveImage, "latents" for SaveLatent)."""
    paths = []
    for nid, out in history_entry.get("outputs", {}).items():
        if node_id is not None and nid != str(node_id):
            continue
        for item in out.get(kind, []):
            if item.get("type", "output") == "output":
                paths.append(Path(output_dir) / item.get("subfolder", "") / item["filename"])
    return paths


def read_images(paths: Iterable[str | os.PathLike[str]]) -> Any:
    """PNG files -> a ComfyUI IMAGE tensor (B, H, W, 3) in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).float() / 255.0


def execution_seconds(history_entry: Mapping[str, Any]) -> float | None:
    """Seconds from execution_start to execution_success/error, from the server's own timestamps (ms)."""
    stamps = {name: data.get("timestamp") for name, data in history_entry.get("status", {}).get("messages", [])}
    end = stamps.get("execution_success") or stamps.get("execution_error")
    if stamps.get("execution_start") is None or end is None:
        return None
    return (end - stamps["execution_start"]) / 1000.0


def adapted_workflow(name: str, ckpt: str, size: int, steps: int) -> dict[str, Any]:
    """example_workflows/api/<name>.json made to run here: the checkpoint replaced by `ckpt`, latents and training
    images `size` pixels square, every `steps` input (samplers, training) set to `steps`."""
    graph = json.loads((REPO_ROOT / "example_workflows" / "api" / f"{name}.json").read_text())
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        if "resolution" in inputs:
            inputs["resolution"] = size
        if "steps" in inputs:
            inputs["steps"] = steps
    return graph
