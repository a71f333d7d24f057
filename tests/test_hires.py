"""The hires fix against diffusers: its txt2img at the small size (output_type="latent"), the upscale written here
(F.interpolate in the upscaler's mode; Lanczos: the small images resized with PIL), then its img2img on those
latents (or images) with generators seeded again with the images' seeds, as AUTOMATIC1111's second pass. The second
pass runs the last n steps of a schedule of int(n / min(denoise, 0.999)) steps (A1111's count): diffusers' img2img
with that many steps and strength n / total (values chosen so the product is exact)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

import txt2img
from conftest import PAGE_VALUES, PROMPT, STEPS, a1111, assert_same, cli, generators, tiny_model
from ldm import cli as cli_names
from ldm.checkpoint import save_diffusers_folder
from ldm.pipeline import Pipeline
from ldm.request import HIRES_UPSCALERS, InputError, Request
from ldm.samplers import make_scheduler


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model = tiny_model()
    folder = tmp_path_factory.mktemp("hires")
    save_diffusers_folder(model, folder)
    base = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    img2img = StableDiffusionImg2ImgPipeline(**base.components)
    for ref in (base, img2img):
        ref.set_progress_bar_config(disable=True)
    return Pipeline(model), base, img2img, folder


CASES = {  # upscaler: (first sampler, hires sampler, our hires options, hires steps run, denoise, the upscaled (w, h))
    "Latent": ("euler_a", "euler_a", {"hires_scale": 2.0, "hires_steps": 4, "hires_denoise": 0.5}, 4, 0.5, (32, 32)),
    "Latent (nearest-exact)": (
        "ddim",
        "euler_a",
        {"hires_size": (24, 24), "hires_denoise": 0.625, "hires_sampler": "euler_a", "hires_prompt": "a blue car"},
        STEPS,  # hires steps 0: the first pass's
        0.625,
        (24, 24),
    ),
    "Lanczos": ("euler", "euler", {"hires_scale": 1.5, "hires_steps": 3, "hires_denoise": 0.75}, 3, 0.75, (24, 24)),
}
INTERPOLATE = {"Latent": "bilinear", "Latent (nearest-exact)": "nearest-exact"}


@pytest.mark.parametrize("upscaler", CASES)
def test_hires_fix_matches_diffusers_txt2img_upscale_img2img(models, upscaler):
    pipe, base, img2img, _ = models
    sampler, hires_sampler, options, n, denoise, (w, h) = CASES[upscaler]
    trajectory = []
    ours = pipe.txt2img(
        PROMPT,
        seed=3,
        n_samples=2,
        steps=STEPS,
        sampler=sampler,
        hires_upscaler=upscaler,
        progress=False,
        trajectory=trajectory,
        **options,
    )
    base.scheduler = make_scheduler(sampler, pipe.cfg)
    small = base(
        PROMPT,
        num_inference_steps=STEPS,
        num_images_per_prompt=2,
        generator=generators(3, 2),
        output_type="pil" if upscaler == "Lanczos" else "latent",
    ).images
    if upscaler == "Lanczos":
        image = [im.resize((w, h), Image.LANCZOS) for im in small]
    else:
        image = F.interpolate(small, size=(h // 2, w // 2), mode=INTERPOLATE[upscaler])  # the tiny VAE's factor: 2
    total = int(n / min(denoise, 0.999))
    strength = n / total
    assert int(total * strength) == n  # diffusers runs exactly n steps
    img2img.scheduler = make_scheduler(hires_sampler, pipe.cfg)
    final = {}

    def keep(p, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    theirs = img2img(
        options.get("hires_prompt", PROMPT),
        image=image,
        strength=strength,
        num_inference_steps=total,
        num_images_per_prompt=2,
        generator=generators(3, 2),  # A1111's second pass: the same seeds again
        callback_on_step_end=keep,
    ).images
    assert ours[0].size == (w, h) and len(trajectory) == n + 1
    assert_same(ours, theirs, trajectory[-1], final["latents"])
    plain = pipe.txt2img(PROMPT, seed=3, n_samples=2, steps=STEPS, sampler=sampler, progress=False)
    upscaled = np.asarray(plain[0].resize((w, h)), dtype=np.float64)
    assert np.abs(np.asarray(ours[0], dtype=np.float64) - upscaled).mean() > 1  # the second pass changed the image


def test_hires_png_text_as_a1111(models, tmp_path):
    """The PNG's A1111 text: Size the first pass's, then Denoising strength, Hires upscale, Hires steps (when given),
    Hires upscaler; the hires sampler and prompt when they differ from the first pass's."""
    _, _, _, folder = models
    out = tmp_path / "out"
    common = ["--ckpt", folder, "--prompt", PROMPT, "--steps", 3, "--outdir", out, "--seed", 5]
    assert cli(*common, "--hires-scale", 2, "--hires-steps", 2, "--hires-upscaler", "Latent (bicubic)") == 0
    image = Image.open(out / "00000.png")
    text = a1111(image.text["parameters"])
    assert image.size == (32, 32) and text["Size"] == "16x16"
    assert (text["Denoising strength"], text["Hires upscale"], text["Hires steps"]) == ("0.7", "2", "2")
    assert text["Hires upscaler"] == "Latent (bicubic)" and "Hires sampler" not in text
    assert cli(*common, "--hires-size", "24x24", "--hires-prompt", "a blue car", "--hires-sampler", "euler") == 0
    text = a1111(Image.open(out / "00001.png").text["parameters"])
    assert (text["Hires resize"], text["Hires prompt"], text["Hires sampler"]) == ("24x24", "a blue car", "Euler")
    assert "Hires steps" not in text and "Hires upscale" not in text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hires-steps", "3"], "--hires-steps needs --hires-scale or --hires-size (the hires fix)"),
        (["--hires-scale", "2", "--hires-size", "32x32"], "give one of --hires-scale and --hires-size, not both"),
        (["--hires-scale", "0.5"], "--hires-scale must be a number >= 1, got 0.5"),
        (["--hires-scale", "nan"], "--hires-scale must be a number >= 1, got nan"),
        (["--hires-size", "32"], "--hires-size takes WIDTHxHEIGHT in whole pixels, got '32'"),
        (["--hires-size", "0x32"], "--hires-size must be WIDTHxHEIGHT in positive whole pixels, got (0, 32)"),
        (
            ["--hires-scale", "2", "--hires-steps", "-1"],
            "--hires-steps must be >= 0 (0: the same as the steps), got -1",
        ),
        (["--hires-scale", "2", "--hires-denoise", "0"], "--hires-denoise must be in (0, 1], got 0.0"),
        (
            ["--hires-size", "40x32"],
            "--hires-size 40x32: the sides must be multiples of 2 in the aspect ratio of 16x16",
        ),
        (
            ["--hires-scale", "2", "--hires-steps", "200", "--hires-denoise", "0.1"],
            "--hires-steps 200 at --hires-denoise 0.1: a schedule of 2000 steps, more than this model's 1000",
        ),
    ],
)
def test_bad_hires_input_is_one_line_exit_2(models, tmp_path, capsys, flags, message):
    _, _, _, folder = models
    assert cli("--ckpt", folder, "--prompt", "x", "--steps", 2, "--outdir", tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_hires_is_for_txt2img_and_the_command_line_knows_the_upscalers(tiny_cfg):
    assert cli_names.HIRES_UPSCALER_NAMES == HIRES_UPSCALERS
    with pytest.raises(InputError, match=r"^unknown hires upscaler 'ESRGAN' \(known: Latent, Latent \(antialiased\)"):
        Request("x", hires_scale=2, hires_upscaler="ESRGAN").check()
    with pytest.raises(InputError, match=r"^unknown hires sampler 'nope' \(known: ddim, "):
        Request("x", hires_scale=2, hires_sampler="nope").resolved(tiny_cfg)
    image = Image.new("RGB", (16, 16))
    for request in (Request("x", hires_scale=2, init_image=image), Request("x", hires_scale=2, controls=("c",))):
        with pytest.raises(InputError, match="the hires fix is for txt2img"):
            request.check(txt2img.NAMES)


def test_the_web_page_hires_fields_build_the_request(tiny_cfg, tmp_path):
    """The txt2img tab's "Hires. fix" accordion: off, no hires field; on, the Request carries them."""
    from ldm import webui_app  # gradio: imported by the test that needs it

    args = SimpleNamespace(models_dir=tmp_path, outdir=tmp_path)
    session = SimpleNamespace(args=args, embeddings=[], pipe=SimpleNamespace(cfg=tiny_cfg))
    values = PAGE_VALUES | {
        "hires": False,
        "hires_scale": 1.5,
        "hires_steps": 2,
        "hires_denoise": 0.4,
        "hires_upscaler": "Lanczos",
        "hires_sampler": webui_app.SAME_SAMPLER,
        "hires_prompt": "",
    }
    assert not webui_app.request_of(session, values)[0].hires
    request = webui_app.request_of(session, values | {"hires": True, "hires_sampler": "euler"})[0]
    got = [request.hires_scale, request.hires_steps, request.hires_denoise, request.hires_upscaler]
    assert got + [request.hires_sampler, request.hires_prompt] == [1.5, 2, 0.4, "Lanczos", "euler", None]
    with pytest.raises(InputError, match="^Denoising strength must be in"):
        webui_app.request_of(session, values | {"hires": True, "hires_denoise": 0})
