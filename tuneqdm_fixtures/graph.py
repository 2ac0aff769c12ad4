"""ComfyUI API-format graphs built in code (`Graph`, `add_txt2img`, `api_graph_txt2img`,
`api_graph_unet_txt2img`), the checkout's API workflows made to run on test-size files, and reading back
what a prompt wrote. Nothing but the standard library is imported at module level."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import checkout

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


def texts(history_entry: Mapping[str, Any]) -> dict[str, str]:
    """node id -> the text a prompt's PreviewAny nodes showed."""
    return {nid: "".join(out["text"]) for nid, out in history_entry.get("outputs", {}).items() if "text" in out}


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
    graph = json.loads((checkout() / "example_workflows" / "api" / f"{name}.json").read_text())
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
