"""The sampler adapter: diffusers' schedulers with the checkpoint's noise schedule, for eps-, v- and x0-models; the
schedules (A1111's schedule types) and the samplers beyond SD's own (DPM++ SDE and 2S a, DPM2, LMS, LCM)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from conftest import (
    LATENT_ATOL,
    PROMPT,
    STEPS,
    a1111,
    assert_same,
    cli,
    counted_run,
    diffusers_run,
    generators,
    ours_run,
    tiny_model,
)
from ldm import cli as cli_names
from ldm.checkpoint import save_diffusers_folder, save_single_file
from ldm.config import ConfigError, ModelConfig
from ldm.diffusion import noise_scheduler
from ldm.model import StableDiffusion
from ldm.pipeline import InputError, Pipeline
from ldm.request import Request
from ldm.samplers import (
    SAMPLERS,
    SCHEDULES,
    ZERO_SNR_SAMPLERS,
    check_sampler,
    make_scheduler,
    schedules_of,
)


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
        algorithm = "sde-dpmsolver++" if name.endswith("sde") else "dpmsolver++"
        assert (c.algorithm_type, c.solver_order, c.use_karras_sigmas) == (algorithm, 2, name.endswith("karras"))


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
    with pytest.raises(ValueError, match=r"^unknown sampler 'dpm_fast' \(known: ddim, plms, "):
        check_sampler("dpm_fast", cfg)


# The oracle's own table, from diffusers' scheduler overview ("A1111/k-diffusion -> Diffusers", "Noise schedules and
# schedule types"): each A1111 sampler and schedule type as the diffusers class and options a diffusers user sets.
# "DPM++ 2S a" is "very similar to DPMSolverSinglestepScheduler" there; its SDE variant was added for it
# (diffusers#4167, #8269).
DIFFUSERS_SAMPLERS = {
    "DDIM": (DDIMScheduler, {}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ SDE": (DPMSolverSDEScheduler, {}),
    "DPM++ 2S a": (DPMSolverSinglestepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "DPM2": (KDPM2DiscreteScheduler, {}),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "LCM": (LCMScheduler, {}),
}
DIFFUSERS_SCHEDULES = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
# the samplers diffusers' docs pair with A1111's beyond SD's own; SD's own on their default schedule: test_pipeline.py
NEW = ("dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2s_a", "dpm2", "dpm2_a", "lms")
PAIRS = [(s, schedule) for s in SAMPLERS for schedule in schedules_of(s) if schedule != "default" or s in NEW]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny model, diffusers' pipeline of its exported folder, and the scheduler config diffusers loaded from it
    (each test sets the pipeline's scheduler from that config, whatever the test before left there)."""
    model = tiny_model()
    folder = tmp_path_factory.mktemp("sd")
    save_diffusers_folder(model, folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return model, ref, ref.scheduler.config


def diffusers_scheduler(sampler: str, schedule: str, config):
    """What a diffusers user sets for A1111's sampler and schedule type, on a pipeline whose scheduler config is
    `config`."""
    cls, options = DIFFUSERS_SAMPLERS[SAMPLERS[sampler][2]]
    return cls.from_config(config, **options | DIFFUSERS_SCHEDULES[SCHEDULES[schedule]])


@pytest.mark.parametrize("sampler, schedule", PAIRS)
def test_every_sampler_on_every_schedule_it_takes_matches_diffusers(sd, sampler, schedule):
    """Ours = diffusers' pipeline with the scheduler its docs name for A1111's sampler and schedule type, two images
    (each with its own generator; DPM++ SDE: its own Brownian tree, seeded with the image's seed)."""
    model, ref, config = sd
    ref.scheduler = diffusers_scheduler(sampler, schedule, config)
    theirs, latents = diffusers_run(ref, seed=3, n=2)
    ours, trajectory = ours_run(Pipeline(model), seed=3, n=2, sampler=sampler, schedule=schedule)
    assert_same(ours, theirs, trajectory[-1], latents)


def test_the_schedules_are_a1111_s_and_the_command_line_knows_them():
    labels = {"default": "Automatic", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform"}
    assert SCHEDULES == labels and cli_names.SCHEDULE_NAMES == tuple(SCHEDULES)
    assert sorted(SAMPLERS[name][2] for name in SAMPLERS) == sorted(DIFFUSERS_SAMPLERS)


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "dpmpp_2m_karras"])
def test_a_schedule_is_refused_exactly_where_diffusers_would_ignore_it(sampler):
    """A schedule a sampler takes changes its diffusers scheduler's timesteps or sigmas; one it refuses would change
    neither (diffusers drops the option that defines it, or never reads it): the refusal tells the truth."""
    cls, options = DIFFUSERS_SAMPLERS[SAMPLERS[sampler][2]]
    config = make_scheduler("ddim", ModelConfig()).config
    defining = {
        "Karras": "use_karras_sigmas",
        "Exponential": "use_exponential_sigmas",
        "SGM Uniform": "timestep_spacing",
    }

    def steps(schedule_options):
        scheduler = cls.from_config(config, **options | schedule_options)
        scheduler.set_timesteps(10)
        return torch.cat([scheduler.timesteps.float(), getattr(scheduler, "sigmas", torch.zeros(0)).float()])

    default = steps({})
    for schedule, label in list(SCHEDULES.items())[1:]:
        if schedule in schedules_of(sampler):
            assert not torch.equal(steps(DIFFUSERS_SCHEDULES[label]), default), schedule
        else:
            key = defining[label]
            assert torch.equal(steps({key: DIFFUSERS_SCHEDULES[label][key]}), default), schedule


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"sampler": "ddim", "schedule": "karras"}, "schedule karras: the ddim sampler takes default, sgm_uniform$"),
        ({"sampler": "lcm", "schedule": "sgm_uniform"}, "schedule sgm_uniform: the lcm sampler takes default$"),
        (
            {"sampler": "dpmpp_2m_karras", "schedule": "exponential"},
            "schedule exponential: the dpmpp_2m_karras sampler takes default, karras$",
        ),
        ({"sampler": "euler", "schedule": "beta"}, r"unknown schedule 'beta' \(known: default, karras, exponential, "),
        ({"sampler": "lcm", "steps": 51}, "steps 51: the lcm sampler picks its steps among its 50 original_inference"),
        (
            {"sampler": "euler", "schedule": "karras", "hires_scale": 2, "hires_sampler": "ddim"},
            "schedule karras: the ddim sampler takes default, sgm_uniform$",
        ),
        (
            {"sampler": "lcm", "steps": 4, "hires_scale": 2, "hires_steps": 40, "hires_denoise": 0.5},
            "hires steps 40 at hires denoise 0.5: a schedule of 80 steps, more than the lcm sampler's 50 original_infe",
        ),
    ],
)
def test_a_schedule_or_steps_the_sampler_cannot_take_is_one_line(settings, message):
    with pytest.raises(InputError, match=f"^{message}"):
        Request(PROMPT, **settings).resolved(tiny_model().cfg)


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpm2", "dpm2_a"])
def test_samplers_that_take_no_x0_prediction_refuse_an_x0_model(sampler):
    cfg = dataclasses.replace(tiny_model().cfg, parameterization="x0")
    with pytest.raises(
        InputError, match=f"^sampler '{sampler}' cannot sample this model: its scheduler takes eps or v"
    ):
        Request(PROMPT, sampler=sampler).resolved(cfg)


