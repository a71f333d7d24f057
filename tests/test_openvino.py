"""The OpenVINO backend (ldm.openvino) with LCM and TAESD, against diffusers' pipelines run here on the same random
weights, within the tolerances of the other OpenVINO tests (test_pipeline.py, test_sd2_addons.py): final latents
within 1e-4, images within 1/255 on average."""

import copy
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
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


def mapped_from(module: torch.nn.Module, path) -> bool:
    """Whether every tensor of the module lies in a mapping of the file `path` (/proc/self/maps)."""
    spans = [
        [int(a, 16) for a in line.split()[0].split("-")]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(str(path))
    ]
    return all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in module.state_dict().values())


def test_the_torch_weights_are_spilled_once_converted_and_a_lora_still_merges(sd, cache, tmp_path):
    """Once converted, the torch UNet's and VAE decoder's tensors are mapped from their spill files (out of memory
    until read); a LoRA merges into them as into the weights in memory, and unloading gives them back bit for bit."""
    model, _ = sd
    plain = copy.deepcopy(model)
    pipe = Pipeline(model, backend="openvino")
    pipe.openvino.prepare(model, pipe.version)
    unet_key, decoder_key = pipe.openvino.parts["unet"][0], pipe.openvino.parts["decoder"][0]
    assert mapped_from(model.unet, cache / f"unet-{unet_key}.pt")
    assert mapped_from(model.vae.decoder, cache / f"decoder-{decoder_key}.pt")
    assert not mapped_from(model.vae.encoder, cache / f"decoder-{decoder_key}.pt")
    w = model.unet.out[2].weight  # a LoRA on the last conv
    lora = {"lora_unet_out_2.lora_down.weight": torch.full((1, *w.shape[1:]), 0.01)}
    save_file(lora | {"lora_unet_out_2.lora_up.weight": torch.ones(w.shape[0], 1, 1, 1)}, tmp_path / "l.safetensors")
    pipe.load_lora(tmp_path / "l.safetensors")
    reference = Pipeline(copy.deepcopy(plain))
    reference.load_lora(tmp_path / "l.safetensors")
    assert torch.equal(model.unet.out[2].weight, reference.unet.out[2].weight)
    assert not torch.equal(model.unet.out[2].weight, plain.unet.out[2].weight)
    pipe.unload_loras()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


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
