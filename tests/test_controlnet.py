"""ControlNet against diffusers, run here on the same random weights: our file read by diffusers' own single-file
loader (`ControlNetModel.from_single_file(..., config=<folder>)`), then our pipelines against diffusers'
StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline (mean |difference| <= 1/255, final latents within 1e-4).

The tiny model here has an 8x VAE (64x64 images, 8x8 latents), as SD v1: lllyasviel's hint block halves the control
map three times, and diffusers' single-file converter knows only that layout.
"""

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import (
    LATENT_ATOL,
    PROMPT,
    a1111,
    assert_same,
    cli,
    diffusers_run,
    ours_run,
    pixels,
    randomize_,
    tiny_model,
)
from ldm import LdmError
from ldm.checkpoint import CheckpointError, diffusers_configs, save_diffusers_folder, save_single_file
from ldm.controlnet import ControlNet, control_map, load_controlnet, save_controlnet
from ldm.images import CANNY_THRESHOLDS, canny
from ldm.pipeline import Pipeline
from ldm.request import Control
from ldm.samplers import make_scheduler
from ldm.unet import UNetModel

FACTOR8 = ("vae.ch_mult=[1,2,2,2]",)
SIZE = 64


def controlnet_config(cfg) -> dict:
    """diffusers' ControlNetModel config.json for the UNet of cfg: the UNet's, without its decoder half."""
    unet = diffusers_configs(cfg)["unet"]
    drop = ("up_block_types", "out_channels", "sample_size", "_class_name")
    return {k: v for k, v in unet.items() if k not in drop} | {
        "_class_name": "ControlNetModel",
        "in_channels": cfg.vae.embed_dim,
        "conditioning_embedding_out_channels": [16, 32, 96, 256],
    }