def test_dpmpp_2m_karras_is_dpmpp_2m_on_the_karras_schedule(sd):
    pipe = Pipeline(sd[0])
    alias = ours_run(pipe, seed=1, n=1, sampler="dpmpp_2m_karras")[1][-1]
    assert torch.equal(alias, ours_run(pipe, seed=1, n=1, sampler="dpmpp_2m_karras", schedule="karras")[1][-1])
    assert torch.equal(alias, ours_run(pipe, seed=1, n=1, sampler="dpmpp_2m", schedule="karras")[1][-1])
    assert (alias - ours_run(pipe, seed=1, n=1, sampler="dpmpp_2m")[1][-1]).abs().max() > 100 * LATENT_ATOL


def test_dpmpp_sde_seeds_each_images_brownian_tree_with_its_seed(sd):
    """The parity above holds because diffusers' trees get the images' seeds (conftest.diffusers_run): with other
    tree seeds, the same generators give another image, so the trees' noise is ours, not just the start's."""
    model, ref, config = sd
    ref.scheduler = diffusers_scheduler("dpmpp_sde", "default", config)
    _, latents = diffusers_run(ref, seed=3, n=1)
    ref.scheduler.noise_sampler_seed = [4]
    other = ref(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3), output_type="latent")
    assert (latents - other.images).abs().max() > 100 * LATENT_ATOL
    ours = ours_run(Pipeline(model), seed=3, n=1, sampler="dpmpp_sde")[1][-1]
    assert (ours - latents).abs().max() <= LATENT_ATOL


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_lcm_matches_diffusers_and_guidance_1_runs_the_conditional_batch_alone(sd, scale):
    """--sampler lcm = diffusers' StableDiffusionPipeline with LCMScheduler from the model's scheduler config (its
    original_inference_steps 50, timestep_scaling 10), at guidance 1 (no CFG) and 2 (CFG as diffusers does it). At
    guidance 1 the UNet runs once a step on the images alone (no unconditional half), at 2 on twice as many."""
    model, ref, config = sd
    ref.scheduler = LCMScheduler.from_config(config)
    theirs, latents = diffusers_run(ref, seed=5, n=2, guidance_scale=scale)
    ours, trajectory, batches = counted_run(Pipeline(model), seed=5, n=2, sampler="lcm", scale=scale)
    assert_same(ours, theirs, trajectory[-1], latents)
    assert batches == [2 if scale == 1 else 4] * STEPS


