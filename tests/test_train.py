"""The headless trainer: it lowers the denoising loss, moves only drawn experts, stops cleanly."""
import math

import pytest
import torch
from torch import nn

from tuneqdm_core import NUM_TRAIN_TIMESTEPS, RoutingPolicy, TuneQDMConfig, get_router, quantize_model, scales_of
from tuneqdm_core.train import NonFiniteLossError, SampleSet, TrainConfig, train_scales


class TinyDenoiser(nn.Module):
    """A small conv eps-predictor with a timestep embedding: enough to have something to fit."""

    def __init__(self, ch=16):
        super().__init__()
        self.t_embed = nn.Linear(1, ch)
        self.blocks = nn.ModuleList([nn.Conv2d(3, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)])
        self.out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.blocks[0](x) + self.t_embed(t[:, None] / NUM_TRAIN_TIMESTEPS)[:, :, None, None]
        h = self.blocks[1](torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h))


ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS), 0)


def make_loss(model, noise_seed=None):
    def loss_fn(x0, t, cond):
        g = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
        eps = torch.randn(x0.shape, generator=g)
        a = ALPHAS[t.long()].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return (model(xt, t) - eps).pow(2).flatten(1).mean(1)
    return loss_fn


def quantized_denoiser(config):
    torch.manual_seed(0)
    model = TinyDenoiser()
    quantize_model(model, config)
    return model


def eval_loss(model, scales, image):
    from tuneqdm_core import get_router
    loss_fn = make_loss(model, noise_seed=123)
    t = torch.linspace(5, 995, 24)
    x0 = image.expand(24, -1, -1, -1)
    with torch.no_grad(), get_router(model).route(timesteps=t, scales=scales.tensors):
        return float(loss_fn(x0, t, 0).mean())


@pytest.mark.parametrize("config", [TuneQDMConfig(bits=4, experts=2), TuneQDMConfig.peqa(bits=4)],
                         ids=["tuneqdm", "peqa"])
def test_training_lowers_the_denoising_loss_on_its_image(config):
    model = quantized_denoiser(config)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    start = scales_of(model)
    before = eval_loss(model, start, image)
    result = train_scales(model, start, [SampleSet(image, cond=0)], make_loss(model),
                          TrainConfig(steps=60, lr_s_out=2e-3, lr_s_in=2e-2, batch_size=4,
                                      train_s_in=config.train_s_in, checkpointing=False))
    after = eval_loss(model, result.scales, image)
    assert result.steps_done == 60 and not result.partial
    assert after < 0.9 * before, (before, after)
    if not config.train_s_in:
        for k, (_, s_in) in result.scales.tensors.items():
            assert torch.equal(s_in, start.tensors[k][1])


def test_only_drawn_experts_move_and_the_input_scales_are_not_touched():
    model = quantized_denoiser(TuneQDMConfig(bits=8, experts=8))
    start = scales_of(model)
    own_before = {k: v[0].clone() for k, v in start.tensors.items()}
    result = train_scales(model, start, [SampleSet(torch.randn(2, 3, 8, 8), cond=0)], make_loss(model),
                          TrainConfig(steps=2, batch_size=1, lr_s_out=1e-3, lr_s_in=1e-2, checkpointing=True))
    drawn = {e for _, e, _ in result.history}
    assert 1 <= len(drawn) <= 2
    for k, (s_out, s_in) in result.scales.tensors.items():
        for e in range(8):
            moved = not torch.equal(s_out[e], start.tensors[k][0][e]) or not torch.equal(s_in[e], start.tensors[k][1][e])
            assert moved == (e in drawn), (k, e, drawn)
        assert torch.equal(start.tensors[k][0], own_before[k])  # the start set is left as it was
    from tuneqdm_core import quantized_layers
    for name, layer in quantized_layers(model):
        assert torch.equal(layer.s_out.detach(), own_before[name])  # nor the model's own scales


def test_checkpointing_gives_the_same_scales():
    image = torch.randn(1, 3, 8, 8)
    results = []
    for ckpt in (False, True):
        model = quantized_denoiser(TuneQDMConfig(bits=4, experts=4))
        results.append(train_scales(model, scales_of(model), [SampleSet(image, 0)], make_loss(model, noise_seed=5),
                                    TrainConfig(steps=3, lr_s_out=1e-3, lr_s_in=1e-2, checkpointing=ckpt)))
    for k in results[0].scales.tensors:
        torch.testing.assert_close(results[0].scales.tensors[k][0], results[1].scales.tensors[k][0])
        torch.testing.assert_close(results[0].scales.tensors[k][1], results[1].scales.tensors[k][1])