def smooth_image(seed: int, width: int, height: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 5, 5, generator=g)
    big = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear")
    return Image.fromarray((big[0].permute(1, 2, 0) * 255).round().byte().numpy())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Our pipeline, two random ControlNets (files and diffusers' reading of them) and diffusers' base pipeline."""
    root = tmp_path_factory.mktemp("controlnet")
    model = tiny_model(overrides=FACTOR8)
    save_diffusers_folder(model, root / "sd")
    base = StableDiffusionPipeline.from_pretrained(root / "sd", safety_checker=None)
    base.scheduler = make_scheduler("ddim", model.cfg)
    (root / "config").mkdir()
    (root / "config" / "config.json").write_text(json.dumps(controlnet_config(model.cfg)))
    files, theirs = [], []
    for seed in (1, 2):
        files.append(root / f"control{seed}.safetensors")
        net = randomize_(ControlNet(model.cfg), seed)
        with torch.no_grad():  # residuals as large as the UNet's own activations, so that a wrong one shows
            for name, p in net.named_parameters():
                if name.startswith(("zero_convs", "middle_block_out")):
                    p.mul_(30)
        save_controlnet(net, files[-1])
        their = ControlNetModel.from_single_file(str(files[-1]), config=str(root / "config"), local_files_only=True)
        theirs.append(their.eval())
    pipe = Pipeline(model)
    ours = [pipe.load_controlnet(f) for f in files]
    hints = [smooth_image(3, 48, 40), smooth_image(4, SIZE, SIZE)]  # the first one is resized
    return pipe, ours, theirs, base, hints, files


def assert_matters(trajectory, other) -> None:
    """The final latents of two runs differ by 100x the parity tolerance (the tiny random VAE decodes latents to
    nearly one image, so the pixels cannot tell)."""
    assert (trajectory[-1] - other[-1]).abs().mean() > 100 * LATENT_ATOL


def reference(base, controlnet, cls=StableDiffusionControlNetPipeline):
    ref = cls(**base.components, controlnet=controlnet)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_residuals_match_diffusers_controlnet(setup):
    pipe, ours, theirs, *_ = setup
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, SIZE, SIZE, generator=g)
    context, t = torch.randn(2, 77, 32, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        residuals = ours[0](x, hint, t, context)
        down, mid = theirs[0](x, t, context, hint, return_dict=False)
    assert len(residuals) == len(down) + 1 == 7  # conv_in, 3 ResBlocks, 2 downsamplers; middle
    for a, b in zip(residuals, [*down, mid]):
        assert a.abs().mean() > 1e-3 and torch.allclose(a, b, atol=1e-5)


def test_unet_without_residuals_is_unchanged_and_with_them_matches_diffusers(setup):
    pipe, ours, *_ = setup
    unet = pipe.unet
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        residuals = ours[0](x, torch.rand(2, 3, SIZE, SIZE, generator=g), 7, context)
        plain = unet(x, 7, context)
        assert torch.equal(plain, unet(x, 7, context, None))
        assert (unet(x, 7, context, residuals) - plain).abs().mean() > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": 0.5, "start": 0.2, "end": 0.8},
        {"scale": 1.0, "guess_mode": True},
        {"scale": 0.7, "guess_mode": True, "cfg": 1.0},
    ],
    ids=["scale-window", "guess-mode", "guess-mode-unguided"],
)
def test_txt2img_matches_diffusers(setup, kwargs):
    pipe, ours, theirs, base, hints, _ = setup
    scale, start, end = kwargs["scale"], kwargs.get("start", 0.0), kwargs.get("end", 1.0)
    guess, cfg = kwargs.get("guess_mode", False), kwargs.get("cfg", 7.5)
    control = Control(ours[0], hints[0], scale=scale, start=start, end=end)
    maps = []
    with pytest.warns(UserWarning, match="control image resized from 48x40 to 64x64"):
        mine, trajectory = ours_run(pipe, 5, 2, controls=[control], guess_mode=guess, scale=cfg, control_maps=maps)
    theirs_images, latents = diffusers_run(
        reference(base, theirs[0]),
        5,
        2,
        image=hints[0],
        controlnet_conditioning_scale=scale,
        control_guidance_start=start,
        control_guidance_end=end,
        guess_mode=guess,
        guidance_scale=cfg,
        height=SIZE,
        width=SIZE,
    )
    assert_same(mine, theirs_images, trajectory[-1], latents)
    assert maps[0].size == (SIZE, SIZE)
    assert_matters(trajectory, ours_run(pipe, 5, 2, scale=cfg)[1])


def test_two_controlnets_match_diffusers(setup):
    pipe, ours, theirs, base, hints, _ = setup
    controls = [Control(ours[0], hints[0], scale=0.5, start=0.2, end=0.8), Control(ours[1], hints[1], scale=0.8)]
    mine, trajectory = ours_run(pipe, 9, 1, controls=controls)
    theirs_images, latents = diffusers_run(
        reference(base, theirs),
        9,
        1,
        image=hints,
        controlnet_conditioning_scale=[0.5, 0.8],
        control_guidance_start=[0.2, 0.0],
        control_guidance_end=[0.8, 1.0],
        height=SIZE,
        width=SIZE,
    )
    assert_same(mine, theirs_images, trajectory[-1], latents)
    assert_matters(trajectory, ours_run(pipe, 9, 1, controls=controls[:1])[1])  # the second one


def test_img2img_matches_diffusers(setup):
    pipe, ours, theirs, base, hints, _ = setup
    init = smooth_image(8, SIZE, SIZE)
    control = Control(ours[0], hints[1], scale=0.9)
    mine, trajectory = ours_run(pipe, 3, 2, mode="img2img", init_image=init, strength=0.6, controls=[control])
    theirs_images, latents = diffusers_run(
        reference(base, theirs[0], StableDiffusionControlNetImg2ImgPipeline),
        3,
        2,
        image=init,
        control_image=hints[1],
        strength=0.6,
        controlnet_conditioning_scale=0.9,
        height=SIZE,
        width=SIZE,
    )
    assert_same(mine, theirs_images, trajectory[-1], latents)


def test_inpainting_matches_diffusers(setup):
    """4-channel UNet, latent blending (diffusers also draws a masked-image latent that this UNet does not use;
    with the deterministic DDIM that changes nothing)."""
    pipe, ours, theirs, base, hints, _ = setup
    init = smooth_image(9, SIZE, SIZE)
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:48, 8:40] = 255
    mask = Image.fromarray(m)
    control = Control(ours[1], hints[1], scale=0.8, start=0.0, end=0.6)
    mine, trajectory = ours_run(
        pipe, 4, 1, mode="inpaint", init_image=init, mask=mask, strength=0.8, controls=[control]
    )
    theirs_images, latents = diffusers_run(
        reference(base, theirs[1], StableDiffusionControlNetInpaintPipeline),
        4,
        1,
        image=init,
        mask_image=mask,
        control_image=hints[1],
        strength=0.8,
        controlnet_conditioning_scale=0.8,
        control_guidance_end=0.6,
        height=SIZE,
        width=SIZE,
    )
    assert_same(mine, theirs_images, trajectory[-1], latents, region=m > 0)
    keep = m == 0
    assert np.array_equal(pixels(mine)[0][keep], np.asarray(init, dtype=np.float64)[keep])


@pytest.mark.parametrize("guess_mode", [False, True])
def test_inpainting_model_matches_diffusers(setup, tmp_path, guess_mode):
    """9-channel UNet: the ControlNet sees the 4-channel latents, the UNet them with the mask and the masked image."""
    _, _, theirs, _, hints, files = setup
    model = tiny_model(9, overrides=FACTOR8)
    save_diffusers_folder(model, tmp_path / "sd9")
    base = StableDiffusionPipeline.from_pretrained(tmp_path / "sd9", safety_checker=None)
    base.scheduler = make_scheduler("ddim", model.cfg)
    pipe = Pipeline(model)
    init, m = smooth_image(9, SIZE, SIZE), np.zeros((SIZE, SIZE), np.uint8)
    m[16:48, 8:40] = 255
    control = Control(pipe.load_controlnet(files[0]), hints[1], scale=0.7)
    mine, trajectory = ours_run(
        pipe, 6, 1, mode="inpaint", init_image=init, mask=Image.fromarray(m), controls=[control], guess_mode=guess_mode
    )
    theirs_images, latents = diffusers_run(
        reference(base, theirs[0], StableDiffusionControlNetInpaintPipeline),
        6,
        1,
        image=init,
        mask_image=Image.fromarray(m),
        control_image=hints[1],
        controlnet_conditioning_scale=0.7,
        guess_mode=guess_mode,
        height=SIZE,
        width=SIZE,
    )
    assert_same(mine, theirs_images, trajectory[-1], latents, region=m > 0)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", ["prefix", "no-prefix", "pth", "fp16", "full-model", "diffusers"])
def test_files_load_strictly(setup, tmp_path, layout):
    pipe, ours, theirs, _, _, files = setup
    state = load_file(files[0])
    if layout == "no-prefix":
        save_file({k.removeprefix("control_model."): v for k, v in state.items()}, path := tmp_path / "c.safetensors")
    elif layout == "pth":
        torch.save({"state_dict": state}, path := tmp_path / "c.pth")
    elif layout == "fp16":
        save_controlnet(ours[0], path := tmp_path / "c.safetensors", dtype=torch.float16)
    elif layout == "full-model":  # lllyasviel's v1.0 training files: the SD model beside the ControlNet
        sd = {"model.diffusion_model." + k: v for k, v in pipe.unet.state_dict().items()}
        torch.save(state | sd | {"betas": torch.zeros(3)}, path := tmp_path / "c.pth")
    elif layout == "diffusers":
        theirs[0].save_pretrained(path := tmp_path / "folder")
    else:
        path = files[0]
    net = load_controlnet(path, pipe.cfg)
    tolerance = 1e-3 if layout == "fp16" else 0
    for key, value in ours[0].state_dict().items():
        assert (net.state_dict()[key] - value).abs().max() <= tolerance * value.abs().max(), key


def test_bad_files_name_the_tensor(setup, tmp_path):
    pipe, _, _, _, _, files = setup
    wide = tiny_model(overrides=(*FACTOR8, "unet.model_channels=64")).cfg
    save_controlnet(ControlNet(wide), path := tmp_path / "wide.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"wide.safetensors: tensor 'input_blocks.0.0.bias' has shape \(64,\), the model expects \(32,\)",
    ):
        load_controlnet(path, pipe.cfg)
    state = load_file(files[0])
    save_file(state | {"control_model.extra.weight": torch.ones(1)}, path := tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        load_controlnet(path, pipe.cfg)
    save_file(state | {"other.weight": torch.ones(1)}, path := tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'other.weight'"):
        load_controlnet(path, pipe.cfg)
    del state["control_model.zero_convs.3.0.bias"]
    save_file(state, path := tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'zero_convs.3.0.bias'"):
        load_controlnet(path, pipe.cfg)
    with pytest.raises(CheckpointError, match="not a diffusers ControlNetModel"):
        load_controlnet(tmp_path, pipe.cfg)


def test_convert_half_writes_what_diffusers_reads_in_fp16(setup, tmp_path, capsys):
    """python -m ldm.convert CONTROLNET DST --half (the shipped ControlNet's last step): every tensor cast to fp16
    under its name; diffusers' from_single_file reads the file as the fp16 rounding of the original ControlNet."""
    from ldm.convert import main as convert

    _, _, theirs, _, _, files = setup
    assert convert([str(files[0]), str(path := tmp_path / "half.safetensors"), "--half"]) == 0
    state = load_file(path)
    assert state.keys() == load_file(files[0]).keys() and {v.dtype for v in state.values()} == {torch.float16}
    config = files[0].parent / "config"
    half = ControlNetModel.from_single_file(str(path), config=str(config), local_files_only=True)
    for (name, value), theirs_value in zip(half.state_dict().items(), theirs[0].state_dict().values()):
        assert torch.equal(value, theirs_value.half()), name
    capsys.readouterr()
    assert convert([str(files[0]), str(path), "--half"]) == 2  # exists: not overwritten
    assert convert([str(files[0]), str(tmp_path / "folder"), "--half"]) == 2
    assert "a ControlNet converts to a .safetensors file" in capsys.readouterr().err
    (garbage := tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors header")
    assert convert([str(garbage), str(tmp_path / "g.safetensors"), "--half"]) == 2  # one line, not a traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "garbage.safetensors is not a readable safetensors file" in err


def test_the_unet_is_the_encoder_plus_its_decoder(tiny_cfg):
    """Building the encoder apart left the UNet's names, shapes and order as they were (CompVis's)."""
    names = list(UNetModel(tiny_cfg.unet).state_dict())
    assert names[0] == "time_embed.0.weight" and names[-1] == "out.2.bias"
    assert [n.split(".")[0] for n in names] == sorted(
        [n.split(".")[0] for n in names],
        key=["time_embed", "input_blocks", "middle_block", "output_blocks", "out"].index,
    )


# ---------------------------------------------------------------- control maps


def test_canny_is_opencvs_with_the_stated_thresholds(setup):
    image = smooth_image(5, 40, 40).resize((SIZE, SIZE), Image.NEAREST)  # blocky: sharp edges
    control = Control(setup[1][0], image, preprocess="canny")
    edges = np.asarray(control_map(control, SIZE, SIZE))
    expected = cv2_canny(image)
    assert CANNY_THRESHOLDS == (100, 200) and edges.shape == (SIZE, SIZE, 3)
    assert np.array_equal(edges[..., 0], expected) and 0 < (expected > 0).mean() < 0.5
    assert np.array_equal(np.asarray(canny(image))[..., 2], expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preprocess": "depth"}, "unknown control preprocessing 'depth'"),
        ({"scale": float("nan")}, "finite"),
        ({"start": 0.8, "end": 0.2}, "0 <= start < end <= 1"),
        ({"end": 1.5}, "0 <= start < end <= 1"),
    ],
)
def test_bad_control_settings_are_one_line_errors(setup, kwargs, message):
    pipe, ours, _, _, hints, _ = setup
    with pytest.raises(LdmError, match=message):
        pipe.txt2img(PROMPT, steps=2, progress=False, controls=[Control(ours[0], hints[1], **kwargs)])


def test_a_controlnet_needs_a_vae_of_at_most_8x(tiny_cfg):
    cfg = tiny_model(overrides=("vae.ch_mult=[1,1,1,1,1]",)).cfg
    with pytest.raises(CheckpointError, match="at most 8x"):
        ControlNet(cfg)
    assert len(ControlNet(tiny_cfg).input_hint_block) == 7  # a 2x VAE: one halving


def test_path_of_a_missing_file(setup):
    with pytest.raises(CheckpointError, match="not found"):
        load_controlnet(Path("/nonexistent/control.safetensors"), setup[0].cfg)


# ---------------------------------------------------------------- txt2img.py


@pytest.fixture(scope="module")
def ckpt(setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny8.safetensors"
    save_single_file(setup[0].model, path)
    return path


def test_cli_matches_diffusers_and_records_the_controlnet(setup, ckpt, tmp_path, capsys):
    pipe, ours, theirs, base, hints, files = setup
    hints[0].save(hint := tmp_path / "hint.png")
    args = ["--ckpt", ckpt, "--prompt", PROMPT, "--steps", 5, "--seed", 5, "--outdir", tmp_path / "out"]
    control = ["--controlnet", files[0], "--control-image", hint, "--control-scale", 0.5]
    assert cli(*args, *control, "--control-start", 0.2, "--control-end", 0.8, "--guess-mode", "--save-control") == 0
    assert "note: control image resized from 48x40 to 64x64" in capsys.readouterr().err
    theirs_images, _ = diffusers_run(
        reference(base, theirs[0]),
        5,
        1,
        image=hints[0],
        controlnet_conditioning_scale=0.5,
        control_guidance_start=0.2,
        control_guidance_end=0.8,
        guess_mode=True,
        height=SIZE,
        width=SIZE,
    )
    image = Image.open(tmp_path / "out" / "00000.png")
    assert np.abs(pixels([image]) - pixels(theirs_images)).mean() <= 1
    facts = json.loads(image.text["ldm"])
    unit = facts["controlnets"][0]
    assert facts["guess_mode"] and unit["file"] == str(files[0]) and unit["image"] == str(hint)
    assert (unit["model"], unit["preprocess"], unit["scale"], unit["start"], unit["end"]) == (
        "control1",
        "none",
        0.5,
        0.2,
        0.8,
    )
    assert unit["hash"] == hashlib.sha256(Path(files[0]).read_bytes()).hexdigest()[:10]  # A1111's model hash
    text = a1111(image.text["parameters"])["ControlNet 0"]
    assert text == f"Module: none, Model: control1 [{unit['hash']}], Weight: 0.5, Guidance Start: 0.2, " + (
        "Guidance End: 0.8, Guess Mode: True"
    )
    saved = Image.open(tmp_path / "out" / "00000-control-0.png")
    assert saved.size == (SIZE, SIZE) and np.array_equal(
        np.asarray(saved), np.asarray(hints[0].resize((SIZE, SIZE), Image.LANCZOS))
    )


def test_cli_canny_two_controlnets_img2img(setup, ckpt, tmp_path):
    """Two groups, canny on the first; with img2img. The saved canny map is OpenCV's edges of the resized image."""
    pipe, ours, _, _, hints, files = setup
    picture = smooth_image(5, 40, 40).resize((SIZE, SIZE), Image.NEAREST)
    picture.save(first := tmp_path / "picture.png")
    hints[1].save(second := tmp_path / "hint.png")
    init = smooth_image(8, SIZE, SIZE)
    init.save(init_path := tmp_path / "init.png")
    args = ["--ckpt", ckpt, "--prompt", PROMPT, "--steps", 4, "--seed", 2, "--outdir", tmp_path / "out"]
    args += ["--init-image", init_path, "--strength", 0.6, "--save-control"]
    args += ["--controlnet", files[0], "--control-image", first, "--control-preprocess", "canny"]
    args += ["--controlnet", files[1], "--control-image", second, "--control-preprocess", "none"]
    assert cli(*args) == 0
    edges = cv2_canny(picture)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "00000-control-0.png"))[..., 1], edges)
    controls = [Control(ours[0], picture, "canny"), Control(ours[1], hints[1])]
    api = pipe.img2img(PROMPT, init, strength=0.6, steps=4, seed=2, progress=False, controls=controls)
    assert np.array_equal(pixels(api), pixels([Image.open(tmp_path / "out" / "00000.png")]))
    facts = json.loads(Image.open(tmp_path / "out" / "00000.png").text["ldm"])
    assert [u["preprocess"] for u in facts["controlnets"]] == ["canny", "none"] and facts["mode"] == "img2img"


