"""txt2img / img2img / inpainting against diffusers' own pipelines, run here on the same random weights.

Our tiny model is exported with save_diffusers_folder and loaded by diffusers.StableDiffusionPipeline; both
sides get the same prompt, seeds and scheduler (diffusers' own, built by ldm.samplers.make_scheduler) and
must give the same images (mean |difference| <= 1/255) and the same final latents (max |difference| <= 1e-4).
"""

import contextlib
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

import ldm.pipeline
from conftest import LATENT_ATOL, PROMPT, STEPS, assert_same, diffusers_run, ours_run, pixels, randomize_, tiny_model
from ldm.checkpoint import save_diffusers_folder
from ldm.memory import estimate_memory
from ldm.model import StableDiffusion
from ldm.pipeline import InputError, Pipeline
from ldm.samplers import SAMPLERS, make_scheduler


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our pipelines and diffusers' (txt2img, img2img, inpaint) for a 4-channel and a 9-channel tiny model."""
    out = {}
    for channels in (4, 9):
        model = tiny_model(channels)
        folder = tmp_path_factory.mktemp(f"unet{channels}")
        save_diffusers_folder(model, folder)
        base = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        refs = {
            "txt2img": base,
            "img2img": StableDiffusionImg2ImgPipeline(**base.components),
            "inpaint": StableDiffusionInpaintPipeline(**base.components),
        }
        for ref in refs.values():
            ref.set_progress_bar_config(disable=True)
        out[channels] = (Pipeline(model), refs)
    return out


@pytest.fixture(scope="module")
def init_image():
    g = torch.Generator().manual_seed(7)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    return Image.fromarray((smooth[0].permute(1, 2, 0) * 255).round().byte().numpy())


@pytest.fixture(scope="module")
def mask():
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 2:10] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_matches_diffusers(models, sampler):
    pipe, refs = models[4]
    refs["txt2img"].scheduler = make_scheduler(sampler, pipe.cfg)
    ours, trajectory = ours_run(pipe, seed=3, n=2, sampler=sampler)
    theirs, latents = diffusers_run(refs["txt2img"], seed=3, n=2)
    assert_same(ours, theirs, trajectory[-1], latents)
    assert pixels(ours).std() > 20  # not flat


def test_negative_prompt_and_guidance_rescale_match_diffusers(models):
    pipe, refs = models[4]
    refs["txt2img"].scheduler = make_scheduler("ddim", pipe.cfg)
    ours, trajectory = ours_run(pipe, seed=5, n=1, negative_prompt="blurry, dark", scale=9.0, guidance_rescale=0.7)
    theirs, latents = diffusers_run(
        refs["txt2img"], seed=5, n=1, negative_prompt="blurry, dark", guidance_scale=9.0, guidance_rescale=0.7
    )
    assert_same(ours, theirs, trajectory[-1], latents)


@pytest.mark.parametrize(
    "cfg_end, sampler, options",
    [(0.0, "ddim", {}), (0.5, "euler_a", {"guidance_rescale": 0.7}), (0.7, "dpmpp_2m", {"negative_prompt": "blurry"})],
)
def test_cfg_end_matches_diffusers_dynamic_guidance_callback(models, cfg_end, sampler, options):
    """CFG truncation: guidance on steps 0 .. int(N * cfg_end), none after. diffusers' documented "dynamic
    classifier-free guidance" callback is the reference: at the end of step int(N * cfg_end) it keeps the conditional
    half of prompt_embeds and sets the guidance scale to 0 (its guidance rescale then stops too, as ours). Same images
    and latents; the truncation moves the latents beyond 10x the tolerance."""
    pipe, refs = models[4]
    ref = refs["txt2img"]
    ref.scheduler = make_scheduler(sampler, pipe.cfg)
    final = {}

    def dynamic_cfg(p, i, t, tensors):
        final["latents"] = tensors["latents"]
        if i == int(p.num_timesteps * cfg_end):
            p._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        return tensors

    theirs = ref(
        PROMPT,
        num_inference_steps=STEPS,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (6, 7)],
        guidance_scale=7.0,
        callback_on_step_end=dynamic_cfg,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        **options,
    ).images
    ours, trajectory = ours_run(pipe, seed=6, n=2, sampler=sampler, scale=7.0, cfg_end=cfg_end, **options)
    assert_same(ours, theirs, trajectory[-1], final["latents"])
    guided = ours_run(pipe, seed=6, n=2, sampler=sampler, scale=7.0, **options)[1][-1]
    assert (trajectory[-1] - guided).abs().max() > 10 * LATENT_ATOL  # 10x the parity tolerance


