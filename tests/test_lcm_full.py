"""LCM distilled into the whole UNet (train_unet.py --lcm-full): the UNet's guidance embedding against diffusers'
UNet2DConditionModel(time_cond_proj_dim), sampling against diffusers' LatentConsistencyModelPipeline, and a tiny run:
its file in diffusers, its EMA target network, its resume."""

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from conftest import STEPS, assert_same, diffusers_run, ours_run, tiny_model
from ldm.checkpoint import load_diffusers_folder, save_diffusers_folder
from ldm.pipeline import Pipeline
from ldm.unet import guidance_scale_embedding

DIM = 16  # the tiny models' w-embedding width (SD's LCMs: 256)


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """A tiny random model with the w-embedding (its time_cond_proj random and scaled up, not zero), its diffusers folder, and
    diffusers' LatentConsistencyModelPipeline of that folder."""
    model = tiny_model(overrides=(f"unet.time_cond_proj_dim={DIM}",))
    with torch.no_grad():
        model.unet.time_cond_proj.weight.mul_(10)  # as tiny_model's cross-attention: so that w visibly matters
    assert model.unet.time_cond_proj.weight.abs().min() > 0
    folder = tmp_path_factory.mktemp("lcm")
    save_diffusers_folder(model, folder)
    parts = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).components
    ref = LatentConsistencyModelPipeline(**parts | {"scheduler": LCMScheduler.from_config(parts["scheduler"].config)})
    ref.set_progress_bar_config(disable=True)
    return model, folder, ref


@pytest.mark.parametrize("dim", [DIM, 15])
def test_the_guidance_embedding_is_diffusers(dim):
    w = torch.tensor([0.0, 0.5, 4.0, 14.0])
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(guidance_scale_embedding(w, dim), theirs, rtol=0, atol=1e-6)


def test_a_unet_with_the_w_embedding_is_diffusers_through_our_export_and_import(lcm):
    """Our UNet given w = diffusers' UNet2DConditionModel(time_cond_proj_dim) given the same w's embedding as
    timestep_cond, on the weights of our exported folder; reading the folder back gives our weights."""
    model, folder, _ = lcm
    theirs = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    assert theirs.config.time_cond_proj_dim == DIM
    torch.testing.assert_close(theirs.time_embedding.cond_proj.weight, model.unet.time_cond_proj.weight, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    t, w = torch.tensor([999, 259]), torch.tensor([0.0, 7.0])
    with torch.no_grad():
        ours = model.unet(x, t, context, guidance=w)
        ref = theirs(x, t, context, timestep_cond=guidance_scale_embedding(w, DIM)).sample
        assert (ours - model.unet(x, t, context)).abs().max() > 1e-3  # w moves the prediction
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    back = load_diffusers_folder(folder)
    assert back.cfg.unet.time_cond_proj_dim == DIM
    for name, value in model.unet.state_dict().items():
        assert torch.equal(back.unet.state_dict()[name], value), name


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_lcm_sampling_of_such_a_model_is_diffusers_latent_consistency_pipeline(lcm, scale):
    """--sampler lcm = diffusers' LatentConsistencyModelPipeline (w = scale - 1 embedded, no CFG) on the same weights,
    two images; the UNet runs on the images alone at any scale (no unconditional batch)."""
    model, _, ref = lcm
    theirs, latents = diffusers_run(ref, seed=5, n=2, guidance_scale=scale)
    batches = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        ours, trajectory = ours_run(Pipeline(model), seed=5, n=2, sampler="lcm", scale=scale)
    finally:
        hook.remove()
    assert_same(ours, theirs, trajectory[-1], latents)
    assert batches == [2] * STEPS
    other = ours_run(Pipeline(model), seed=5, n=1, sampler="lcm", scale=9.0 - scale)[1][-1]
    assert (other - trajectory[-1][:1]).abs().max() > 1e-3  # the scale reaches the UNet
