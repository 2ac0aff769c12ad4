"""ComfyUI's ModelPatcher driving a quantized MODEL in this process: a quantized model owns its tensors
(ComfyUI moves and casts models in place), ComfyUI's memory accounting sees its real size, and partial
loading / offloading (low-VRAM mode) computes exactly what a full load computes. These machines have no
GPU, so load and offload devices are both the CPU: the tests check that the quantized layers take part
in ComfyUI's protocol (they are offloaded and cast per call) and that the numbers stay the same."""
from __future__ import annotations

import pytest
import torch

from tuneqdm_fixtures.host import import_pack


@pytest.fixture(scope="module")
def pack():
    """The pack imported as ComfyUI imports it: a package whose `nodes` import ComfyUI."""
    return import_pack()


def _storages(module: torch.nn.Module) -> set[int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def test_quantized_model_owns_every_tensor_and_reports_its_size(pack):
    from tuneqdm_pack.nodes.default_model import load_model
    from tuneqdm_pack.nodes.patcher import quantize_patcher
    from tuneqdm_pack.tuneqdm_core import TuneQDMConfig

    float_model = load_model()
    before = {k: v.clone() for k, v in float_model.model.state_dict().items()}
    quantized, _ = quantize_patcher(float_model, TuneQDMConfig(bits=8, experts=2))
    assert not _storages(float_model.model) & _storages(quantized.model)

    quantized.model.to(torch.float16)  # what a cast or a device move does to the whole module tree
    after = float_model.model.state_dict()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key

    size = sum(t.nbytes for t in quantized.model.state_dict().values())
    assert quantized.model_size() == size
    assert size < 0.5 * float_model.model_size()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 16, 384, generator=g)
    return x, torch.tensor([900.0, 120.0]), context


