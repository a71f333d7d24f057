"""The X/Y/Z plot (ldm.xyz): A1111's labels, the cells' order (X across, Y down, one sub-grid per Z side by side),
and each cell = the image txt2img makes alone with that cell's settings."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PAGE_VALUES, cli
from ldm.request import InputError, LoraSpec, Request
from ldm.xyz import cells, labels, parse_axis


def test_labels_and_values_as_a1111():
    axes = [parse_axis(t) for t in ("steps=10,20", "scale=3,7.5", "sampler=ddim,euler_a", 'prompt=apple,"pear, ripe"')]
    assert labels(axes) == [
        ["Steps: 10", "Steps: 20"],
        ["CFG Scale: 3.0", "CFG Scale: 7.5"],
        ["DDIM", "Euler a"],
        ["apple", "pear, ripe"],
    ]
    assert labels([parse_axis("hires_denoise=0.5"), parse_axis("seed=-1"), parse_axis("lora=0.25")]) == [
        ["Denoising: 0.5"],
        ["Seed: -1"],
        ["LoRA weight: 0.25"],
    ]


def test_cells_in_reading_order():
    """z, then y, then x; Prompt S/R replaces in the prompt and the negative prompt; lora sets the LoRAs' weights."""
    base = Request("an apple on a table", negative_prompt="apple core", loras=(LoraSpec("a.safetensors", 1.0),))
    axes = [parse_axis("steps=1,2"), parse_axis("prompt=apple,pear"), parse_axis("lora=0.5,1")]
    requests = cells(base, axes)
    got = [(r.steps, r.prompts[0], r.negative_prompt, r.loras[0].weight) for r in requests]
    assert got == [
        (steps, f"an {fruit} on a table", f"{fruit} core", weight)
        for weight in (0.5, 1.0)
        for fruit in ("apple", "pear")
        for steps in (1, 2)
    ]


@pytest.mark.parametrize(
    "axes, request_options, message",
    [
        (["steps"], {}, "--xyz takes NAME=V1,V2,..., got 'steps'"),
        (["width=1"], {}, "--xyz: unknown setting 'width' (known: "),
        (["steps=1,x"], {}, "--xyz steps: the values must be whole numbers, got '1,x'"),
        (["scale=1,,2"], {}, "--xyz scale: give one or more values, separated by commas, got '1,,2'"),
        (["steps=1", "steps=2"], {}, "--xyz: give 1 to 3 axes, each setting once"),
        (["steps=1", "seed=1", "scale=1", "eta=0"], {}, "--xyz: give 1 to 3 axes, each setting once"),
        (["prompt=dog,cat"], {}, "Prompt S/R did not find 'dog' in the prompt or negative prompt"),
        (["lora=0.5"], {}, "--xyz lora: varies the weight of the request's LoRAs, and it has none"),
        (["seed=1,2"], {"n_samples": 2}, "the X/Y/Z plot makes one image a cell: give one prompt, 1 sample and 1 "),
    ],
)
def test_bad_axes_are_one_line(axes, request_options, message):
    with pytest.raises(InputError) as error:
        cells(Request("an apple", **request_options), [parse_axis(a) for a in axes])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_axis_on_the_command_line_exits_2(tmp_path, capsys):
    assert cli("--prompt", "an apple", "--xyz", "steps=1,x", "--outdir", tmp_path) == 2
    assert capsys.readouterr().err == "error: --xyz steps: the values must be whole numbers, got '1,x'\n"


def test_grid_cells_are_the_single_images(tmp_path):
    """A 2 x 2 x 2 plot on the embedded model: each cell's PNG says its settings in reading order, sits in the grid
    at its place (X across, Y down, the Z sub-grids side by side, labels above and left), and is the image txt2img
    makes alone with those settings."""
    out = tmp_path / "xyz"
    common = ["--prompt", "a red apple", "--steps", 2, "--scale", 3]
    assert cli(*common, "--xyz", "steps=1,2", "--xyz", "seed=1,2", "--xyz", "prompt=red,green", "--outdir", out) == 0
    grid = np.asarray(Image.open(out / "xyz_grid-0000.png").convert("RGB"))
    cell = {}
    for k in range(8):
        image = Image.open(out / f"{k:05}.png")
        facts = json.loads(image.text["ldm"])
        ix, iy, iz = k % 2, k // 2 % 2, k // 4
        assert (facts["steps"], facts["seed"], facts["prompt"]) == (
            1 + ix,
            1 + iy,
            ("a red apple", "a green apple")[iz],
        )
        cell[ix, iy, iz] = np.asarray(image.convert("RGB"))
    h, w = cell[0, 0, 0].shape[:2]
    sub = grid.shape[1] // 2  # each Z value's sub-grid: its Y labels, then 2 cells across
    for (ix, iy, iz), pixels in cell.items():
        left, top = iz * sub + sub - (2 - ix) * w, grid.shape[0] - (2 - iy) * h
        assert np.array_equal(grid[top : top + h, left : left + w], pixels), (ix, iy, iz)
    assert (grid[:, :, :] == 255).all(axis=-1)[: grid.shape[0] - 2 * h].mean() > 0.5  # the labels' white margin
    for ix, iy, iz in [(0, 1, 0), (1, 0, 1)]:
        alone = tmp_path / f"alone-{ix}{iy}{iz}"
        prompt = ("a red apple", "a green apple")[iz]
        args = ["--prompt", prompt, "--steps", 1 + ix, "--seed", 1 + iy, "--scale", 3, "--outdir", alone]
        assert cli(*args) == 0
        assert np.array_equal(np.asarray(Image.open(alone / "00000.png").convert("RGB")), cell[ix, iy, iz])


def test_the_web_page_plot_gives_the_command_line_s_cells_and_grid(tmp_path):
    """The txt2img tab's X/Y/Z fields: the gallery shows each cell and the grid, the same pictures as txt2img --xyz;
    a bad axis, or Z without Y, is the page's one-line error."""
    import gradio as gr

    from ldm import webui, webui_app

    argv = ["--device", "cpu", "--models-dir", str(tmp_path / "models"), "--outdir", str(tmp_path / "web")]
    args = webui.parse_args(argv)
    session = webui_app.Session(args)
    values = PAGE_VALUES | {
        "xyz_x": "steps=1,2",
        "xyz_y": "seed=1,2",
        "xyz_z": "",
    }
    *_, (_, gallery, _) = webui_app.generate(session, values, lambda *a, **k: None)
    names = [f"{k:05}.png" for k in range(4)] + ["xyz_grid-0000.png"]
    assert [Path(p).name for p in gallery] == names
    out = tmp_path / "cli"
    flags = ["--steps", 2, "--scale", 3, "--sampler", "ddim", "--seed", 1, "--xyz", "steps=1,2", "--xyz", "seed=1,2"]
    assert cli("--prompt", "a red apple", *flags, "--outdir", out) == 0
    for name in names:
        web, ours = (np.asarray(Image.open(folder / name).convert("RGB")) for folder in (args.outdir, out))
        assert np.array_equal(web, ours), name
    bad = {
        "seed=x": ("seed=1,2", "X/Y/Z plot Z seed: the values must be whole numbers, got 'x'"),
        "seed=3": ("", "X/Y/Z plot: fill the axes in order, X first (a Y axis before a Z axis)"),
    }
    for z, (y, message) in bad.items():
        with pytest.raises(gr.Error) as error:
            list(webui_app.generate(session, values | {"xyz_y": y, "xyz_z": z}, lambda *a, **k: None))
        assert error.value.message == message