def test_stop_request_returns_partial_scales():
    model = quantized_denoiser(TuneQDMConfig(bits=4, experts=2))
    calls = []
    result = train_scales(model, scales_of(model), [SampleSet(torch.randn(1, 3, 8, 8), 0)], make_loss(model),
                          TrainConfig(steps=50, checkpointing=False), on_step=lambda s, l: calls.append(s),
                          should_stop=lambda: len(calls) >= 3)
    assert result.partial and result.steps_done == 3


def test_non_finite_loss_stops_with_the_last_finite_scales():
    model = quantized_denoiser(TuneQDMConfig(bits=4, experts=2))
    good = make_loss(model)
    count = [0]

    def sometimes_nan(x0, t, cond):
        count[0] += 1
        loss = good(x0, t, cond)
        return loss * math.nan if count[0] == 3 else loss

    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3") as info:
        train_scales(model, scales_of(model), [SampleSet(torch.randn(1, 3, 8, 8), 0)], sometimes_nan,
                     TrainConfig(steps=10, lr_s_out=1e-3, checkpointing=False))
    kept = info.value.result
    assert kept.steps_done == 2 and kept.partial
    assert all(torch.isfinite(o).all() and torch.isfinite(i).all() for o, i in kept.scales.tensors.values())


def test_empty_image_batch_is_refused():
    with pytest.raises(ValueError, match="empty image batch"):
        SampleSet(torch.zeros(0, 3, 8, 8), cond=0)


def test_an_exception_the_caller_names_ends_the_run_and_drops_that_step():
    class Interrupt(Exception):
        pass

    model = quantized_denoiser(TuneQDMConfig(bits=4, experts=2))
    good = make_loss(model)
    calls = [0]

    def interrupted_in_step_3(x0, t, cond):
        calls[0] += 1
        if calls[0] == 3:
            raise Interrupt()
        return good(x0, t, cond)

    result = train_scales(model, scales_of(model), [SampleSet(torch.randn(1, 3, 8, 8), 0)], interrupted_in_step_3,
                          TrainConfig(steps=10, checkpointing=False), stop_exceptions=(Interrupt,))
    assert result.partial and result.steps_done == 2
    assert max(step for step, _, _ in result.history) == 2


def test_checkpointed_blocks_on_the_cpu_hand_freed_heap_back_each_time_they_run(monkeypatch):
    import tuneqdm_core.checkpointing as checkpointing
    calls = []
    monkeypatch.setattr(checkpointing, "release_freed_memory", lambda: calls.append(1))
    model = quantized_denoiser(TuneQDMConfig(bits=4, experts=2))
    train_scales(model, scales_of(model), [SampleSet(torch.randn(1, 3, 8, 8), 0)], make_loss(model),
                 TrainConfig(steps=2, checkpointing=True))
    assert len(calls) == 2 * 4 * 2  # steps x blocks (t_embed, two convs, out) x (forward, recompute)


def recording_loss(model, calls):
    good = make_loss(model)

    def loss_fn(x0, t, cond):
        calls.append((tuple(x0.shape), cond, len(t)))
        return good(x0, t, cond)
    return loss_fn


def test_gradient_accumulation_sums_batches_into_one_step():
    model = quantized_denoiser(TuneQDMConfig(bits=4, experts=2))
    calls, steps = [], []
    result = train_scales(model, scales_of(model), [SampleSet(torch.randn(4, 3, 8, 8), 0)], recording_loss(model, calls),
                          TrainConfig(steps=3, batch_size=2, grad_accumulation_steps=3, checkpointing=False),
                          on_step=lambda s, l: steps.append(s))
    assert steps == [1, 2, 3] and len(result.losses) == 3
    assert sum(n for _, _, n in calls) == 3 * 2 * 3
    assert [sum(1 for s, _, _ in result.history if s == step) for step in (1, 2, 3)] == [6, 6, 6]


