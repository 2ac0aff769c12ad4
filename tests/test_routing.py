"""Routing policies and the model's TuneQDMConfig: parsing, validation, and the JSON both file formats store."""
import pytest
import torch

from tuneqdm_core import (NUM_TRAIN_TIMESTEPS, RoutingError, RoutingPolicy, TuneQDMConfig, get_router,
                          quantize_model)
from tuneqdm_core.errors import SettingError
from tuneqdm_core.model import model_config
from tuneqdm_core.routing import expert_of_timestep, sample_timesteps


def test_policies_pick_experts_by_intervals_cut_points_or_one_expert():
    t = torch.tensor([0.0, 249.9, 250.0, 600.0, NUM_TRAIN_TIMESTEPS - 1.0])
    assert RoutingPolicy().experts(t, 4).tolist() == [0, 0, 1, 2, 3]
    assert RoutingPolicy(boundaries=(100, 700, 900)).experts(t, 4).tolist() == [0, 1, 1, 1, 3]
    assert RoutingPolicy(fixed_expert=2).experts(t, 4).tolist() == [2] * 5
    assert RoutingPolicy.from_inputs("custom boundaries", "100; 700, 900", 0) == RoutingPolicy(boundaries=(100, 700, 900))
    assert RoutingPolicy.from_inputs("fixed expert", "", 3) == RoutingPolicy(fixed_expert=3)


@pytest.mark.parametrize("policy, experts, error, message", [
    (RoutingPolicy(boundaries=(500,)), 4, RoutingError, "4 experts need 3 increasing boundaries, got \\[500.0\\]"),
    (RoutingPolicy(boundaries=(700, 300, 900)), 4, SettingError, "increasing"),
    (RoutingPolicy(fixed_expert=6), 4, RoutingError, "fixed expert 6 does not exist: this model has experts 0..3"),
])
def test_a_policy_that_does_not_fit_the_experts_is_named(policy, experts, error, message):
    with pytest.raises(error, match=message):
        policy.experts(torch.zeros(1), experts)
    with pytest.raises(error, match=message):
        TuneQDMConfig(experts=experts, routing=policy)


def test_unparsable_boundaries_are_named():
    with pytest.raises(SettingError, match="comma-separated timesteps"):
        RoutingPolicy.from_inputs("custom boundaries", "250, half", 0)


def test_training_timesteps_cover_the_range_and_uniform_intervals_split_it_evenly():
    t = sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert 0.0 <= float(t.min()) and float(t.max()) < NUM_TRAIN_TIMESTEPS
    counts = torch.bincount(expert_of_timestep(t, 4), minlength=4).float() / t.numel()
    torch.testing.assert_close(counts, torch.full((4,), 0.25), rtol=0, atol=0.02)


@pytest.mark.parametrize("config", [
    TuneQDMConfig(),
    TuneQDMConfig.peqa(bits=8, group_size=0),
    TuneQDMConfig(bits=4, experts=3, s_in_init="normal", s_in_sigma=0.02, seed=7, keep_float=("*head*",),
                  group_size=32, minimize_error=False, routing=RoutingPolicy(boundaries=(300.0, 650.0))),
    TuneQDMConfig(experts=4, routing=RoutingPolicy(fixed_expert=1)),
], ids=["default", "peqa", "everything-set", "fixed"])
def test_config_json_round_trips_every_field(config):
    import json

    assert TuneQDMConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_config_json_from_an_older_writer_takes_defaults_and_refuses_unknown_fields():
    defaults = TuneQDMConfig(bits=8, experts=2, group_size=0)
    assert TuneQDMConfig.from_json({"bits": 4}, defaults) == TuneQDMConfig(bits=4, experts=2, group_size=0)
    with pytest.raises(SettingError, match="unknown TuneQDM config fields \\['warp'\\]"):
        TuneQDMConfig.from_json({"bits": 4, "warp": 9})


def test_the_model_keeps_its_config_and_requires_grad_does_not_change_it():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    config = TuneQDMConfig(bits=4, experts=2, keep_float=("1",), routing=RoutingPolicy(boundaries=(400.0,)))
    quantize_model(model, config)
    model.requires_grad_(False)  # what other nodes do to a MODEL they run
    assert model_config(model) == config
    assert model_config(model).scales_mode == "TuneQDM"


def test_a_forward_routed_by_timesteps_follows_the_models_policy():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    quantize_model(model, TuneQDMConfig(bits=8, experts=4, routing=RoutingPolicy(boundaries=(10.0, 20.0, 30.0))))
    t = torch.tensor([5.0, 15.0, 25.0, 500.0])
    with get_router(model).route(t) as experts:
        assert experts.tolist() == [0, 1, 2, 3]
    with get_router(model).route(t, policy=RoutingPolicy()) as experts:
        assert experts.tolist() == [0, 0, 0, 2]
