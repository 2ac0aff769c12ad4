"""Scales and quantized-model files: round trips, atomic writes, the config they record, older files and
every bad-file case."""
import copy
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tuneqdm_core import (FileFormatError, ModelMismatchError, RoutingPolicy, TuneQDMConfig, fingerprint,
                          get_router, load_quantized_model, load_scales, model_config, quantize_model,
                          save_quantized_model, save_scales, scales_of)
from tuneqdm_core.fileio import CONFIG_KEY, SCALES_FORMAT, SHA_KEY, digest, read_header, read_quantized_model
from tuneqdm_core.scales import ScaleSet


def read_scales_header(path, model):
    return read_header(path, SCALES_FORMAT, defaults=model_config(model))


class Tiny(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3)))


def quantized(bits=4, experts=2, seed=0, width=8):
    torch.manual_seed(seed)
    m = Tiny(width)
    quantize_model(m, TuneQDMConfig(bits=bits, experts=experts))
    return m


def perturbed_scales(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = scales_of(model)
    tensors = {k: (o * (1 + 0.05 * torch.randn(o.shape, generator=g)), i + 0.02 * torch.randn(i.shape, generator=g))
               for k, (o, i) in s.tensors.items()}
    return ScaleSet(tensors, s.bits, s.experts, s.fingerprint)


def run(model, x, t, scales=None):
    with torch.no_grad(), get_router(model).route(t, scales=None if scales is None else scales.tensors):
        return model(x)


def test_scales_round_trip(tmp_path):
    model = quantized()
    trained = perturbed_scales(model)
    path = tmp_path / "subject.safetensors"
    save_scales(path, trained, model)
    loaded = load_scales(path, model)
    for k, (o, i) in trained.tensors.items():
        # fp16 offsets from the init: relative error far below fp16's absolute step near 1.
        torch.testing.assert_close(loaded.tensors[k][0], o, rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(loaded.tensors[k][1], i, rtol=0, atol=5e-5)  # fp16 spacing at 1 is 1e-3
    x, t = torch.randn(2, 3, 6, 6), torch.tensor([100.0, 800.0])
    torch.testing.assert_close(run(model, x, t, loaded), run(model, x, t, trained), rtol=1e-3, atol=1e-5)


def test_scales_file_stays_small_in_fp16(tmp_path):
    model = quantized(experts=4, width=64)
    path = tmp_path / "s.safetensors"
    save_scales(path, scales_of(model), model)
    n_values = scales_of(model).num_values()
    assert path.stat().st_size < 2 * n_values + 8192  # two bytes a value plus a small header


def test_quantized_model_round_trip_without_float_weights(tmp_path):
    model = quantized(bits=4, experts=3)
    path = tmp_path / "model.safetensors"
    save_quantized_model(path, model)
    with torch.device("meta"):
        skeleton = Tiny()
    loaded = load_quantized_model(path, skeleton)
    assert fingerprint(loaded) == fingerprint(model)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x, t = torch.randn(3, 3, 6, 6), torch.tensor([0.0, 400.0, 999.0])
    torch.testing.assert_close(run(loaded, x, t), run(model, x, t), rtol=0, atol=0)


def test_write_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model = quantized()
    path = tmp_path / "s.safetensors"
    save_scales(path, scales_of(model), model)
    before = path.read_bytes()

    import tuneqdm_core.fileio as fileio

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(fileio, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_scales(path, perturbed_scales(model), model)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def saved(tmp_path, model, name="s.safetensors"):
    path = tmp_path / name
    save_scales(path, scales_of(model), model)
    return path


def test_wrong_bits_is_named(tmp_path):
    path = saved(tmp_path, quantized(bits=4))
    with pytest.raises(ModelMismatchError, match="W4 model, but this model is W8"):
        load_scales(path, quantized(bits=8))


def test_wrong_experts_is_named(tmp_path):
    path = saved(tmp_path, quantized(experts=2))
    with pytest.raises(ModelMismatchError, match="2 experts, but this model has 4"):
        load_scales(path, quantized(experts=4))


def test_wrong_architecture_is_named(tmp_path):
    path = saved(tmp_path, quantized(width=8))
    with pytest.raises(ModelMismatchError, match="layer 'conv' is 8x3 in the file, 16x3 in this model"):
        load_scales(path, quantized(width=16))


def test_other_base_model_is_named(tmp_path):
    path = saved(tmp_path, quantized(seed=0))
    with pytest.raises(ModelMismatchError, match="another base model"):
        load_scales(path, quantized(seed=1))


def test_truncated_file_is_named(tmp_path):
    path = saved(tmp_path, quantized())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(FileFormatError, match="truncated or not safetensors"):
        load_scales(path, quantized())


def test_corrupted_tensor_bytes_are_named(tmp_path):
    path = saved(tmp_path, quantized())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="corrupted"):
        load_scales(path, quantized())


def test_not_safetensors_is_named(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(b"\x80\x04\x95pickle data, never loaded")
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        load_scales(path, quantized())


def test_foreign_safetensors_is_named(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(FileFormatError, match="not a TuneQDM file"):
        load_scales(path, quantized())


def test_model_file_given_as_scales_is_named(tmp_path):
    model = quantized()
    path = tmp_path / "m.safetensors"
    save_quantized_model(path, model)
    with pytest.raises(FileFormatError, match="is a tuneqdm-quantized-model file, expected a tuneqdm-scales file"):
        load_scales(path, model)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileFormatError, match="no such file"):
        load_scales(tmp_path / "nope.safetensors", quantized())


def test_quantized_model_into_wrong_architecture_is_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_quantized_model(path, quantized(width=8))
    with torch.device("meta"):
        other = Tiny(16)
    with pytest.raises(ModelMismatchError, match="does not fit this architecture"):
        load_quantized_model(path, other)


def test_scales_activated_by_the_router_do_not_touch_the_modules():
    model = quantized()
    own = copy.deepcopy(scales_of(model).tensors)
    trained = perturbed_scales(model)
    x, t = torch.randn(2, 3, 6, 6), torch.tensor([100.0, 800.0])
    base_out = run(model, x, t)
    assert not torch.allclose(run(model, x, t, trained), base_out)
    torch.testing.assert_close(run(model, x, t), base_out, rtol=0, atol=0)
    for k, (o, i) in scales_of(model).tensors.items():
        assert torch.equal(o, own[k][0]) and torch.equal(i, own[k][1])


def rewrite_metadata(path, **changes):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)
    return meta, tensors


@pytest.mark.parametrize("field, value", [("tuneqdm.train_s_in", "0"), ("tuneqdm.train.steps_done", "400"),
                                          ("comfy.model_type", "EPS")])
def test_edited_metadata_is_named_as_corruption(tmp_path, field, value):
    model = quantized()
    scales = ScaleSet(scales_of(model).tensors, 4, 2, fingerprint(model), {"steps_done": "4"})
    path = tmp_path / "s.safetensors"
    save_scales(path, scales, model, extra_metadata={"comfy.model_type": "V_PREDICTION"})
    rewrite_metadata(path, **{field: value})
    with pytest.raises(FileFormatError, match="corrupted .*metadata"):
        load_scales(path, model)


def test_version_1_files_whose_hash_covers_only_the_tensors_still_load(tmp_path):
    from tuneqdm_core.fileio import digest

    model = quantized()
    trained = perturbed_scales(model)
    scales_path, model_path = tmp_path / "s.safetensors", tmp_path / "m.safetensors"
    save_scales(scales_path, trained, model)
    save_quantized_model(model_path, model)
    for path in (scales_path, model_path):
        _, tensors = rewrite_metadata(path)
        rewrite_metadata(path, **{"tuneqdm.version": "1", "tuneqdm.sha256": digest(tensors)})
    loaded = load_scales(scales_path, model)
    for k, (o, i) in trained.tensors.items():
        torch.testing.assert_close(loaded.tensors[k][0], o, rtol=1e-3, atol=1e-7)
    with torch.device("meta"):
        skeleton = Tiny()
    assert fingerprint(load_quantized_model(model_path, skeleton)) == fingerprint(model)


def test_training_record_round_trips_through_a_scales_file(tmp_path):
    model = quantized()
    base = perturbed_scales(model)
    info = {"steps_done": "4", "steps_planned": "200", "partial": "1"}
    path = tmp_path / "p.safetensors"
    save_scales(path, ScaleSet(base.tensors, base.bits, base.experts, base.fingerprint, info), model)
    assert load_scales(path, model).info == info


def test_names_up_to_the_file_system_limit_save_next_to_any_temporary_name(tmp_path):
    model = quantized()
    path = tmp_path / ("n" * (255 - len(".safetensors")) + ".safetensors")
    save_scales(path, scales_of(model), model)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(ValueError, match="file name too long: 256 bytes"):
        save_scales(tmp_path / ("n" * 244 + ".safetensors"), scales_of(model), model)


FULL_CONFIG = TuneQDMConfig(bits=4, experts=3, train_s_in=False, s_in_init="normal", s_in_sigma=0.02, seed=5,
                            keep_float=("norm*",), group_size=0, minimize_error=False,
                            routing=RoutingPolicy(boundaries=(200.0, 700.0)))


def test_the_whole_config_is_saved_in_a_model_file_and_read_back(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    quantize_model(model, FULL_CONFIG)
    save_quantized_model(tmp_path / "m.safetensors", model)
    header, _ = read_quantized_model(tmp_path / "m.safetensors")
    assert header.config == FULL_CONFIG
    with torch.device("meta"):
        skeleton = Tiny()
    loaded = load_quantized_model(tmp_path / "m.safetensors", skeleton)
    assert model_config(loaded) == FULL_CONFIG
    assert scales_of(loaded).policy == FULL_CONFIG.routing  # so training and sampling route as the model did


def test_a_scales_file_records_the_routing_its_scales_were_trained_for(tmp_path):
    model = quantized(experts=2)
    policy = RoutingPolicy(boundaries=(830.0,))
    trained = dataclasses.replace(perturbed_scales(model), policy=policy)
    save_scales(tmp_path / "s.safetensors", trained, model)
    header, _ = read_scales_header(tmp_path / "s.safetensors", model)
    assert header.config == dataclasses.replace(model_config(model), routing=policy)
    assert load_scales(tmp_path / "s.safetensors", model).policy == policy


def test_scales_routed_by_a_policy_another_model_cannot_use_are_named(tmp_path):
    model = quantized(experts=2)
    trained = dataclasses.replace(scales_of(model), policy=RoutingPolicy(fixed_expert=3))
    with pytest.raises(ModelMismatchError, match="fixed expert 3 does not exist"):
        save_scales(tmp_path / "s.safetensors", trained, model)


def test_files_without_a_recorded_config_load_with_defaults_for_what_they_lack(tmp_path):
    """As written before the config was recorded: bits, experts and train_s_in only."""
    torch.manual_seed(0)
    model = Tiny()
    quantize_model(model, TuneQDMConfig(bits=8, experts=2, train_s_in=False, group_size=0, s_in_init="normal",
                                        routing=RoutingPolicy(boundaries=(500.0,))))
    save_quantized_model(tmp_path / "m.safetensors", model)
    save_scales(tmp_path / "s.safetensors", scales_of(model), model)
    for path in (tmp_path / "m.safetensors", tmp_path / "s.safetensors"):
        meta, tensors = rewrite_metadata(path)
        del meta[CONFIG_KEY]
        meta[SHA_KEY] = digest(tensors, meta)
        save_file(tensors, str(path), metadata=meta)
    with torch.device("meta"):
        skeleton = Tiny()
    loaded = load_quantized_model(tmp_path / "m.safetensors", skeleton)
    assert model_config(loaded) == TuneQDMConfig(bits=8, experts=2, train_s_in=False, group_size=0)
    assert load_scales(tmp_path / "s.safetensors", model).policy == RoutingPolicy()


OLD_WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    sys.path.insert(0, sys.argv[1])
    from tuneqdm_core import TuneQDMConfig, quantize_model
    from tuneqdm_core.fileio import save_quantized_model, save_scales
    from tuneqdm_core.scales import ScaleSet, scales_of
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 4 * 4, 5))
    quantize_model(m, TuneQDMConfig(bits=4, experts=2, train_s_in=False))
    s = scales_of(m)
    g = torch.Generator().manual_seed(1)
    s = ScaleSet({k: (o * (1 + 0.05 * torch.randn(o.shape, generator=g)), i) for k, (o, i) in s.tensors.items()},
                 s.bits, s.experts, s.fingerprint)
    out = sys.argv[2]
    save_quantized_model(out + "/old_model.safetensors", m)
    save_scales(out + "/old_scales.safetensors", s, m)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), m.tuneqdm_router.route(experts=torch.tensor([1, 0]), scales=s.tensors):
        torch.save({"x": x, "y": m(x)}, out + "/old_io.pt")
