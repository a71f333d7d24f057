"""Outpainting: the canvas and its feathered mask, the original's pixels back exactly, the seam, and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PROMPT, a1111, cli, pixels, tiny_model
from ldm.checkpoint import save_single_file
from ldm.images import outpaint_canvas
from ldm.pipeline import InputError, Pipeline


def smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    big = torch.nn.functional.interpolate(torch.rand(1, 3, 3, 3, generator=g), size=(height, width), mode="bilinear")
    return Image.fromarray((big[0].permute(1, 2, 0) * 255).round().byte().numpy())


@pytest.fixture(scope="module")
def pipes():
    return {channels: Pipeline(tiny_model(channels)) for channels in (4, 9)}


def test_canvas_is_rounded_up_and_holds_the_original():
    image = smooth(13, 10)
    canvas, mask, padding = outpaint_canvas(image, (3, 0, 5, 2), factor=2, mask_blur=3)
    assert padding == (4, 0, 5, 2) and canvas.size == mask.size == (22, 12)
    inside = np.asarray(canvas)[0:10, 4:17]
    assert np.array_equal(inside, np.asarray(image))
    m = np.asarray(mask, dtype=np.float64) / 255
    assert (m[0:10, 4:17] == 0).all() and (m[:, :1] == 1).all() and (m[11:, 4:17] > 0).all()
    ramp = m[5, 4::-1]  # from the original's left border outwards: rises to 1 over mask_blur pixels
    assert 0 < ramp[1] < ramp[2] < ramp[3] < 1 and ramp[4] == 1
    fill = np.asarray(canvas, dtype=np.float64)[0:10, 0:4]
    assert np.abs(fill - np.asarray(image, dtype=np.float64)[:, :1]).mean() < 40  # the border colours carried out
    hard = np.asarray(outpaint_canvas(image, (3, 0, 5, 2), factor=2, mask_blur=0)[1])
    assert set(np.unique(hard)) == {0, 255}


@pytest.mark.parametrize("channels", [4, 9])
def test_outpaint_keeps_the_original_exactly(pipes, channels):
    """A 9-channel inpainting UNet as such, a 4-channel one by latent blending."""
    image = smooth(16, 12, seed=channels)
    out = pipes[channels].outpaint(PROMPT, image, (8, 0, 7, 4), steps=3, progress=False, seed=1)[0]
    assert out.size == (32, 16)
    assert np.array_equal(np.asarray(out)[0:12, 8:24], np.asarray(image))
    assert np.abs(np.asarray(out, dtype=np.float64)[0:12, :4] - np.asarray(image, dtype=np.float64)[:, :1]).mean() > 1


def test_the_feathered_border_blends(pipes):
    """The jump between the original's edge column and the first new one is smaller with a feathered mask: the
    first new pixels are mostly the fill (the edge colour) instead of the generated picture."""
    image = smooth(16, 16, seed=3)

    def jump(blur):
        out = pipes[4].outpaint(PROMPT, image, (8, 0, 0, 0), mask_blur=blur, steps=3, progress=False, seed=2)[0]
        a = np.asarray(out, dtype=np.float64)
        return np.abs(a[:, 8] - a[:, 7]).mean()

    assert jump(8) < 0.5 * jump(0)


@pytest.mark.parametrize(
    "padding, blur, message",
    [
        ((-1, 0, 0, 0), 4, "non-negative"),
        ((0, 0, 0, 0), 4, "not all 0"),
        ((1, 2, 3), 4, "4 non-negative"),
        ((8, 0, 0, 0), -2, "mask blur"),
    ],
)
def test_bad_padding_is_an_input_error(pipes, padding, blur, message):
    with pytest.raises(InputError, match=message):
        pipes[4].outpaint(PROMPT, smooth(16, 16), padding, mask_blur=blur, steps=2, progress=False)


@pytest.fixture(scope="module")
def files(pipes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("outpaint")
    save_single_file(pipes[4].model, folder / "tiny.safetensors")
    smooth(15, 16, seed=5).save(folder / "init.png")
    return folder


def test_cli_outpaints_and_records_it(files, tmp_path):
    out = tmp_path / "out"
    args = ["--ckpt", files / "tiny.safetensors", "--prompt", PROMPT, "--steps", 3, "--outdir", out]
    assert cli(*args, "--init-image", files / "init.png", "--outpaint", "3,0,4,2", "--mask-blur", 2) == 0
    image = Image.open(out / "00000.png")
    assert image.size == (4 + 15 + 5, 18)
    assert np.array_equal(np.asarray(image)[0:16, 4:19], np.asarray(Image.open(files / "init.png")))
    facts = json.loads(image.text["ldm"])
    assert (facts["mode"], facts["outpaint"], facts["mask_blur"], facts["strength"]) == (
        "outpaint",
        [4, 0, 5, 2],
        2,
        1.0,
    )
    assert a1111(image.text["parameters"])["Outpaint"] == "4,0,5,2"
    pipe_images = Pipeline(tiny_model()).outpaint  # the same model, through the API
    same = pipe_images(
        PROMPT, Image.open(files / "init.png"), (3, 0, 4, 2), mask_blur=2, steps=3, seed=42, progress=False
    )
    assert np.array_equal(pixels(same), pixels([image]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init-image", "INIT", "--outpaint=-8,0,0,0"], "non-negative"),
        (["--init-image", "INIT", "--outpaint", "8,x,0,0"], "LEFT,TOP,RIGHT,BOTTOM in whole pixels, got '8,x,0,0'"),
        (["--init-image", "INIT", "--outpaint", "8,0"], "4 non-negative"),
        (["--outpaint", "8,0,0,0"], "--outpaint needs --init-image"),
        (["--init-image", "INIT", "--mask", "INIT", "--outpaint", "8,0,0,0"], "and no --mask"),
        (["--init-image", "INIT", "--mask-blur", "3"], "--mask-blur applies to --outpaint only"),
        (["--init-image", "INIT", "--outpaint", "8,0,0,0", "--mask-blur", "-1"], "mask blur must be >= 0"),
    ],
)
def test_cli_bad_outpaint_input_is_one_line_and_exit_2(files, tmp_path, capsys, extra, message):
    extra = [str(files / "init.png") if a == "INIT" else a for a in extra]
    args = ["--ckpt", files / "tiny.safetensors", "--prompt", PROMPT, "--steps", 2, "--outdir", tmp_path / "out"]
    assert cli(*args, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
