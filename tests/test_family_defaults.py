"""keep_float 'auto' (nodes/family_defaults.py): each family's default names layers its real files have
(checked on the names and shapes ComfyUI builds for the family, so a renamed layer in a host update fails
here), keeps under 1% of the full-size parameters in float, and reaches the families' variants through
ComfyUI's class hierarchy. The server side (the report, both quantizing nodes) is in test_families_server."""
from __future__ import annotations

import fnmatch

import pytest

from tuneqdm_fixtures.families import FAMILIES, family_specs, flux_dev_parameters
from tuneqdm_fixtures.host import host_version, import_comfy, import_pack

FAMILY_CLASS = {"sdxl": "SDXL", "sd35m": "SD3", "flux": "Flux", "wan21": "WAN21_T2V"}


@pytest.fixture(scope="module")
def defaults():
    if host_version() < (0, 8, 0):
        pytest.skip(f"the family files target ComfyUI 0.8.0 (host {host_version()})")
    import_pack()
    from tuneqdm_pack.nodes import family_defaults

    return family_defaults


def _config_of(class_name: str) -> object:
    """An instance of ComfyUI's model-config class (family_of reads only its type)."""
    cls = getattr(import_comfy().supported_models, class_name)
    return object.__new__(cls)


def _quantizable(specs) -> dict[str, int]:
    """Linear (2-D) and Conv2d (4-D) layers: name -> weight values."""
    return {k[: -len(".weight")]: s.numel for k, s in specs.items() if k.endswith(".weight") and len(s.shape) in (2, 4)}


@pytest.mark.parametrize("family", list(FAMILY_CLASS))
def test_each_pattern_names_layers_and_the_default_is_small(defaults, family):
    cls = FAMILY_CLASS[family]
    assert FAMILIES[family].comfy_class == cls
    assert defaults.family_of(_config_of(cls)) == cls
    patterns = defaults.KEEP_FLOAT_BY_FAMILY[cls]
    specs = {size: family_specs(family, size) for size in ("test", "full")}
    for size, of_size in specs.items():
        layers = _quantizable(of_size)
        for pattern in patterns:
            assert any(fnmatch.fnmatchcase(name, pattern) for name in layers), (family, size, pattern)
    # The share at full size (test files are mostly embeddings); Flux's file at Flux dev's depth.
    full = specs["full"]
    kept = sum(n for name, n in _quantizable(full).items() if any(fnmatch.fnmatchcase(name, p) for p in patterns))
    total = flux_dev_parameters(full) if family == "flux" else sum(s.numel for s in full.values())
    share = kept / total
    assert 0 < share < 0.01, (family, share)


def test_variants_inherit_their_familys_default_and_sd1_keeps_nothing(defaults):
    expected = {"SSD1B": "SDXL", "SDXL_instructpix2pix": "SDXL", "FluxSchnell": "Flux", "FluxInpaint": "Flux",
                "WAN21_I2V": "WAN21_T2V", "WAN22_T2V": "WAN21_T2V", "SD15": None, "SD20": None}
    assert {name: defaults.family_of(_config_of(name)) for name in expected} == expected


def test_auto_is_replaced_by_the_family_patterns_and_other_patterns_stay(defaults):
    from tuneqdm_pack.tuneqdm_core import TuneQDMConfig

    config, note = defaults.resolve_keep_float(TuneQDMConfig(keep_float=("auto", "*attn2*")), _config_of("Flux"))
    assert config.keep_float == defaults.KEEP_FLOAT_BY_FAMILY["Flux"] + ("*attn2*",)
    assert note.startswith("keep_float auto for Flux: img_in, txt_in")

    config, note = defaults.resolve_keep_float(TuneQDMConfig(keep_float=("auto",)), _config_of("SD15"))
    assert config.keep_float == () and "no layer kept in float" in note

    given = TuneQDMConfig(keep_float=("*out.2*",))
    assert defaults.resolve_keep_float(given, _config_of("SDXL")) == (given, None)
    config, note = defaults.resolve_keep_float(TuneQDMConfig(keep_float=("auto",)), None)
    assert config.keep_float == () and "without a ComfyUI model config" in note