def test_the_prompt_matters(models):
    """The parity tests mean something: the prompt, negative prompt and scale move the latents far beyond their
    tolerance."""
    pipe, _ = models[4]
    base = ours_run(pipe, seed=3, n=1)[1][-1]
    for change in [{"negative_prompt": "blurry"}, {"scale": 1.0}, {"scale": -6.5}]:
        assert (ours_run(pipe, seed=3, n=1, **change)[1][-1] - base).abs().max() > 100 * LATENT_ATOL, change
    trajectory = []
    pipe.txt2img("a blue car", steps=STEPS, seed=3, progress=False, trajectory=trajectory)
    assert (trajectory[-1] - base).abs().max() > 100 * LATENT_ATOL


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_matches_diffusers(models, init_image, sampler):
    pipe, refs = models[4]
    refs["img2img"].scheduler = make_scheduler(sampler, pipe.cfg)
    ours, trajectory = ours_run(
        pipe, seed=11, n=2, mode="img2img", init_image=init_image, strength=0.6, sampler=sampler
    )
    theirs, latents = diffusers_run(refs["img2img"], seed=11, n=2, image=init_image, strength=0.6)
    assert_same(ours, theirs, trajectory[-1], latents)


@pytest.mark.parametrize(
    "sampler, strength", [(s, 1.0) for s in SAMPLERS] + [("ddim", 0.7), ("euler_a", 0.7), ("dpmpp_2m_karras", 0.7)]
)
def test_inpainting_model_matches_diffusers(models, init_image, mask, sampler, strength):
    """9-channel UNet. One image per call: diffusers draws the masked-image latent of every image of a batch from
    the first generator, where we draw image i's from its own (so image k of a batch can be made alone).
    (strength < 1 runs through the same add_noise / begin-index code as img2img, tested there for every sampler.)"""
    pipe, refs = models[9]
    refs["inpaint"].scheduler = make_scheduler(sampler, pipe.cfg)
    ours, trajectory = ours_run(
        pipe, seed=2, n=1, mode="inpaint", init_image=init_image, mask=mask, strength=strength, sampler=sampler
    )
    theirs, latents = diffusers_run(
        refs["inpaint"], seed=2, n=1, image=init_image, mask_image=mask, strength=strength, height=16, width=16
    )
    repainted = np.asarray(mask) > 0  # diffusers does not paste the unmasked pixels back; we do
    assert_same(ours, theirs, trajectory[-1], latents, region=repainted)
    assert np.array_equal(pixels(ours)[0][~repainted], np.asarray(init_image, dtype=np.float64)[~repainted])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras"])
def test_latent_blending_inpainting_matches_diffusers(models, init_image, mask, sampler):
    """4-channel UNet: latent blending as diffusers does it (deterministic samplers: diffusers also draws a
    masked-image latent the 4-channel UNet never uses, which shifts its generators for stochastic samplers)."""
    pipe, refs = models[4]
    refs["inpaint"].scheduler = make_scheduler(sampler, pipe.cfg)
    ours, trajectory = ours_run(
        pipe, seed=2, n=1, mode="inpaint", init_image=init_image, mask=mask, strength=0.8, sampler=sampler
    )
    theirs, latents = diffusers_run(
        refs["inpaint"], seed=2, n=1, image=init_image, mask_image=mask, strength=0.8, height=16, width=16
    )
    assert_same(ours, theirs, trajectory[-1], latents, region=np.asarray(mask) > 0)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint4", "inpaint9"])
