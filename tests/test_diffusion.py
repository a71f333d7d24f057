"""The training objective against diffusers' schedulers and training_utils, and torch.distributions."""

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm.config import ConfigError, ModelConfig
from ldm.diffusion import Diffusion, gaussian_nll, noise_scheduler, normal_kl

SCHEDULES = [("scaled_linear", False), ("linear", False), ("squaredcos_cap_v2", False), ("scaled_linear", True)]


def config(schedule="scaled_linear", zero_snr=False, parameterization="eps", learn_sigma=False):
    cfg = ModelConfig(
        beta_schedule=schedule,
        rescale_betas_zero_snr=zero_snr,
        parameterization=parameterization,
        learn_sigma=learn_sigma,
    )
    cfg.unet.out_channels = 8 if learn_sigma else 4
    return cfg


def reference(cfg):
    return DDPMScheduler(
        num_train_timesteps=cfg.timesteps,
        beta_start=cfg.linear_start,
        beta_end=cfg.linear_end,
        beta_schedule=cfg.beta_schedule,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
    )


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.cat([torch.tensor([0, 1, 999]), torch.randint(0, 1000, (n - 3,), generator=g)])
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g), t


@pytest.mark.parametrize("schedule, zero_snr", SCHEDULES)
def test_q_sample_velocity_and_snr_match_diffusers(schedule, zero_snr):
    cfg = config(schedule, zero_snr, "v")
    ours, ref = Diffusion(cfg), reference(cfg)
    x0, noise, t = batch()
    # diffusers forms 1 - abar_t in float32 (ours: float64): near t = 0 that cancellation costs it ~1e-4 relative
    torch.testing.assert_close(ours.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.velocity(x0, t, noise), ref.get_velocity(x0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.snr(t), compute_snr(ref, t), rtol=1e-3, atol=0)
    if zero_snr:
        assert ours.snr(torch.tensor([999])).item() == 0 and torch.equal(ours.q_sample(x0, t, noise)[2], noise[2])


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_min_snr_weights_agree_across_prediction_types(parameterization, gamma):
    """The weighted loss of a prediction must equal min(SNR, gamma) * ||x0 - x0^||^2, whichever target it predicts
    (gamma 0: the unweighted loss of each target). x0^ comes from diffusers' DDIM step, an independent conversion."""
    cfg = config("scaled_linear", False, parameterization)
    ours = Diffusion(cfg)
    x0, noise, t = batch(seed=1)
    t = t.clamp(min=1)
    x_t = ours.q_sample(x0, t, noise)
    out = ours.target(x0, t, noise) + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    ddim = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type={"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[parameterization],
        clip_sample=False,
    )
    ddim.set_timesteps(1000)
    x0_hat = torch.stack(
        [ddim.step(out[i : i + 1], int(t[i]), x_t[i : i + 1]).pred_original_sample[0] for i in range(len(t))]
    )
    snr = compute_snr(reference(cfg), t)
    x0_error = ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    per_target = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[
        parameterization
    ]  # ||target error||^2 / ||x0 error||^2
    expected = x0_error * (torch.clamp(snr, max=gamma) if gamma else per_target)
    torch.testing.assert_close(ours.loss(out, x0, x_t, noise, t, min_snr_gamma=gamma), expected, rtol=2e-3, atol=1e-5)


def test_min_snr_eps_weight_at_zero_terminal_snr_is_finite():
    ours = Diffusion(config("scaled_linear", True, "x0"))
    ours.parameterization = "eps"  # the weight formula alone: 1 where SNR = 0
    assert ours.loss_weight(torch.tensor([999, 0]), 5.0).tolist()[0] == 1.0


def test_learned_variance_and_mean_match_diffusers_ddpm_step():
    cfg = config("scaled_linear", False, "eps", learn_sigma=True)
    ours, ref = Diffusion(cfg), noise_scheduler(cfg)
    assert ref.config.variance_type == "learned_range"
    x0, noise, t = batch(8, seed=3)
    x_t = ours.q_sample(x0, t, noise)
    out = torch.randn(8, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    eps, var_values = out.chunk(2, dim=1)
    var_values = var_values.tanh()
    mean, log_variance = ours.p_mean_log_variance(eps, var_values, x_t, t)
    for i in range(8):
        ti = int(t[i])
        if ti > 0:  # at t = 0 diffusers adds no noise; improved DDPM clips beta~_0 to beta~_1
            torch.testing.assert_close(log_variance[i], ref._get_variance(ti, var_values[i]), rtol=1e-5, atol=1e-5)
        g = torch.Generator().manual_seed(i)
        step = ref.step(
            torch.cat([eps[i : i + 1], var_values[i : i + 1]], dim=1), ti, x_t[i : i + 1], generator=g
        ).prev_sample[0]
        z = torch.randn(step.shape, generator=torch.Generator().manual_seed(i)) if ti > 0 else 0
        torch.testing.assert_close(
            step, mean[i] + (torch.exp(0.5 * log_variance[i]) * z if ti > 0 else 0), rtol=1e-4, atol=1e-4
        )


def test_kl_and_gaussian_nll_match_torch_distributions():
    g = torch.Generator().manual_seed(5)
    m1, m2, lv1, lv2, x = (torch.randn(100, generator=g) for _ in range(5))
    N = torch.distributions.Normal
    torch.testing.assert_close(
        normal_kl(m1, lv1, m2, lv2),
        torch.distributions.kl_divergence(N(m1, (0.5 * lv1).exp()), N(m2, (0.5 * lv2).exp())),
    )
    torch.testing.assert_close(gaussian_nll(x, m1, lv1), -N(m1, (0.5 * lv1).exp()).log_prob(x))


def test_vlb_is_zero_at_the_true_posterior_and_trains_only_the_variance():
    cfg = config("linear", False, "x0", learn_sigma=True)
    ours = Diffusion(cfg)
    x0, noise, t = batch(16, seed=6)
    t = t.clamp(min=1)
    x_t = ours.q_sample(x0, t, noise)
    var_values = -torch.ones_like(x0)  # v = 0: sigma^2 = beta~_t, the true posterior variance
    torch.testing.assert_close(ours.vlb(x0, var_values, x0, x_t, t), torch.zeros(16), atol=1e-6, rtol=0)
    out = torch.cat([x0 + 0.1, torch.zeros_like(x0)], dim=1).requires_grad_(True)
    ours.loss(out, x0, x_t, noise, t, vlb_weight=1.0).sum().backward()
    mse_only = torch.autograd.grad(ours.loss(out, x0, x_t, noise, t, vlb_weight=0.0).sum(), out)[0]
    assert torch.equal(out.grad[:, :4], mse_only[:, :4])  # the mean gets no VLB gradient
    assert out.grad[:, 4:].abs().min() > 0  # the variance does


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule must be one of"),
        ({"parameterization": "epsilon"}, "parameterization must be eps, v or x0"),
        ({"rescale_betas_zero_snr": True}, "needs parameterization v or x0"),
        ({"learn_sigma": True}, r"unet.out_channels must be 8 \(learn_sigma=True"),
    ],
)
def test_bad_objective_configs_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        Diffusion(dataclasses.replace(ModelConfig(), **changes))