def test_images_of_two_sizes_with_a_caption_each_are_one_subject():
    model = quantized_denoiser(TuneQDMConfig(bits=4, experts=2))
    calls = []
    small = SampleSet(torch.randn(3, 3, 8, 8), (0, 1, 2), subject=0)
    large = SampleSet(torch.randn(2, 3, 12, 12), (3, 4), subject=0)
    train_scales(model, scales_of(model), [small, large], recording_loss(model, calls),
                 TrainConfig(steps=20, batch_size=4, checkpointing=False))
    sizes = {shape[-1] for shape, _, _ in calls}
    assert sizes == {8, 12}, "a step's samples come from both sizes of the one subject"
    assert {cond for _, cond, _ in calls} == {0, 1, 2, 3, 4}
    assert all((shape[-1] == 8) == (cond < 3) for shape, cond, _ in calls), "each image keeps its own caption"
    assert sum(n for _, _, n in calls) == 20 * 4


def test_resume_takes_the_remaining_steps_from_the_given_scales():
    model = quantized_denoiser(TuneQDMConfig(bits=4, experts=2))
    data = [SampleSet(torch.randn(1, 3, 8, 8), 0)]
    calls = []
    first = train_scales(model, scales_of(model), data, make_loss(model),
                         TrainConfig(steps=10, lr_s_out=1e-3, checkpointing=False), should_stop=lambda: len(calls) >= 4,
                         on_step=lambda s, l: calls.append(s))
    assert first.partial and first.steps_done == 4
    steps = []
    resumed = train_scales(model, first.scales, data, make_loss(model), TrainConfig(steps=10, lr_s_out=1e-3,
                           checkpointing=False), on_step=lambda s, l: steps.append(s), start_step=4)
    assert steps == list(range(5, 11)) and resumed.steps_done == 10 and not resumed.partial
    assert min(s for s, _, _ in resumed.history) == 5
    k = next(iter(first.scales.tensors))
    assert not torch.equal(resumed.scales.tensors[k][0], first.scales.tensors[k][0])
    with pytest.raises(ValueError, match="more than the 10 already done"):
        train_scales(model, resumed.scales, data, make_loss(model), TrainConfig(steps=10), start_step=10)


def test_requires_grad_false_on_the_model_does_not_change_what_training_trains():
    """Other nodes call requires_grad_(False) on the MODEL they run: s_in still trains on a TuneQDM model, and
    still stays frozen on a PEQA one, whatever the layers' flags say."""
    image = torch.randn(1, 3, 8, 8)
    for config, s_in_moves in ((TuneQDMConfig(bits=4, experts=2), True), (TuneQDMConfig.peqa(bits=4), False)):
        model = quantized_denoiser(config)
        model.requires_grad_(False if s_in_moves else True)
        start = scales_of(model)
        result = train_scales(model, start, [SampleSet(image, cond=0)], make_loss(model),
                              TrainConfig(steps=2, lr_s_out=1e-3, lr_s_in=1e-2, checkpointing=False))
        moved = any(not torch.equal(s_in, start.tensors[k][1]) for k, (_, s_in) in result.scales.tensors.items())
        assert moved == s_in_moves, config


@pytest.mark.parametrize("policy", [RoutingPolicy(boundaries=(100.0, 200.0, 900.0)), RoutingPolicy(fixed_expert=2)],
                         ids=["custom-boundaries", "fixed-expert"])
def test_each_sample_trains_the_expert_the_models_policy_picks(policy):
    model = quantized_denoiser(TuneQDMConfig(bits=8, experts=4, routing=policy))
    router, seen = get_router(model), []
    base = make_loss(model)

    def loss_fn(x0, t, cond):
        seen.append((t.clone(), router.expert_index.clone()))
        return base(x0, t, cond)

    start = scales_of(model)
    assert start.policy == policy
    result = train_scales(model, start, [SampleSet(torch.randn(2, 3, 8, 8), cond=0)], loss_fn,
                          TrainConfig(steps=12, batch_size=2, lr_s_out=1e-3, lr_s_in=1e-2, checkpointing=False))
    t = torch.cat([ts for ts, _ in seen])
    routed = torch.cat([e for _, e in seen])
    assert torch.equal(routed, policy.experts(t, 4))
    assert result.scales.policy == policy
    untouched = set(range(4)) - set(routed.tolist())
    assert untouched  # both policies leave an expert without samples here: it must not move
    for k, (s_out, _) in result.scales.tensors.items():
        for e in untouched:
            assert torch.equal(s_out[e], start.tensors[k][0][e]), (k, e)