def test_image_k_of_a_batch_is_the_same_seed_alone(models, init_image, mask, mode, sampler):
    """Every sampler, every mode, end to end. Image 2 of a batch of 4 (seed 20) is image 0 of a run with seed 22:
    the same noise bit for bit, the same image up to float rounding (batched matmuls sum in another order)."""
    pipe = models[9 if mode == "inpaint9" else 4][0]
    kwargs = {"txt2img": {}, "img2img": {"init_image": init_image}}.get(mode, {"init_image": init_image, "mask": mask})
    kwargs |= {"sampler": sampler, "eta": 0.5 if sampler == "ddim" else 0.0}
    call = "inpaint" if mode.startswith("inpaint") else mode
    batch, batch_trajectory = ours_run(pipe, seed=20, n=4, mode=call, steps=3, **kwargs)
    alone, alone_trajectory = ours_run(pipe, seed=22, n=1, mode=call, steps=3, **kwargs)
    assert torch.equal(batch_trajectory[0][2], alone_trajectory[0][0])
    assert (
        batch_trajectory[-1][2] - alone_trajectory[-1][0]
    ).abs().max() <= 1e-3  # ~1e-7 per UNet call, amplified by the steps
    difference = np.abs(pixels(batch)[2] - pixels(alone)[0])
    assert difference.max() <= 1 and difference.mean() <= 0.01
    assert np.abs(pixels(batch)[1] - pixels(batch)[2]).mean() > 1  # other seeds, other images
    if mode.startswith("inpaint"):  # unmasked pixels are the init image's, exactly
        keep = np.asarray(mask) == 0
        assert all(np.array_equal(p[keep], np.asarray(init_image, dtype=np.float64)[keep]) for p in pixels(batch))


@pytest.mark.parametrize("channels", [4, 9])
def test_soft_mask_blends(models, init_image, channels):
    """A feathered mask (0 at the left edge to 255 at the right) is honoured, not binarised: pixels move away
    from the init image in proportion to the mask, and the result differs from the thresholded mask's."""
    pipe = models[channels][0]
    ramp = np.tile(np.linspace(0, 255, 16).round().astype(np.uint8), (16, 1))
    soft = pipe.inpaint(PROMPT, init_image, Image.fromarray(ramp), steps=STEPS, seed=1, progress=False)[0]
    hard = pipe.inpaint(
        PROMPT,
        init_image,
        Image.fromarray(np.where(ramp >= 128, 255, 0).astype(np.uint8)),
        steps=STEPS,
        seed=1,
        progress=False,
    )[0]
    moved = np.abs(pixels([soft])[0] - np.asarray(init_image, dtype=np.float64)).mean(axis=(0, 2))  # per column
    assert moved[0] == 0 and moved[-1] > 10
    assert 0.1 * moved[-1] < moved[5:11].mean() < 0.9 * moved[-1]
    assert np.abs(pixels([soft]) - pixels([hard])).mean() > 1


def test_img2img_size_is_rounded_down_with_a_warning(models):
    pipe = models[4][0]
    odd = Image.new("RGB", (18, 21), (200, 30, 60))  # the tiny VAE has f=2: sides become multiples of 2
    with pytest.warns(UserWarning, match="resized from 18x21 to 18x20"):
        (image,) = pipe.img2img(PROMPT, odd, steps=2, progress=False)
    assert image.size == (18, 20)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "img2img", "strength": 0.0}, r"strength must be in \(0, 1\]"),
        ({"mode": "img2img", "strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"mode": "img2img", "strength": 0.3, "steps": 3}, "leaves no denoising step"),
        ({"mode": "inpaint", "mask": Image.new("L", (8, 16))}, "the mask is 8x16 but the image is 16x16"),
        ({"sampler": "dpm_fast"}, "unknown sampler 'dpm_fast'"),
        ({"height": 21}, "multiples of 2"),
        ({"sampler": "euler", "eta": 0.5}, "eta applies to the ddim sampler only"),
        ({"n_samples": 0}, "nothing to generate"),
        ({"channels": 9}, "inpainting model"),
    ],
)
def test_bad_input_is_a_clear_error(models, init_image, kwargs, message):
    pipe = models[kwargs.pop("channels", 4)][0]
    mode = kwargs.pop("mode", "txt2img")
    if mode != "txt2img":
        kwargs["init_image"] = init_image
    with pytest.raises(InputError, match=message):
        getattr(pipe, mode)(PROMPT, progress=False, **{"steps": STEPS} | kwargs)


