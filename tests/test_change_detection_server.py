"""Change detection of the loaders, as a sequence of prompts on one server: a file rewritten in place is
read again on the next prompt (and the sampler downstream runs again on it), and a prompt that changes
nothing is served from ComfyUI's cache without reading the file."""
from __future__ import annotations

import pytest
import torch

from test_files_server import find, save_graph
from test_lifecycle_server import Digits

pytestmark = pytest.mark.server

KINDS = {"scales": ("TuneQDMLoadScales", "scales_name"), "unet": ("TuneQDMLoadQuantizedUNet", "unet_name")}


def loading_graph(kind: str, name: str) -> tuple[Digits, object, str]:
    """The default model sampled through the file `name`; returns the graph, the loader and the sampler's id."""
    d = Digits()
    node, field = KINDS[kind]
    if kind == "scales":
        loader = d.g.node(node, model=d.quantize(d.model, "4", 2), **{field: name})
    else:
        loader = d.g.node(node, **{field: name})
    sampler = d.sample(loader.out(0), "through_file")
    return d, loader, sampler.id


def run(server, d: Digits) -> tuple[torch.Tensor, set[str]]:
    """The sampled latent and the ids of the nodes ComfyUI served from its cache."""
    latents, entry = d.run_entry(server)
    cached = set()
    for event, data in entry["status"]["messages"]:
        if event == "execution_cached":
            cached |= set(data["nodes"])
    return latents["through_file"], cached


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_file_rewritten_in_place_is_read_again_and_an_unchanged_one_is_cached(comfy_server, kind):
    for init in ("ones", "normal"):
        d, _ = save_graph(kind, f"change/{kind}_{init}", s_in_init=init)
        comfy_server.run(d.g.to_api(), check=True)
    ones, normal = find(comfy_server, f"change/{kind}_ones.safetensors"), find(comfy_server, f"change/{kind}_normal.safetensors")
    target = ones.with_name(f"{kind}_target.safetensors")
    target.write_bytes(ones.read_bytes())
    name = f"change/{target.name}"

    expected_after, _ = run(comfy_server, loading_graph(kind, f"change/{normal.name}")[0])
    d, loader, sampler = loading_graph(kind, name)
    before, _ = run(comfy_server, d)
    assert not torch.equal(before, expected_after), "the two files sample alike: the test could not see a change"

    with open(target, "r+b") as f:  # in place: same inode, as Save Scales with overwrite on writes it
        f.write(normal.read_bytes())
        f.truncate()
    after, cached = run(comfy_server, d)
    assert loader.id not in cached and sampler not in cached, "the rewritten file was served from the cache"
    assert torch.equal(after, expected_after), "the loader did not read the file's new content"

    again, cached = run(comfy_server, d)
    assert {loader.id, sampler} <= cached, f"nothing changed, yet the loader or sampler ran again (cached: {cached})"
    assert torch.equal(again, expected_after)