def test_the_hires_pass_runs_on_the_first_pass_s_schedule(sd):
    """A1111's hires pass keeps the schedule type ("Use same scheduler"): the hires fix on Karras = diffusers' txt2img
    on Karras, its latents upscaled 2x (bilinear, A1111's "Latent"), then its img2img on Karras from the same seeds,
    3 of 6 steps (hires steps 3 at denoise 0.5)."""
    model, ref, config = sd
    trajectory = []
    options = dict(hires_scale=2, hires_steps=3, hires_denoise=0.5, progress=False, trajectory=trajectory)
    ours = Pipeline(model).txt2img(PROMPT, seed=3, steps=STEPS, sampler="dpmpp_2m", schedule="karras", **options)
    ref.scheduler = diffusers_scheduler("dpmpp_2m", "karras", config)
    small = ref(PROMPT, num_inference_steps=STEPS, generator=generators(3, 1), output_type="latent").images
    final = {}

    def keep(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    theirs = StableDiffusionImg2ImgPipeline(**ref.components)(
        PROMPT,
        image=F.interpolate(small, scale_factor=2, mode="bilinear"),
        strength=0.5,
        num_inference_steps=6,
        generator=generators(3, 1),
        callback_on_step_end=keep,
    ).images
    assert_same(ours, theirs, trajectory[-1], final["latents"])


def test_the_command_line_takes_a_schedule_and_the_png_says_it_as_a1111_does(tmp_path, capsys):
    model = tiny_model()
    save_single_file(model, tmp_path / "tiny.safetensors")
    args = ["--ckpt", tmp_path / "tiny.safetensors", "--prompt", PROMPT, "--steps", 3, "--seed", 7]
    assert cli(*args, "--sampler", "dpmpp_2m", "--schedule", "karras", "--outdir", tmp_path / "out") == 0
    png = Image.open(tmp_path / "out" / "00000.png")
    assert json.loads(png.text["ldm"])["schedule"] == "karras"
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: " in png.text["parameters"]
    assert a1111(png.text["parameters"])["Schedule type"] == "Karras"
    (again,) = Pipeline(model).txt2img(PROMPT, steps=3, seed=7, sampler="dpmpp_2m", schedule="karras", progress=False)
    assert np.array_equal(np.asarray(png), np.asarray(again))
    capsys.readouterr()
    assert cli(*args, "--sampler", "ddim", "--schedule", "karras", "--outdir", tmp_path / "no") == 2
    assert capsys.readouterr().err.strip() == "error: --schedule karras: the ddim sampler takes default, sgm_uniform"
