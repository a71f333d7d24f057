"""The add-ons on Stable Diffusion 2.x as on v1, on test_sd2's tiny SD2-topology models (Linear proj_in / proj_out,
64-channel heads scaled down, OpenCLIP's "!" padding, v-prediction) against diffusers on the same weights: a kohya LoRA
(diffusers' load_lora_weights), outpainting (diffusers' inpainting pipeline on the same canvas and mask), A1111 prompts
over 75 tokens (compel's chunks, then diffusers' pipeline given the embeddings), DeepCache, the OpenVINO backend and
the web UI's model switch."""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image
from safetensors.torch import save_file
from test_lora import kohya, kohya_alphas, layers, random_lora
from test_outpaint import smooth
from test_prompts import words
from test_sd2 import sd2  # noqa: F401 (the module's fixture)

from conftest import LATENT_ATOL, PAGE_VALUES, STEPS, assert_same, diffusers_run, ours_run, pixels
from ldm.checkpoint import save_single_file
from ldm.images import outpaint_canvas
from ldm.pipeline import Pipeline
from ldm.samplers import make_scheduler
from ldm.unet import DeepCache, skip_branches


def reference(ref, ours, sampler="ddim"):
    """A copy of diffusers' pipeline `ref` with our sampler's scheduler."""
    ref = copy.deepcopy(ref)
    ref.scheduler = make_scheduler(sampler, ours.cfg)
    return ref


