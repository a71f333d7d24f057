"""The sampler adapter: diffusers' schedulers with the checkpoint's noise schedule, for eps-, v- and x0-models."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from test_pipeline import PROMPT, STEPS, assert_same, diffusers_run, ours_run, tiny_model

from ldm.checkpoint import save_diffusers_folder
from ldm.config import ModelConfig
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.samplers import SAMPLERS, make_scheduler


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
    expected = Pipeline(wrapped).txt2img(PROMPT, steps=STEPS, seed=4, sampler="plms", progress=False, trajectory=reference)
    assert_same(ours, expected, trajectory[-1], reference[-1])
