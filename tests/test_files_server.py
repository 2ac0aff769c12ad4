"""Save / Load nodes in a real ComfyUI server, as a careless user drives them: saving twice under one name,
scales and UNets side by side, files rewritten between prompts, names that cannot make a usable file, and
files written by earlier versions of the pack."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from test_lifecycle_server import Digits

pytestmark = pytest.mark.server


def tuneqdm_dir(server):
    return server.models_dir / "tuneqdm"


def save_graph(kind: str, prefix: str, s_in_init: str = "ones", experts: int = 2, **extra) -> tuple[Digits, object]:
    """Quantize the default model and save its scales ("scales") or the whole quantized UNet ("unet")."""
    d = Digits()
    q = d.g.node("TuneQDMQuantizeUNet", model=d.model, bits="4", experts=experts, scales="s_out and s_in (TuneQDM)",
                 s_in_init=s_in_init, keep_float="")
    node = "TuneQDMSaveScales" if kind == "scales" else "TuneQDMSaveQuantizedUNet"
    save = d.g.node(node, model=q, filename_prefix=prefix, **extra)
    return d, save


def saved_name(entry: dict, save) -> str:
    return "".join(entry["outputs"][save.id]["text"])


def dropdown(server, node: str, field: str) -> list[str]:
    return server.object_info()[node]["input"]["required"][field][1]["options"]


def find(server, relname: str):
    """The one file under models/tuneqdm/ whose path ends with `relname`, wherever this version put it."""
    (path,) = [p for p in tuneqdm_dir(server).rglob("*") if p.as_posix().endswith("/" + relname)]
    return path


@pytest.mark.parametrize("kind", ["scales", "unet"])
def test_saving_twice_under_one_name_keeps_the_first_file(comfy_server, kind):
    prefix = f"twice/{kind}"
    d, save = save_graph(kind, prefix, s_in_init="ones")
    comfy_server.run(d.g.to_api(), check=True)
    first = find(comfy_server, f"{prefix}.safetensors")
    original = first.read_bytes()

    d, save = save_graph(kind, prefix, s_in_init="normal")
    second = saved_name(comfy_server.run(d.g.to_api(), check=True), save)
    assert first.read_bytes() == original, "the second save replaced the first file"
    assert second == f"{prefix}_00001.safetensors"
    assert first.with_name(f"{kind}_00001.safetensors").read_bytes() != original

    d, save = save_graph(kind, prefix, s_in_init="normal", experts=3, overwrite=True)
    assert saved_name(comfy_server.run(d.g.to_api(), check=True), save) == f"{prefix}.safetensors"
    assert first.read_bytes() != original
    assert sorted(p.name for p in first.parent.iterdir()) == [f"{kind}.safetensors", f"{kind}_00001.safetensors"]
    assert first.parent == tuneqdm_dir(comfy_server) / kind / "twice"


def test_scales_and_unets_have_their_own_folders_and_dropdowns(comfy_server):
    for kind in ("scales", "unet"):
        d, _ = save_graph(kind, "same_name")
        comfy_server.run(d.g.to_api(), check=True)
    assert (tuneqdm_dir(comfy_server) / "scales" / "same_name.safetensors").is_file()
    assert (tuneqdm_dir(comfy_server) / "unet" / "same_name.safetensors").is_file()
    scales = dropdown(comfy_server, "TuneQDMLoadScales", "scales_name")
    unets = dropdown(comfy_server, "TuneQDMLoadQuantizedUNet", "unet_name")
    assert "same_name.safetensors" in scales and "same_name.safetensors" in unets
    assert not any(n.startswith(("scales/", "unet/")) for n in scales + unets), (scales, unets)

    # Loading each by that name gets the right kind of file.
    d = Digits()
    unet = d.g.node("TuneQDMLoadQuantizedUNet", unet_name="same_name.safetensors")
    loaded = d.g.node("TuneQDMLoadScales", model=unet, scales_name="same_name.safetensors")
    d.sample(loaded.out(0), "same_name")
    comfy_server.run(d.g.to_api(), check=True)


def as_version_1(src, dst) -> None:
    """The file as version 1 of the pack wrote it: sha256 over the tensors only."""
    from tuneqdm_core.fileio import digest

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    meta.update({"tuneqdm.version": "1", "tuneqdm.sha256": digest(tensors)})
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)


def test_files_of_earlier_versions_in_the_shared_folder_still_load(comfy_server):
    for kind in ("scales", "unet"):
        d, _ = save_graph(kind, f"for_legacy_{kind}")
        comfy_server.run(d.g.to_api(), check=True)
    legacy = tuneqdm_dir(comfy_server) / "legacy"
    as_version_1(tuneqdm_dir(comfy_server) / "scales" / "for_legacy_scales.safetensors", legacy / "old_scales.safetensors")
    as_version_1(tuneqdm_dir(comfy_server) / "unet" / "for_legacy_unet.safetensors", legacy / "old_unet.safetensors")

    scales = dropdown(comfy_server, "TuneQDMLoadScales", "scales_name")
    unets = dropdown(comfy_server, "TuneQDMLoadQuantizedUNet", "unet_name")
    assert "legacy/old_scales.safetensors" in scales and "legacy/old_scales.safetensors" not in unets
    assert "legacy/old_unet.safetensors" in unets and "legacy/old_unet.safetensors" not in scales

    d = Digits()
    unet = d.g.node("TuneQDMLoadQuantizedUNet", unet_name="legacy/old_unet.safetensors")
    loaded = d.g.node("TuneQDMLoadScales", model=unet, scales_name="legacy/old_scales.safetensors")
    d.sample(loaded.out(0), "legacy")
    comfy_server.run(d.g.to_api(), check=True)


def test_edited_metadata_is_reported_as_corruption(comfy_server):
    d, _ = save_graph("unet", "edited")
    comfy_server.run(d.g.to_api(), check=True)
    path = tuneqdm_dir(comfy_server) / "unet" / "edited.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta["comfy.model_type"] = "EPS"  # a v model relabelled eps: same tensors, wrong sampling
    save_file(tensors, str(path), metadata=meta)

    d = Digits()
    d.sample(d.g.node("TuneQDMLoadQuantizedUNet", unet_name="edited.safetensors"), "edited")
    err = comfy_server.execution_error(comfy_server.run(d.g.to_api()))
    assert err is not None and "corrupted" in err["exception_message"], err


def latent_after_loading(server, scales_name: str | None = None, unet_name: str | None = None) -> torch.Tensor:
    d = Digits()
    model = d.g.node("TuneQDMLoadQuantizedUNet", unet_name=unet_name) if unet_name else d.quantize(d.model, "4", 2)
    if scales_name:
        model = d.g.node("TuneQDMLoadScales", model=model, scales_name=scales_name)
    d.sample(model, "reloaded")
    return d.run(server)["reloaded"]


def test_loaders_read_a_rewritten_file_afresh(comfy_server):
    for kind, init, prefix in (("scales", "ones", "fresh/sa"), ("scales", "normal", "fresh/sb"),
                               ("unet", "ones", "fresh/ua"), ("unet", "normal", "fresh/ub")):
        d, _ = save_graph(kind, prefix, s_in_init=init)
        comfy_server.run(d.g.to_api(), check=True)
    files = {name: find(comfy_server, f"fresh/{name}.safetensors") for name in ("sa", "sb", "ua", "ub")}
    sx, ux = files["sa"].with_name("sx.safetensors"), files["ua"].with_name("ux.safetensors")
    sx.write_bytes(files["sa"].read_bytes())
    ux.write_bytes(files["ua"].read_bytes())

    scales_b = latent_after_loading(comfy_server, scales_name="fresh/sb.safetensors")
    unet_b = latent_after_loading(comfy_server, unet_name="fresh/ub.safetensors")
    # Each file is read, rewritten with b's content (as a save with overwrite on, or the user, would), and
    # the same graph queued again at once: it must read the file again, not serve its cached output.
    for rewritten, source, key, expected in ((sx, files["sb"], "scales_name", scales_b),
                                             (ux, files["ub"], "unet_name", unet_b)):
        name = f"fresh/{rewritten.name}"
        before = latent_after_loading(comfy_server, **{key: name})
        assert not torch.equal(before, expected)
        rewritten.write_bytes(source.read_bytes())
        assert torch.equal(latent_after_loading(comfy_server, **{key: name}), expected), f"{name} served stale"


@pytest.mark.parametrize("prefix, message", [
    ("", "names no file"),
    ("sub/", "names no file"),
    (".", "starts with '.'"),
    ("sub/.hidden", "starts with '.'"),
    ("bad\x00name", "NUL character"),
    ("n" * 238, "at most 237 bytes"),
])
def test_names_that_cannot_make_a_visible_loadable_file_are_refused(comfy_server, prefix, message):
    before = sorted(p.relative_to(tuneqdm_dir(comfy_server)) for p in tuneqdm_dir(comfy_server).rglob("*"))
    d, _ = save_graph("scales", prefix)
    err = comfy_server.execution_error(comfy_server.run(d.g.to_api()))
    assert err is not None, f"{prefix!r} was accepted"
    assert message in err["exception_message"] and "filename_prefix" in err["exception_message"], err
    after = sorted(p.relative_to(tuneqdm_dir(comfy_server)) for p in tuneqdm_dir(comfy_server).rglob("*"))
    assert after == before


def test_the_longest_name_the_file_system_takes_saves_and_loads(comfy_server):
    prefix = "l" * 237  # + "_00001.safetensors" = 255 bytes, the usual limit for one file name
    for init in ("ones", "normal"):
        d, save = save_graph("scales", prefix, s_in_init=init)
        name = saved_name(comfy_server.run(d.g.to_api(), check=True), save)
    assert name == prefix + "_00001.safetensors" and len(name) == 255
    assert name in dropdown(comfy_server, "TuneQDMLoadScales", "scales_name")
    latent_after_loading(comfy_server, scales_name=name)