""")


def test_files_written_by_the_pack_before_it_recorded_the_config_still_load(tmp_path):
    """The pack of the commit before `tuneqdm.config` entered fileio.py writes a model and a scales file; this
    checkout loads both, fills what they did not record with defaults, and computes the same outputs."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "log", "--format=%H", "-S", CONFIG_KEY, "--reverse", "--",
                              "tuneqdm_core/fileio.py"], capture_output=True, text=True, check=True).stdout.split()
        if not rev:
            pytest.skip(f"no commit in this history adds {CONFIG_KEY}: nothing older to compare with")
        archive = subprocess.run(["git", "-C", str(root), "archive", f"{rev[0]}~1", "tuneqdm_core"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no git history to take the old pack from: {e}")
    old_src = tmp_path / "old"
    old_src.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    subprocess.run([sys.executable, "-c", OLD_WRITER, str(old_src), str(tmp_path)], check=True, timeout=300)
    header, _ = read_quantized_model(tmp_path / "old_model.safetensors")
    assert CONFIG_KEY not in header.metadata
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 4 * 4, 5))
    loaded = load_quantized_model(tmp_path / "old_model.safetensors", skeleton)
    assert model_config(loaded) == TuneQDMConfig(bits=4, experts=2, train_s_in=False)
    scales = load_scales(tmp_path / "old_scales.safetensors", loaded)
    assert scales.policy == RoutingPolicy()
    io = torch.load(tmp_path / "old_io.pt")
    with torch.no_grad(), get_router(loaded).route(experts=torch.tensor([1, 0]), scales=scales.tensors):
        torch.testing.assert_close(loaded(io["x"]), io["y"], rtol=1e-3, atol=1e-5)  # scales stored as fp16 offsets