def cv2_canny(image: Image.Image) -> np.ndarray:
    """OpenCV's Canny edges of an RGB image at the thresholds the README states."""
    import cv2

    return cv2.Canny(np.asarray(image.convert("RGB")), 100, 200)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--control-image", "HINT"], "the ControlNet settings need --controlnet FILE"),
        (["--guess-mode"], "the ControlNet settings need --controlnet FILE"),
        (["--controlnet", "CN"], "--control-image is given 0 time(s) for 1 --controlnet"),
        (
            ["--controlnet", "CN", "--control-image", "HINT", "--control-scale", "1", "--control-scale", "2"],
            "--control-scale is given 2",
        ),
        (
            ["--controlnet", "CN", "--control-image", "HINT", "--control-start", "0.9", "--control-end", "0.1"],
            "0 <= start < end <= 1",
        ),
        (["--controlnet", "CN", "--control-image", "HINT", "--control-scale", "nan"], "finite"),
        (["--controlnet", "missing.pth", "--control-image", "HINT"], "--controlnet missing.pth: no such file"),
        (["--controlnet", "CN", "--control-image", "missing.png"], "image not found: missing.png"),
        (["--controlnet", "CN", "--control-image", "HINT", "--control-preprocess", "depth"], "invalid choice: 'depth'"),
    ],
)
def test_cli_bad_control_input_is_one_line_and_exit_2(setup, ckpt, tmp_path, capsys, extra, message):
    smooth_image(1, 8, 8).save(hint := tmp_path / "hint.png")
    extra = [str(hint) if a == "HINT" else str(setup[5][0]) if a == "CN" else a for a in extra]
    with pytest.raises(SystemExit) if "invalid choice" in message else contextlib.nullcontext() as exit_info:
        code = cli("--ckpt", ckpt, "--prompt", PROMPT, "--steps", 2, "--outdir", tmp_path / "out", *extra)
    code = exit_info.value.code if exit_info else code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.png"))