def test_a_kohya_lora_on_the_linear_projections_and_the_openclip_encoder_matches_diffusers(sd2, tmp_path):  # noqa: F811
    """A kohya file on every Linear and Conv2d of the SD2 UNet (proj_in / proj_out are Linear there) and every Linear
    of the OpenCLIP text encoder: diffusers' load_lora_weights of the same file takes every layer and makes our image.
    (test_openclip checks the encoder's part alone, under both of kohya's spellings.)"""
    ours, ref, _ = sd2["v_prediction", 4]
    pipe, ref = Pipeline(copy.deepcopy(ours.model)).eval(), reference(ref, ours)
    unet, text = (kohya_alphas(random_lora(layers(m), seed)) for seed, m in enumerate((ref.unet, ref.text_encoder)))
    assert isinstance(ref.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert "down_blocks.0.attentions.0.proj_in" in unet
    save_file(kohya(unet, "lora_unet_") | kohya(text, "lora_te_text_model_"), tmp_path / "sd2.safetensors")
    before = ours_run(pipe, seed=5, n=1, sampler="ddim")[1][-1]
    pipe.load_lora(tmp_path / "sd2.safetensors", 0.7)
    ref.load_lora_weights(str(tmp_path / "sd2.safetensors"), adapter_name="sd2")
    for module, lora in ((ref.unet, unet), (ref.text_encoder, text)):
        assert sum(hasattr(m, "lora_A") for m in module.modules()) == len(lora)  # diffusers took every layer
    ref.set_adapters(["sd2"], adapter_weights=[0.7])
    images, trajectory = ours_run(pipe, seed=5, n=1, sampler="ddim")
    theirs, latents = diffusers_run(ref, seed=5, n=1)
    assert_same(images, theirs, trajectory[-1], latents)
    assert (trajectory[-1] - before).abs().max() > 100 * LATENT_ATOL


@pytest.mark.parametrize("channels, sampler", [(4, "ddim"), (9, "euler_a")])
def test_outpainting_is_diffusers_inpainting_of_the_canvas(sd2, channels, sampler):  # noqa: F811
    """Outpainting = diffusers' inpainting pipeline on the same canvas and mask (ldm.images.outpaint_canvas, a hard
    mask: diffusers binarizes masks), with the SD 2 inpainting UNet and by latent blending with the plain one; the
    original's pixels come back exactly."""
    ours, ref, _ = sd2["v_prediction", channels]
    inpaint = reference(StableDiffusionInpaintPipeline(**ref.components), ours, sampler)
    image, padding = smooth(16, 12, seed=channels), (8, 0, 8, 4)
    canvas, mask, _ = outpaint_canvas(image, padding, ours.vae_factor, mask_blur=0)
    images, trajectory = ours_run(
        ours, seed=6, n=1, mode="outpaint", init_image=image, padding=padding, mask_blur=0, sampler=sampler
    )
    theirs, latents = diffusers_run(inpaint, seed=6, n=1, image=canvas, mask_image=mask, height=16, width=32)
    assert images[0].size == (32, 16) and np.array_equal(np.asarray(images[0])[0:12, 8:24], np.asarray(image))
    assert_same(images, theirs, trajectory[-1], latents, region=np.asarray(mask) > 0)
    assert pixels(images)[:, np.asarray(mask) > 0].std() > 8  # not flat


def test_a_long_a1111_prompt_is_compel_s_chunks_through_diffusers(sd2):  # noqa: F811
    """Prompts of 100 and 160 tokens (no syntax, no comma: compel cuts where A1111 does) under A1111's syntax on the
    OpenCLIP encoder: compel's 77-token chunks padded with "!" (compel 2.5.1, truncate_long_prompts=False, on
    diffusers' tokenizer and encoder), and diffusers' pipeline given those embeddings makes our image. (Emphasis, BREAK
    and comma backtracking are the same code for every encoder: test_prompts.)"""
    compel = pytest.importorskip("compel")
    ours, ref, _ = sd2["v_prediction", 4]
    ref = reference(ref, ours)
    encode = compel.Compel(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, truncate_long_prompts=False)
    prompt, negative = words(100), words(160, 5)
    with torch.no_grad():
        positive, negative_embeds = encode.pad_conditioning_tensors_to_same_length([encode(prompt), encode(negative)])
    assert positive.shape == (1, 231, ours.text_encoder.hidden_size)
    context = ours.conditioner.encode_prompts([prompt], negative, True)
    torch.testing.assert_close(context, torch.cat([negative_embeds, positive]), rtol=1e-5, atol=1e-5)
    trajectory = []
    images = ours.txt2img(
        prompt,
        negative_prompt=negative,
        prompt_syntax="a1111",
        steps=STEPS,
        seed=8,
        progress=False,
        trajectory=trajectory,
    )
    final = {}

    def keep(pipe, i, t, tensors):
        final.update(tensors)
        return tensors

    theirs = ref(
        prompt_embeds=positive,
        negative_prompt_embeds=negative_embeds,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(8),
        callback_on_step_end=keep,
    ).images
    assert_same(images, theirs, trajectory[-1], final["latents"])


def test_deepcache_on_the_sd2_unet(sd2):  # noqa: F811
    """For every skip branch of the SD2 UNet, a shallow call on the input of the full call before it is that full call
    bit for bit, which is diffusers' UNet; in the pipeline deepcache=1 is diffusers' image, and deepcache=3 runs the
    middle block at calls 1, 4... only (as tests/test_models and test_pipeline show on v1)."""
    ours, ref, _ = sd2["v_prediction", 4]
    unet = ours.unet
    x, t, c = torch.randn(2, 4, 10, 6), torch.tensor([3, 700]), torch.randn(2, 77, ours.cfg.unet.context_dim)
    middle = []
    hook = unet.middle_block.register_forward_hook(lambda *_: middle.append(1))
    with torch.inference_mode():
        full = unet(x, t, c)
        assert (full - ref.unet(x, t, c).sample).abs().max() <= 1e-4
        for branch in range(skip_branches(ours.cfg.unet)):
            cache = DeepCache(2, branch)
            assert torch.equal(unet(x, t, c, cache=cache), full)
            middle.clear()
            assert torch.equal(unet(x, t, c, cache=cache), full) and not middle
    middle.clear()
    images, trajectory = ours_run(ours, seed=4, n=2, deepcache=1, sampler="ddim")
    theirs, latents = diffusers_run(reference(ref, ours), seed=4, n=2)
    assert_same(images, theirs, trajectory[-1], latents)
    assert len(middle) == STEPS  # classifier-free guidance: one UNet call of batch 2 per step
    middle.clear()
    cached = ours_run(ours, seed=4, n=2, deepcache=3, sampler="ddim")[1]
    hook.remove()
    assert len(middle) == (STEPS + 2) // 3 and not torch.equal(cached[-1], trajectory[-1])


def test_the_openvino_backend_runs_the_sd2_unet_as_diffusers(sd2, tmp_path, monkeypatch):  # noqa: F811
    """backend="openvino" in fp32 on the SD2 model (Linear projections, upcast attention, v-prediction): diffusers'
    final latents within 1e-4 and its image, as test_pipeline's v1 check against torch."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino: pip install 'ldm[openvino]'")
    import ldm.openvino

    monkeypatch.setattr(ldm.openvino, "CACHE", tmp_path)
    ours, ref, _ = sd2["v_prediction", 4]
    ov = Pipeline(copy.deepcopy(ours.model), backend="openvino", backend_precision="fp32")
    images, trajectory = ours_run(ov, seed=1, n=2, sampler="euler_a")
    theirs, latents = diffusers_run(reference(ref, ours, "euler_a"), seed=1, n=2)
    assert len(list(tmp_path.glob("*.xml"))) == 2  # the UNet and the VAE decoder ran converted
    assert_same(images, theirs, trajectory[-1], latents)


def test_the_web_ui_switches_to_an_sd2_file_and_back(sd2, tmp_path):  # noqa: F811
    """The Models tab's choices list an SD2 single file in --models-dir; loaded, the page's txt2img makes diffusers'
    image of the same settings (v-prediction, "!" padding), its PNG naming the file; then the embedded v1 model."""
    from ldm import webui, webui_app  # gradio: imported by the test that needs it

    ours, ref, _ = sd2["v_prediction", 4]
    models = tmp_path / "models"
    models.mkdir()
    save_single_file(ours.model, models / "tiny-sd2.safetensors")
    args = webui.parse_args(["--device", "cpu", "--models-dir", str(models), "--outdir", str(tmp_path / "web")])
    session = webui_app.Session(args)
    v1_context = session.pipe.cfg.unet.context_dim
    assert session.models() == [webui_app.EMBEDDED, str(models / "tiny-sd2.safetensors")]
    session.load(models / "tiny-sd2.safetensors")
    assert session.pipe.cfg.unet.use_linear_in_transformer and session.pipe.cfg.parameterization == "v"
    *_, (_, gallery, info) = webui_app.generate(session, PAGE_VALUES, lambda *a, **k: None)
    theirs = reference(ref, ours)(
        PAGE_VALUES["prompt"],
        num_inference_steps=PAGE_VALUES["steps"],
        guidance_scale=PAGE_VALUES["scale"],
        generator=torch.Generator().manual_seed(PAGE_VALUES["seed"]),
    ).images
    page = pixels([Image.open(gallery[0]).convert("RGB")])
    assert np.abs(page - pixels(theirs)).mean() <= 1 and page.std() > 8
    assert "Model: tiny-sd2" in info
    session.load(None)
    assert session.pipe.cfg.unet.context_dim == v1_context != ours.cfg.unet.context_dim
