"""The training objective: prediction-space errors for eps, v and flow schedules, the loss train_scales takes,
and ComfyUI's model_sampling as a schedule (what the nodes pass in) agreeing with the plain-torch one."""
import pytest
import torch

from tuneqdm_core import NUM_TRAIN_TIMESTEPS
from tuneqdm_core.objective import (ERROR_FUNCTIONS, PredictionSchedule, denoising_loss, error_function,
                                    prediction_error)

ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS), 0)


def schedule(prediction):
    return PredictionSchedule("flow") if prediction == "flow" else PredictionSchedule.from_alphas_cumprod(ALPHAS, prediction)


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_the_error_is_the_output_minus_the_prediction_target(prediction):
    s = schedule(prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise, output = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    sigma = s.sigma(torch.tensor([10.0, 480.5, 990.0]))
    xt = s.noise_scaling(sigma, noise, x0)
    denoised = s.calculate_denoised(sigma, output, xt)
    expected = output - s.target(x0, noise, sigma)
    torch.testing.assert_close(prediction_error(s, sigma, xt, denoised, x0), expected, rtol=1e-4, atol=1e-4)
    # the target is what makes the denoised estimate exact
    torch.testing.assert_close(s.calculate_denoised(sigma, s.target(x0, noise, sigma), xt), x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_network_input_and_target_are_the_variance_preserving_ones_of_alphas_cumprod(prediction):
    s = schedule(prediction)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([40.0, 870.0])
    a = ALPHAS[t.long()].reshape(-1, 1, 1, 1)
    sigma = s.sigma(t)
    xt = s.calculate_input(sigma, s.noise_scaling(sigma, noise, x0))
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-4, atol=1e-5)
    expected = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(s.target(x0, noise, sigma), expected, rtol=1e-4, atol=1e-5)


def test_the_loss_is_the_per_sample_mean_error_of_the_denoiser():
    s = schedule("eps")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    offset = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)

    def denoise(xt, sigma, cond_index):  # off by `offset` in eps space
        return s.calculate_denoised(sigma, noise + offset, xt)

    loss = denoising_loss(s, s.sigma, denoise, lambda x, t: noise, ERROR_FUNCTIONS["MSE"], "cpu")
    torch.testing.assert_close(loss(x0, torch.tensor([100.0, 700.0]), 0), torch.tensor([0.25, 4.0]))


def test_an_unknown_error_function_is_named():
    with pytest.raises(ValueError, match="loss function 'L3': one of MSE, L1, Huber, SmoothL1"):
        error_function("L3")


@pytest.mark.parametrize("model_type, prediction", [("EPS", "eps"), ("V_PREDICTION", "v"), ("FLOW", "flow")])
def test_comfyui_model_sampling_is_a_schedule_that_agrees_with_the_plain_one(model_type, prediction):
    from tuneqdm_fixtures.host import import_pack

    import_pack()
    import comfy.model_base
    import comfy.supported_models

    ms = comfy.model_base.model_sampling(comfy.supported_models.SD15({}), comfy.model_base.ModelType[model_type])
    plain = PredictionSchedule("flow") if prediction == "flow" else PredictionSchedule(prediction, ms.sigmas.float())
    t = torch.tensor([3.0, 250.25, 998.0])
    sigma = ms.sigma(t).float()
    if prediction != "flow":
        torch.testing.assert_close(plain.sigma(t), sigma, rtol=1e-5, atol=0)
    g = torch.Generator().manual_seed(2)
    x0, noise, output = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(3))
    xt = ms.noise_scaling(sigma, noise, x0)
    torch.testing.assert_close(xt, plain.noise_scaling(sigma, noise, x0))
    torch.testing.assert_close(ms.calculate_input(sigma, xt), plain.calculate_input(sigma, xt))
    denoised = ms.calculate_denoised(sigma, output, xt)
    torch.testing.assert_close(denoised, plain.calculate_denoised(sigma, output, xt))
    torch.testing.assert_close(prediction_error(ms, sigma, xt, denoised, x0), output - plain.target(x0, noise, sigma),
                               rtol=1e-4, atol=1e-4)
