"""The sampler adapter: diffusers' schedulers with the checkpoint's noise schedule, for eps-, v- and x0-models."""

import dataclasses

import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from conftest import PROMPT, STEPS, assert_same, diffusers_run, ours_run, tiny_model
from ldm.checkpoint import save_diffusers_folder
from ldm.config import ConfigError, ModelConfig
from ldm.diffusion import noise_scheduler
from ldm.model import StableDiffusion
from ldm.pipeline import InputError, Pipeline
from ldm.samplers import SAMPLERS, ZERO_SNR_SAMPLERS, check_sampler, make_scheduler


@pytest.mark.parametrize("name", SAMPLERS)
def test_schedulers_carry_the_sd_v1_schedule(name):
    cfg = dataclasses.replace(ModelConfig(), parameterization="v")
    scheduler = make_scheduler(name, cfg)
    assert isinstance(scheduler, SAMPLERS[name][0])
    c = scheduler.config
    assert (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule) == (1000, 0.00085, 0.012, "scaled_linear")
    assert c.prediction_type == "v_prediction"
    if "steps_offset" in c:
        assert c.steps_offset == 1
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        assert (c.algorithm_type, c.solver_order, c.use_karras_sigmas) == ("dpmsolver++", 2, name.endswith("karras"))


def with_parameterization(model: StableDiffusion, parameterization: str) -> StableDiffusion:
    other = StableDiffusion(dataclasses.replace(model.cfg, parameterization=parameterization))
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.fixture(scope="module")
def eps_model_and_diffusers(tmp_path_factory):
    model = tiny_model()
    folder = tmp_path_factory.mktemp("eps")
    save_diffusers_folder(model, folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return model, ref


@pytest.mark.parametrize(
    "parameterization, sampler",
    [("v", "ddim"), ("v", "plms"), ("v", "euler_a"), ("x0", "ddim"), ("x0", "dpmpp_2m"), ("x0", "unipc")],
)
def test_v_and_x0_models_match_diffusers(eps_model_and_diffusers, parameterization, sampler):
    model, ref = eps_model_and_diffusers
    pipe = Pipeline(with_parameterization(model, parameterization))
    ref.scheduler = make_scheduler(sampler, pipe.cfg)
    assert ref.scheduler.config.prediction_type == {"v": "v_prediction", "x0": "sample"}[parameterization]
    ours, trajectory = ours_run(pipe, seed=4, n=1, sampler=sampler)
    theirs, latents = diffusers_run(ref, seed=4, n=1)
    assert_same(ours, theirs, trajectory[-1], latents)


class EpsFromX0(nn.Module):
    """An x0-predicting UNet read as the eps-predicting one it equals: eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet, self.alphas_cumprod = unet, alphas_cumprod

    def forward(self, x, t, context):
        a = self.alphas_cumprod[t]
        return (x - a.sqrt() * self.unet(x, t, context)) / (1 - a).sqrt()


def test_plms_runs_x0_models_through_eps(eps_model_and_diffusers):
    """diffusers' PNDM takes eps or v only; an x0-model sampled with plms equals the same network read as eps."""
    x0_model = with_parameterization(eps_model_and_diffusers[0], "x0")
    wrapped = with_parameterization(x0_model, "eps")
    wrapped.model.diffusion_model = EpsFromX0(wrapped.unet, make_scheduler("plms", wrapped.cfg).alphas_cumprod)
    ours, trajectory = ours_run(Pipeline(x0_model), seed=4, n=1, sampler="plms")
    reference = []
    expected = Pipeline(wrapped).txt2img(
        PROMPT, steps=STEPS, seed=4, sampler="plms", progress=False, trajectory=reference
    )
    assert_same(ours, expected, trajectory[-1], reference[-1])


def test_learned_variance_is_sampled_by_ddpm():
    """A learn_sigma UNet (8 output channels) sampled with ddpm goes through diffusers' DDPMScheduler with
    variance_type learned_range: guidance on the prediction, the conditional branch's variance (as DiT)."""
    cfg = dataclasses.replace(tiny_model().cfg, learn_sigma=True)
    cfg.unet = dataclasses.replace(cfg.unet, out_channels=8)
    model = StableDiffusion(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.normal_(0, 0.05)  # the variance half must vary, not sit at zero
    ours, trajectory = ours_run(Pipeline(model), seed=2, n=1, sampler="ddpm", scale=3.0)

    def diffusers_ddpm(variance_type: str) -> torch.Tensor:
        scheduler = DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            clip_sample=False,
            variance_type=variance_type,
        )
        scheduler.set_timesteps(STEPS)
        g = torch.Generator().manual_seed(2)
        x = torch.randn((1, 4, 8, 8), generator=g)
        context = torch.cat([model.text_encoder.encode([""]), model.text_encoder.encode([PROMPT])])
        with torch.no_grad():
            for t in scheduler.timesteps:
                (e_uncond, _), (e_cond, variance) = (
                    out.chunk(2, dim=1) for out in model.unet(torch.cat([x, x]), t, context).chunk(2)
                )
                guided = e_uncond + 3.0 * (e_cond - e_uncond)
                output = torch.cat([guided, variance], dim=1) if variance_type == "learned_range" else guided
                x = scheduler.step(output, t, x, generator=g).prev_sample
        return x

    torch.testing.assert_close(trajectory[-1], diffusers_ddpm("learned_range"), atol=1e-5, rtol=1e-5)
    assert (diffusers_ddpm("fixed_small") - trajectory[-1]).abs().max() > 1e-2  # the variance half matters


@pytest.mark.parametrize("name", SAMPLERS)
def test_zero_terminal_snr_models_sample_from_pure_noise(name):
    cfg = dataclasses.replace(tiny_model().cfg, parameterization="v", rescale_betas_zero_snr=True)
    if name not in ZERO_SNR_SAMPLERS:
        message = f"^sampler '{name}' cannot sample this model: its scheduler cannot follow a zero-terminal-SNR"
        with pytest.raises(InputError, match=message):
            Pipeline(StableDiffusion(cfg)).txt2img(PROMPT, steps=2, sampler=name, progress=False)
        return
    scheduler = make_scheduler(name, cfg)
    assert scheduler.alphas_cumprod[-1] <= 2**-24  # diffusers keeps 2**-24 where a sigma would be infinite
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[0] == 999  # "trailing": the first step is the pure-noise one (Lin et al. 2023, sec. 3.3)


def test_training_and_every_sampler_share_one_schedule():
    """diffusion.scheduler_config is the one description of the noise schedule: the training scheduler (DDPM) and each
    sampler that can follow a zero-terminal-SNR schedule carry the same alphas_cumprod; the others are refused, by the
    one check that the pipeline and train_unet.py both call."""
    cfg = dataclasses.replace(ModelConfig(), parameterization="v", rescale_betas_zero_snr=True)
    training = noise_scheduler(cfg)
    assert training.alphas_cumprod[-1] <= 2**-24
    for name in SAMPLERS:
        if name in ZERO_SNR_SAMPLERS:
            check_sampler(name, cfg)
            alphas_cumprod = make_scheduler(name, cfg).alphas_cumprod  # the sigma-based ones end at 2**-24, not 0
            assert torch.equal(alphas_cumprod[:-1], training.alphas_cumprod[:-1]) and alphas_cumprod[-1] <= 2**-24, name
        else:
            with pytest.raises(ConfigError, match=f"^validation.sampler '{name}' cannot sample this model"):
                check_sampler(name, cfg, ConfigError, "validation.sampler")
    with pytest.raises(ValueError, match=r"^unknown sampler 'lms' \(known: ddim, plms, "):
        check_sampler("lms", cfg)