def test_partial_loading_and_offloading_compute_what_a_full_load_computes(pack):
    from tuneqdm_pack.nodes.default_model import load_model
    from tuneqdm_pack.nodes.patcher import quantize_patcher
    from tuneqdm_pack.tuneqdm_core import QuantLayer, TuneQDMConfig, get_router

    model, _ = quantize_patcher(load_model(), TuneQDMConfig(bits=4, experts=4))
    dm = model.model.diffusion_model
    x, t, context = _inputs()

    def output() -> torch.Tensor:
        with torch.no_grad(), get_router(dm).route(t):
            return dm(x, t, context=context)

    def cast_layers() -> int:
        return sum(bool(m.comfy_cast_weights) for m in dm.modules() if isinstance(m, QuantLayer))

    device = model.offload_device
    size = model.model_size()
    model.patch_model(device_to=device, lowvram_model_memory=0, load_weights=True)  # full load
    reference = output()
    model.unpatch_model(device)

    model.patch_model(device_to=device, lowvram_model_memory=size // 3, load_weights=True)
    assert model.model.model_lowvram, "a budget of a third of the model must load it partially"
    assert cast_layers() > 0, "quantized layers left on the offload device must be cast per call"
    torch.testing.assert_close(output(), reference, rtol=0, atol=0)

    loaded = model.model.model_loaded_weight_memory
    freed = model.partially_unload(device, memory_to_free=max(loaded // 2, 1))
    assert freed > 0
    torch.testing.assert_close(output(), reference, rtol=0, atol=0)

    model.partially_load(device, extra_memory=size)
    torch.testing.assert_close(output(), reference, rtol=0, atol=0)
    model.detach()
    assert cast_layers() == 0
    torch.testing.assert_close(output(), reference, rtol=0, atol=0)


NATIVE_TYPES = ["EPS", "V_PREDICTION", "V_PREDICTION_EDM", "EDM", "FLOW", "V_PREDICTION_CONTINUOUS", "FLUX",
                "STABLE_CASCADE"]


@pytest.mark.parametrize("model_type", NATIVE_TYPES)
def test_every_native_schedule_spans_the_expert_scale_and_inverts(pack, model_type):
    """Each of ComfyUI's model types, as its loader builds its `model_sampling`: sigma_max lands on t = 999
    and sigma_min on 0 (so the first and last experts are reached), t falls as sigma falls, and training's
    sigma_of_timestep inverts the routing's schedule_timestep."""
    import comfy.model_base
    import comfy.supported_models
    from tuneqdm_pack.nodes.model_schedule import schedule_timestep, sigma_of_timestep

    config = comfy.supported_models.SD15({})
    ms = comfy.model_base.model_sampling(config, comfy.model_base.ModelType[model_type])
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    sigmas = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 50)
    t = schedule_timestep(ms, sigmas)
    assert float(t[0]) == pytest.approx(0.0, abs=1.0) and float(t[-1]) == pytest.approx(999.0, abs=1.0)
    assert bool((t[1:] >= t[:-1]).all()), f"{model_type}: timesteps not monotone in sigma"
    inner = torch.linspace(5.0, 995.0, 25)
    torch.testing.assert_close(schedule_timestep(ms, sigma_of_timestep(ms, inner)), inner, rtol=0, atol=0.5)


def test_a_patch_a_quantized_layer_cannot_take_is_an_error_naming_its_key(pack):
    """LoRA-type patches become adapters; one that needs the float weight ('set', here) is refused by name,
    never skipped."""
    from tuneqdm_pack.nodes.default_model import load_model
    from tuneqdm_pack.nodes.lora import UnsupportedPatch, adapters_for
    from tuneqdm_pack.nodes.patcher import quantize_patcher
    from tuneqdm_pack.tuneqdm_core import TuneQDMConfig

    model, _ = quantize_patcher(load_model(), TuneQDMConfig(bits=8, experts=1))
    dm = model.model.diffusion_model
    key = "diffusion_model.out.2.weight"
    clone = model.clone()
    assert clone.add_patches({key: ("set", (torch.zeros(4, 32, 3, 3),))}) == [key]
    with pytest.raises(UnsupportedPatch, match=r"diffusion_model\.out\.2\.weight.*not additive"):
        adapters_for(clone, dm, torch.device("cpu"), torch.float32)
    diff = model.clone()
    diff.add_patches({key: (torch.ones(4, 32, 3, 3),)}, strength_patch=0.5)
    (adapter,) = adapters_for(diff, dm, torch.device("cpu"), torch.float32)["out.2"]
    torch.testing.assert_close(adapter.delta(), torch.full((4, 32, 3, 3), 0.5))


def test_the_sampling_wrapper_routes_by_the_models_policy_unless_scales_bring_their_own(pack):
    """A MODEL quantized with custom boundaries routes every call by them; scales loaded or trained with
    another policy route by theirs."""
    import dataclasses

    from tuneqdm_pack.nodes.default_model import load_model
    from tuneqdm_pack.nodes.model_schedule import sigma_of_timestep
    from tuneqdm_pack.nodes.patcher import quantize_patcher, routing_of
    from tuneqdm_pack.tuneqdm_core import RoutingPolicy, TuneQDMConfig, get_router, scales_of

    policy = RoutingPolicy(boundaries=(100.0, 200.0, 300.0))
    model, _ = quantize_patcher(load_model(), TuneQDMConfig(bits=8, experts=4, routing=policy))
    base = model.model
    router = get_router(base.diffusion_model)

    class Executor:  # stands for the model call the APPLY_MODEL wrapper wraps
        class_obj = base

        def __call__(self, x, t):
            return router.expert_index.clone()

    sigma = sigma_of_timestep(base.model_sampling, torch.tensor([50.0, 150.0, 250.0, 800.0]))
    x = torch.zeros(4, 1)
    assert routing_of(model)(Executor(), x, sigma).tolist() == [0, 1, 2, 3]
    scales = dataclasses.replace(scales_of(base.diffusion_model), policy=RoutingPolicy())
    uniform = routing_of(model).with_changes(scales=scales, policy=scales.policy)
    assert uniform(Executor(), x, sigma).tolist() == [0, 0, 1, 3]