def test_vae_slicing_and_tiling(tiny_cfg):
    """Slicing: one image at a time, equal to the batched decode up to float rounding. Tiling kicks in only for
    latents larger than vae_tile; tiles overlap by vae_tile_overlap and are blended: GroupNorm statistics and the
    mid-block attention become per tile, so the result is close to the plain decode (measured: mean |diff| 0.0013,
    max 0.008 of the [0, 1] range; asserted: mean < 0.005, max < 0.03), not equal to it."""
    pipe = Pipeline(randomize_(StableDiffusion(tiny_cfg)).eval(), vae_tile=16, vae_tile_overlap=8)
    calls = []
    pipe.vae.decoder.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, size=(64, 64), mode="bilinear"
    )
    z = pipe.vae.encode(smooth).mode() * pipe.cfg.scale_factor  # (1, 4, 32, 32): the latent of a real-looking image
    with torch.no_grad():
        plain = (pipe.vae.decode(z / pipe.cfg.scale_factor) / 2 + 0.5).clamp(0, 1)
        small = z[..., :16, :16].repeat(3, 1, 1, 1)
        calls.clear()
        sliced = pipe.decode(small)
        assert calls == [(1, 4, 16, 16)] * 3  # no tiling at the threshold, one image at a time
        assert (sliced - (pipe.vae.decode(small / pipe.cfg.scale_factor) / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5
        calls.clear()
        tiled = pipe.decode(z)
    assert calls == [(1, 4, 16, 16)] * 9  # 32 latents a side: tiles at 0, 8 and 16
    assert tiled.shape == plain.shape
    assert (tiled - plain).abs().mean() < 0.005 and (tiled - plain).abs().max() < 0.03


@pytest.mark.parametrize("precision, vae_tile", [("fp16", 64), ("fp16", 4), ("autocast", 64)])
def test_an_overflowing_half_precision_vae_decode_is_redone_in_fp32(tiny_cfg, precision, vae_tile):
    """SD's black-image bug, made the way it happens: decoder activations past fp16's 65504 (conv_in's weights scaled
    by 1e5, still fp16 numbers; GroupNorm brings fp32 back to scale) become inf / NaN in fp16. Such an image is decoded
    again in fp32: the fp32 pipeline's image on the same weights, with one warning; the VAE is fp16 again after.
    With fp16 weights, plain and tiled (4-latent tiles), and with fp32 weights under fp16 autocast."""
    tiny_cfg.scale_factor = 0.5  # latents and weights that fp16 holds exactly: the same numbers on both sides
    model = randomize_(StableDiffusion(tiny_cfg)).eval()
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(1e5)
    model = model.half().float()
    full = Pipeline(model, vae_tile=vae_tile, vae_tile_overlap=2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half().float()
    reference = full.decode(latents)
    assert reference.isfinite().all()
    if precision == "fp16":
        pipe, latents, context = (
            Pipeline(copy.deepcopy(model).half(), vae_tile=vae_tile, vae_tile_overlap=2),
            latents.half(),
            contextlib.nullcontext(),
        )
    else:
        pipe, context = full, torch.autocast("cpu", dtype=torch.float16)
    with context, torch.no_grad():
        assert not pipe.vae.decode(latents[:1] / tiny_cfg.scale_factor).isfinite().all()  # the overflow is real
        with pytest.warns(UserWarning, match="half-precision decode overflowed") as warned:
            images = pipe.decode(latents)
    assert len(warned) == 1 and torch.equal(images, reference)
    assert next(pipe.vae.parameters()).dtype == (torch.float16 if precision == "fp16" else torch.float32)


def test_repeated_prompts_are_encoded_once(models):
    """The text-encoder states of recent prompts are cached: the negative prompt and a repeated prompt cost no
    encoding."""
    pipe = Pipeline(models[4][0].model)
    batches = []
    handle = pipe.text_encoder.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    first = ours_run(pipe, seed=2, n=1)[0]
    again = ours_run(pipe, seed=2, n=1)[0]
    pipe.txt2img([PROMPT, "a blue car"], steps=1, progress=False)
    handle.remove()
    assert batches == [1, 1, 1]  # PROMPT, the empty negative prompt, then only "a blue car"
    assert (pixels(first) == pixels(again)).all()


def test_int8_quantized_pipeline_stays_close_to_fp32(models):
    """quantize="int8": PyTorch's dynamic int8 Linear layers in the UNet (its convs stay fp32); the image stays near
    the fp32 one (measured on this tiny model: PSNR 62 dB; asserted: >= 30 dB, the issue's target)."""
    model = models[4][0].model
    fp32 = pixels(ours_run(Pipeline(model), seed=1, n=1)[0])
    pipe = Pipeline(copy.deepcopy(model), quantize="int8")
    kinds = {type(m) for m in pipe.unet.modules()}
    assert torch.ao.nn.quantized.dynamic.Linear in kinds and torch.nn.Conv2d in kinds and torch.nn.Linear not in kinds
    int8 = pixels(ours_run(pipe, seed=1, n=1)[0])
    assert 10 * np.log10(255**2 / ((fp32 - int8) ** 2).mean()) >= 30
    with pytest.raises(InputError, match="unknown quantization 'int4'"):
        Pipeline(model, quantize="int4")
    with pytest.raises(InputError, match="CPU and fp32 only"):
        Pipeline(copy.deepcopy(model).double(), quantize="int8")


@pytest.mark.parametrize(
    "mode, channels, sampler",
    [
        ("txt2img", 4, "ddim"),
        ("txt2img", 4, "heun"),
        ("txt2img", 4, "dpmpp_2m_karras"),
        ("img2img", 4, "euler_a"),
        ("inpaint", 4, "plms"),
        ("inpaint", 9, "unipc"),
    ],
)
def test_deepcache_1_is_no_caching_and_n_runs_the_whole_unet_every_nth_call(
    models, init_image, mask, mode, channels, sampler
):
    """deepcache=1: every call whole, the same images and latents as without caching, bit for bit. deepcache=3: the
    UNet's middle block (the deep part) runs at calls 1, 4, 7... only (counted; Heun calls the UNet twice a step),
    and the latents move (the quality is checked on the embedded model in test_default_model)."""
    pipe = models[channels][0]
    kwargs = {"sampler": sampler, "steps": 6}
    if mode != "txt2img":
        kwargs |= {"init_image": init_image, "strength": 0.7 if mode == "img2img" else 1.0}
    if mode == "inpaint":
        kwargs["mask"] = mask
    plain, plain_trajectory = ours_run(pipe, seed=4, n=2, mode="txt2img", **kwargs)
    same, trajectory = ours_run(pipe, seed=4, n=2, mode="txt2img", deepcache=1, **kwargs)
    assert np.array_equal(pixels(plain), pixels(same))
    assert all(torch.equal(a, b) for a, b in zip(plain_trajectory, trajectory, strict=True))
    calls, whole = [], []
    hooks = [
        pipe.unet.register_forward_hook(lambda *_: calls.append(1)),
        pipe.unet.middle_block.register_forward_hook(lambda *_: whole.append(1)),
    ]
    _, cached = ours_run(pipe, seed=4, n=2, mode="txt2img", deepcache=3, **kwargs)
    for hook in hooks:
        hook.remove()
    assert len(calls) >= 4 and len(whole) == (len(calls) + 2) // 3  # img2img at strength 0.7: 4 steps
    assert not torch.equal(cached[-1], plain_trajectory[-1])


@pytest.mark.parametrize("kwargs, message", [({"deepcache": 0}, "at least 1"), ({"deepcache_branch": 6}, "0 to 5")])
def test_bad_deepcache_settings_are_clear_errors(models, kwargs, message):
    with pytest.raises(InputError, match=message):
        models[4][0].txt2img(PROMPT, steps=2, progress=False, **kwargs)


@pytest.mark.parametrize("mode, sampler", [("txt2img", "euler_a"), ("inpaint", "ddim")])
def test_sub_batches_make_the_images_of_separate_calls(models, init_image, mask, mode, sampler):
    """A call runs in sub-batches of what fits batch_memory (here: 2 images); each image keeps its generator (seed + i)
    and its prompt, so 2 prompts x 3 images come out as the calls for each sub-batch alone, bit for bit."""
    model = models[4][0].model
    pipe = Pipeline(model, batch_memory=estimate_memory(model.cfg, 2, 16, 16))
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    kwargs = {"steps": 3, "progress": False, "sampler": sampler} | ({"eta": 0.5} if sampler == "ddim" else {})
    if mode == "inpaint":
        kwargs |= {"init_image": init_image, "mask": mask}
    images = pixels(pipe.txt2img([PROMPT, "a blue car"], seed=10, n_samples=3, **kwargs))
    handle.remove()
    assert calls == [4] * 9  # 3 sub-batches of 2 images (with their unconditional halves), 3 steps each
    alone = [
        pipe.txt2img(PROMPT, seed=10, n_samples=2, **kwargs),
        pipe.txt2img([PROMPT, "a blue car"], seed=12, **kwargs),
        pipe.txt2img("a blue car", seed=14, n_samples=2, **kwargs),
    ]
    assert np.array_equal(images, pixels([image for batch in alone for image in batch]))
    assert np.abs(images[0] - images[3]).mean() > 1  # other prompts, other images


def test_a_10000_image_request_runs_in_sub_batches_of_bounded_memory(models, monkeypatch):
    """10,000 images of the tiny model in sub-batches of 50 (batch_memory): the UNet sees 100 latents at a time, and
    the process's peak memory grows by no more than the estimate of one sub-batch (Linux's peak RSS, reset before;
    measured: ~27 MiB, estimate 36 MiB). Stopped in its second sub-batch, after the first one's 50 images. The
    throughput knee (SUB_BATCH_LATENTS: 16 such images) is lifted, so that memory is what bounds them."""
    monkeypatch.setattr(ldm.pipeline, "SUB_BATCH_LATENTS", 10_000 * 8 * 8)
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    model = models[4][0].model
    cfg, pipe = model.cfg, Pipeline(model, batch_memory=estimate_memory(model.cfg, 50, 16, 16))

    def status(field: str) -> int:  # bytes
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))

    class Stop(Exception):
        pass

    calls = []

    def hook(module, args, out):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise Stop

    pipe.txt2img(PROMPT, steps=1, n_samples=50, progress=False)  # warm up: the allocator's and torch's first-call costs
    handle = pipe.unet.register_forward_hook(hook)
    clear_refs.write_text("5")
    base = status("VmRSS")
    with pytest.raises(Stop):
        pipe.txt2img(PROMPT, steps=1, n_samples=10_000, progress=False)
    handle.remove()
    grown = status("VmHWM") - base
    assert calls == [100, 100]
    assert grown <= estimate_memory(cfg, 50, 16, 16) < estimate_memory(cfg, 10_000, 16, 16) / 100, grown


def test_the_step_callback_sees_every_step_changes_nothing_and_can_stop_the_run():
    pipe = Pipeline(tiny_model()).eval()
    plain = pipe.txt2img(PROMPT, steps=4, seed=0, n_samples=2, progress=False)
    seen = []
    watched = pipe.txt2img(
        PROMPT, steps=4, seed=0, n_samples=2, progress=False, callback=lambda i, n, z: seen.append((i, n, z.shape))
    )
    assert seen == [(i, 4, (2, 4, 8, 8)) for i in range(4)]
    assert np.array_equal(pixels(plain), pixels(watched))

    class Stop(Exception):
        pass

    def stop_at_step_1(i, n, z):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        pipe.txt2img(PROMPT, steps=4, seed=0, progress=False, callback=stop_at_step_1)


def test_openvino_fp32_backend_gives_the_torch_image(models, tmp_path, monkeypatch, capsys):
    """backend="openvino" in fp32: the UNet and VAE decoder converted to OpenVINO give torch's final latents and
    decoded image within 1e-4 (OpenVINO f32 runs the same arithmetic in another order); the converted files are cached
    by the weights' hash, so a second pipeline converts nothing, and a LoRA converts again."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino: pip install 'ldm[openvino]'")
    import ldm.openvino

    monkeypatch.setattr(ldm.openvino, "CACHE", tmp_path)
    pipe = models[4][0]
    model = copy.deepcopy(pipe.model)
    ov = Pipeline(model, backend="openvino", backend_precision="fp32")
    _, trajectory = ours_run(pipe, seed=1, n=2)
    _, ov_trajectory = ours_run(ov, seed=1, n=2)
    assert capsys.readouterr().err.count("note: converting the") == 2 and len(list(tmp_path.glob("*.xml"))) == 2
    assert (trajectory[-1] - ov_trajectory[-1]).abs().max() <= 1e-4
    assert (pipe.decode(trajectory[-1]) - ov.decode(trajectory[-1])).abs().max() <= 1e-4
    ours_run(Pipeline(model, backend="openvino"), seed=1, n=1, steps=1)
    assert "converting" not in capsys.readouterr().err
    w = model.unet.out[2].weight  # a LoRA on the last conv
    lora = {"lora_unet_out_2.lora_down.weight": torch.full((1, *w.shape[1:]), 0.01)}
    save_file(lora | {"lora_unet_out_2.lora_up.weight": torch.ones(w.shape[0], 1, 1, 1)}, tmp_path / "l.safetensors")
    ov.load_lora(tmp_path / "l.safetensors")
    ours_run(ov, seed=1, n=1, steps=1)
    assert capsys.readouterr().err.count("note: converting the unet") == 1
    with pytest.raises(InputError, match="deepcache runs on the torch UNet"):
        ov.txt2img(PROMPT, steps=2, deepcache=2, progress=False)
