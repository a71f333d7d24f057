"""The OpenVINO backend (ldm.openvino) with LCM and TAESD, against diffusers' pipelines run here on the same random
weights, within the tolerances of the other OpenVINO tests (test_pipeline.py, test_sd2_addons.py): final latents
within 1e-4, images within 1/255 on average."""

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from test_taesd import FACTOR8, madebyollin_files, tiny_ae  # noqa: F401

from conftest import LATENT_ATOL, assert_same, diffusers_run, ours_run, tiny_model
from ldm.checkpoint import save_diffusers_folder
from ldm.pipeline import Pipeline
from ldm.taesd import load_taesd

pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino: pip install 'ldm[openvino]'")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD with an 8x VAE (TAESD's latent space), and diffusers' pipeline of it with LCMScheduler from its
    own scheduler config."""
    model, folder = tiny_model(overrides=FACTOR8), tmp_path_factory.mktemp("sd8")
    save_diffusers_folder(model, folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return model, ref


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One OpenVINO cache for the module's tests: the UNet, the same weights in each, is converted once."""
    import ldm.openvino

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm.openvino, "CACHE", tmp_path_factory.mktemp("cache"))
        yield ldm.openvino.CACHE


def torch_calls(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(lambda m, args: calls.append(1))


def test_lcm_at_guidance_1_on_openvino_is_diffusers_lcm_scheduler_image(sd, cache):
    """--backend openvino --sampler lcm --scale 1: diffusers' LCMScheduler pipeline's image and final latents, from
    the converted UNet and VAE decoder (the torch UNet is not called)."""
    model, ref = sd
    pipe, calls = Pipeline(model, backend="openvino"), []
    pipe.openvino.prepare(model, pipe.version)  # converts (tracing calls the torch modules)
    hook = torch_calls(model.unet, calls)
    try:
        ours, trajectory = ours_run(pipe, seed=5, n=2, sampler="lcm", scale=1.0, steps=4)
    finally:
        hook.remove()
    theirs, latents = diffusers_run(ref, seed=5, n=2, guidance_scale=1.0, num_inference_steps=4)
    assert_same(ours, theirs, trajectory[-1], latents)
    assert not calls and {p.name.split("-")[0] for p in cache.glob("*.xml")} >= {"decoder", "unet"}


def test_taesd_on_openvino_is_autoencoder_tiny(sd, tiny_ae, cache, tmp_path, capsys):  # noqa: F811
    """--backend openvino --taesd: the TAESD decoder is converted in place of the VAE decoder (which is not), runs
    converted (its torch module is not called) and
    decodes as diffusers' AutoencoderTiny (within 1e-4); LCM at guidance 1 with it = diffusers' LCMScheduler
    pipeline with vae=AutoencoderTiny (what FastSD CPU runs)."""
    model, ref = sd
    taesd = load_taesd(madebyollin_files(tiny_ae, tmp_path, ".safetensors"))
    pipe, calls = Pipeline(model, backend="openvino", taesd=taesd), []
    pipe.openvino.prepare(model, pipe.version, taesd)
    hook = torch_calls(taesd.decoder, calls)
    try:
        ours, trajectory = ours_run(pipe, seed=5, n=2, sampler="lcm", scale=1.0, steps=4)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
        decoded = pipe.decode(z)
    finally:
        hook.remove()
    converted = capsys.readouterr().err
    assert not calls and "converting the taesd" in converted and "converting the decoder" not in converted
    with torch.no_grad():
        theirs = (tiny_ae.decode(z).sample / 2 + 0.5).clamp(0, 1)  # diffusers' postprocess of its [-1, 1] output
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.8 and (decoded - theirs).abs().max() <= LATENT_ATOL
    tiny_ref = StableDiffusionPipeline(**ref.components | {"vae": tiny_ae})
    theirs, latents = diffusers_run(tiny_ref, seed=5, n=2, guidance_scale=1.0, num_inference_steps=4)
    assert_same(ours, theirs, trajectory[-1], latents)
