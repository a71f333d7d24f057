"""txt2img.py end to end on a tiny checkpoint: PNGs, their parameters, reruns, and one-line errors for bad input."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import txt2img
from conftest import ROOT, a1111, cli, randomize_
from ldm import cli as cli_names
from ldm import load_pipeline, pipeline, prompts, runtime
from ldm.checkpoint import save_single_file
from ldm.config import ModelConfig, load_config, to_dict
from ldm.model import StableDiffusion
from ldm.outputs import make_images, save_png
from ldm.request import OutputSpec, Request
from ldm.runtime import DTYPES, QUANTIZE
from ldm.samplers import SAMPLERS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 4-channel checkpoint, a 9-channel one, an init image (19x21: resized to 18x20), a mask, a non-image."""
    folder = tmp_path_factory.mktemp("cli")
    for channels in (4, 9):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"unet.in_channels={channels}"])
        save_single_file(randomize_(StableDiffusion(cfg)).eval(), folder / f"tiny{channels}.safetensors")
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (21, 19, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = np.zeros((21, 19), np.uint8)
    mask[5:15, 4:12] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.new("L", (16, 16)).save(folder / "small-mask.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "init.png").read_bytes()[:60])
    return folder


def rerun_args(facts: dict, ckpt, outdir) -> list:
    """The CLI arguments that remake the batch an image came from, from its JSON parameters."""
    args = [
        "--ckpt",
        ckpt,
        "--outdir",
        outdir,
        "--prompt",
        facts["prompt"],
        "--negative-prompt",
        facts["negative_prompt"],
        "--steps",
        facts["steps"],
        "--sampler",
        facts["sampler"],
        "--scale",
        facts["scale"],
        "--eta",
        facts["eta"],
        "--seed",
        facts["seed"] - facts["batch_pos"],
        "--n-samples",
        facts["batch_size"],
        "--H",
        facts["height"],
        "--W",
        facts["width"],
        "--dtype",
        facts["dtype"],
        "--guidance-rescale",
        facts["guidance_rescale"],
    ]
    if "init_image" in facts:
        args += ["--init-image", facts["init_image"], "--strength", facts["strength"]]
    if "mask" in facts:
        args += ["--mask", facts["mask"]]
    return args


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_pngs_carry_their_parameters_and_rerun_bit_for_bit(files, tmp_path, mode, capsys):
    ckpt = files / ("tiny9.safetensors" if mode == "inpaint" else "tiny4.safetensors")
    extra = {
        "txt2img": ["--sampler", "euler_a"],
        "img2img": ["--init-image", files / "init.png", "--strength", 0.5, "--sampler", "ddim", "--eta", 0.3],
        "inpaint": ["--init-image", files / "init.png", "--mask", files / "mask.png", "--sampler", "dpmpp_2m_karras"],
    }[mode]
    out = tmp_path / "out"
    assert (
        cli(
            "--ckpt",
            ckpt,
            "--prompt",
            "a red, ripe apple",
            "--negative-prompt",
            "blurry",
            "--steps",
            3,
            "--seed",
            7,
            "--n-samples",
            2,
            "--outdir",
            out,
            "--save-intermediates",
            *extra,
        )
        == 0
    )
    assert ("note: init image resized from 19x21 to 18x20" in capsys.readouterr().err) == (mode != "txt2img")
    assert sorted(p.name for p in out.iterdir()) == [
        "00000-trajectory.png",
        "00000.png",
        "00001-trajectory.png",
        "00001.png",
        "grid-0000.png",
    ]
    png = Image.open(out / "00001.png")
    facts = json.loads(png.text["ldm"])
    sampler = {"txt2img": "euler_a", "img2img": "ddim", "inpaint": "dpmpp_2m_karras"}[mode]
    w, h = (16, 16) if mode == "txt2img" else (18, 20)  # the model's default size, else the init image's (rounded)
    expected = {
        "prompt": "a red, ripe apple",
        "negative_prompt": "blurry",
        "steps": 3,
        "sampler": sampler,
        "scale": 7.5,
        "seed": 8,
        "width": w,
        "height": h,
        "model": ckpt.stem,
        "mode": mode,
        "batch_size": 2,
        "batch_pos": 1,
    }
    assert {k: facts[k] for k in expected} == expected
    text = a1111(png.text["parameters"])
    assert text["Prompt"] == "a red, ripe apple" and text["Negative prompt"] == "blurry"
    assert (text["Steps"], text["Seed"], text["Size"], text["CFG scale"]) == ("3", "8", f"{w}x{h}", "7.5")
    assert text["Sampler"] == {"txt2img": "Euler a", "img2img": "DDIM", "inpaint": "DPM++ 2M Karras"}[mode]
    assert text["Model hash"] == facts["model_hash"] and len(facts["model_hash"]) == 10
    if mode != "txt2img":
        assert float(text["Denoising strength"]) == facts["strength"] == (0.5 if mode == "img2img" else 1.0)
    frames = 2 if mode == "img2img" else 4  # z_t of each step run (strength 0.5: 1 of 3), then z_0
    assert Image.open(out / "00001-trajectory.png").size == (w * frames, h)
    assert cli(*rerun_args(facts, ckpt, tmp_path / "again")) == 0
    assert np.array_equal(pixels(tmp_path / "again" / "00001.png"), pixels(out / "00001.png"))


def test_existing_files_are_never_overwritten(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00003.png").write_bytes(b"mine")
    (out / "grid-0000.png").write_bytes(b"my grid")
    assert (
        cli(
            "--ckpt",
            files / "tiny4.safetensors",
            "--prompt",
            "x",
            "--steps",
            2,
            "--n-iter",
            2,
            "--outdir",
            out,
            "--no-metadata",
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "00003.png",
        "00004.png",
        "00005.png",
        "grid-0000.png",
        "grid-0001.png",
    ]
    assert (out / "00003.png").read_bytes() == b"mine" and (out / "grid-0000.png").read_bytes() == b"my grid"
    assert "parameters" not in Image.open(out / "00004.png").text  # --no-metadata


def test_quantize_int8(files, tmp_path):
    out = tmp_path / "out"
    assert (
        cli(
            "--ckpt",
            files / "tiny4.safetensors",
            "--prompt",
            "a cat",
            "--steps",
            2,
            "--quantize",
            "int8",
            "--outdir",
            out,
        )
        == 0
    )
    assert json.loads(Image.open(out / "00000.png").text["ldm"])["quantize"] == "int8"


def test_prompts_from_file(files, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\n")
    assert (
        cli(
            "--ckpt",
            files / "tiny4.safetensors",
            "--from-file",
            tmp_path / "prompts.txt",
            "--steps",
            2,
            "--outdir",
            tmp_path / "out",
            "--skip-grid",
        )
        == 0
    )
    assert [json.loads(Image.open(tmp_path / "out" / f"0000{i}.png").text["ldm"])["prompt"] for i in (0, 1)] == [
        "a cat",
        "a dog",
    ]
    assert not list((tmp_path / "out").glob("grid-*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init-image", "{f}/missing.png"], "image not found"),
        (["--init-image", "{f}/truncated.png"], "cannot read image"),
        (["--init-image", "{f}/notes.txt"], "is not an image file"),
        (["--init-image", "{f}"], "cannot read image"),
        (["--init-image", "{f}/init.png", "--mask", "{f}/small-mask.png"], "the mask is 16x16 but the image is 19x21"),
        (["--init-image", "{f}/init.png", "--strength", "0"], r"strength must be in \(0, 1\]"),
        (["--init-image", "{f}/init.png", "--strength", "1.2"], r"strength must be in \(0, 1\]"),
        (["--init-image", "{f}/init.png", "--strength", "0.1", "--steps", "5"], "leaves no denoising step"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--sampler", "k_lms"], "invalid choice: 'k_lms'"),
        (["--H", "21"], "multiples of 2"),
        (["--steps", "x"], "invalid int value"),
        (["--ckpt", "{f}/nope.safetensors"], "checkpoint not found"),
        (["--ckpt", "{f}/notes.txt"], "is not a safetensors file, a PyTorch checkpoint or a diffusers folder"),
        (["--outdir", "{f}/notes.txt"], "is a file"),
        (["--outdir", "{f}/notes.txt/sub"], "notes.txt is a file, not a folder"),  # unwritable, even for root
        (["--outdir", "{f}/out/" + "x" * 300], "cannot write there"),  # its parent can be made, it cannot
        (["--steps", "0"], "steps must be at least 1, got 0"),
        (["--steps", "-1"], "steps must be at least 1, got -1"),
        (["--steps", "1001"], "this model has 1000 diffusion timesteps, so at most that many steps"),
        (["--n-samples", "0"], "nothing to generate"),
        (["--n-iter", "0"], "--n-iter must be at least 1"),
        (["--scale", "nan"], "--scale must be a finite number, got nan"),
        (["--eta", "inf"], "--eta must be a finite number, got inf"),
        (["--guidance-rescale", "2"], r"guidance rescale must be in \[0, 1\]"),
        (["--H", "0"], "--H must be a positive number of pixels, got 0"),
        (["--W", "-16"], "--W must be a positive number of pixels, got -16"),
        (["--seed", str(2**64 - 1), "--n-samples", "2"], r"the seeds of the images must lie in \[-2\*\*63, 2\*\*64\)"),
        (["--negative-prompt", "caf\udce9"], "--negative-prompt is not UTF-8 text"),  # bytes that are not UTF-8 in argv
        (["--from-file", "{f}/missing.txt"], "cannot read prompts from"),
        (["--from-file", "/dev/zero"], "is over 1 MiB"),  # read up to a bound, not forever
        (["--from-file", "{f}/truncated.png"], "cannot read prompts from"),  # not UTF-8
        (["--config", "{f}/missing.yaml"], "cannot read config file"),
        (["--init-image", "{f}/init.png", "--mask", "{f}/missing.png"], "image not found"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["--quantize", "int4"], "invalid choice: 'int4'"),
        (["--quantize", "int8", "--dtype", "bf16"], "CPU and fp32 only"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(files, args, message, capsys):
    args = [a.format(f=files) for a in args]
    ckpt = [] if "--ckpt" in args else ["--ckpt", str(files / "tiny4.safetensors")]
    prompt = [] if "--from-file" in args else ["--prompt", "x"]
    try:
        code = cli(*prompt, "--steps", "2", "--outdir", files / "out", *ckpt, *args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and re.search(message, err) and len(err.splitlines()) == 1, err
    assert not (files / "out").exists()


def test_a_full_disk_while_writing_an_image_is_one_line_and_leaves_no_partial_file(
    files, tmp_path, monkeypatch, capsys
):
    def fill_the_disk(image, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", fill_the_disk)
    assert cli("--ckpt", files / "tiny4.safetensors", "--prompt", "x", "--steps", 2, "--outdir", tmp_path) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"error: cannot write {tmp_path / '00000.png'}: No space left on device"
    )
    assert not list(tmp_path.iterdir())


def test_the_script_fails_cleanly_in_a_real_process(files):
    r = subprocess.run(
        [sys.executable, "txt2img.py", "--prompt", "x", "--ckpt", files / "nope.safetensors"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: checkpoint not found: {files / 'nope.safetensors'}"


def test_ctrl_c_stops_with_one_line_and_keeps_the_images_written(files, tmp_path):
    out = tmp_path / "out"
    args = ["--ckpt", files / "tiny4.safetensors", "--prompt", "x", "--steps", "20", "--n-iter", "200", "--outdir", out]
    p = subprocess.Popen([sys.executable, "txt2img.py", *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # 00002.png begun: 00000 and 00001 are whole (one PNG is opened after the last is closed), and a PNG cut off
    # mid-write by Ctrl-C is removed
    while not (out / "00002.png").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    written = sorted(out.glob("*.png"))
    assert 2 <= len(written) < 200
    for path in written:  # whole images: none cut off mid-write
        with Image.open(path) as im:
            im.load()


def test_help_imports_neither_torch_nor_diffusers():
    code = (
        "import runpy, sys; sys.argv = ['txt2img.py', '--help']\n"
        "try: runpy.run_path('txt2img.py', run_name='__main__')\n"
        "except SystemExit: print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--outpaint", "8,0,0,0"], "--outpaint needs --init-image"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--cfg-end", "1.5"], r"--cfg-end must be in \[0, 1\]"),
        (["--seed", str(2**64 - 1), "--n-iter", "2"], r"the seeds of the images must lie in"),
        (["--controlnet", "missing.pth", "--control-image", "x.png"], "--controlnet missing.pth: no such file"),
    ],
)
def test_input_that_needs_no_model_fails_before_torch_is_imported(tmp_path, args, message):
    """The issue's list: a missing --init-image, --steps 0... answer in one line, exit 2, without importing torch."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['txt2img.py', '--prompt', 'x', '--outdir', {str(tmp_path / 'out')!r}, *{args!r}]\n"
        "try: runpy.run_path('txt2img.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print(e.code, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "2 []", r.stdout + r.stderr
    assert re.search(message, r.stderr) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_cfg_end_is_in_the_png_and_reruns(files, tmp_path):
    """--cfg-end F: guidance on the first F of the steps only (ldm.denoiser); the PNG records it ("CFG end" in
    A1111's text only when it is not 1), and the recorded value remakes the image (what it changes:
    test_pipeline.py's test against diffusers)."""
    args = ["--ckpt", files / "tiny4.safetensors", "--prompt", "x", "--steps", 4, "--scale", 7]
    assert cli(*args, "--cfg-end", 0.25, "--outdir", tmp_path / "a") == 0
    assert cli(*args, "--outdir", tmp_path / "b") == 0
    truncated, full = Image.open(tmp_path / "a" / "00000.png"), Image.open(tmp_path / "b" / "00000.png")
    assert (
        json.loads(truncated.text["ldm"])["cfg_end"] == 0.25
        and a1111(truncated.text["parameters"])["CFG end"] == "0.25"
    )
    assert "cfg_end" not in json.loads(full.text["ldm"]) and "CFG end" not in a1111(full.text["parameters"])
    facts = json.loads(truncated.text["ldm"])
    assert cli(*args, "--cfg-end", facts["cfg_end"], "--outdir", tmp_path / "c") == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c" / "00000.png")), np.asarray(truncated))


def test_the_choices_known_before_torch_loads_are_the_pipelines():
    assert cli_names.SAMPLER_NAMES == tuple(SAMPLERS)
    assert cli_names.DTYPE_NAMES == (*DTYPES, "auto") and cli_names.QUANTIZE_NAMES == QUANTIZE
    assert cli_names.SYNTAX_NAMES == prompts.SYNTAX_NAMES


def test_the_readme_api_snippet_runs():
    readme = (ROOT / "docs" / "loading.md").read_text(encoding="utf-8")
    snippet = re.search(r"## Loading models\n+```python\n(.*?)```", readme, re.S).group(1)
    names = {}
    exec(snippet, names)
    assert tuple(names["context"].shape) == (1, 77, 384) and "(1, 77, 384)" in snippet
    assert names["eps"].shape == names["latents"].shape == (1, 4, 8, 8)
    assert tuple(names["image"].shape) == (1, 3, 32, 32)


TRICKY = st.lists(
    st.one_of(
        st.text(max_size=6),
        st.sampled_from(
            [
                "Negative prompt:",
                "Negative prompt: ",
                "Steps: 3",
                "Seed:",
                ", ",
                ",",
                ":",
                "\n",
                "\r\n",
                " ",
                '"',
                "'",
                "\\",
                '\\"',
                "\u2028",
                "\x00",
                "é",
                "🍎",
                "Model: x, Size: 1x1",
            ]
        ),
    ),
    max_size=8,
).map("".join)


def a1111_keeps(text: str) -> bool:
    """What AUTOMATIC1111's text format carries exactly: no line of a prompt starting "Negative prompt:", no blank
    around a line nor the whole (its reader strips them)."""
    return text == text.strip() and all(
        line == line.strip() and not line.startswith("Negative prompt:") for line in text.split("\n")
    )


@settings(max_examples=300, deadline=None)
@given(
    prompt=TRICKY,
    negative=TRICKY,
    model=TRICKY,
    seed=st.integers(-(2**63), 2**64 - 1),
    scale=st.floats(-1e3, 1e3),
    sampler=st.sampled_from(list(SAMPLERS)),
)
def test_png_parameters_round_trip(prompt, negative, model, seed, scale, sampler):
    """Any prompt, negative prompt and model name (unicode, newlines, quotes, backslashes, NUL, A1111's own key
    words) comes back exactly from the JSON chunk; from the A1111 text, AUTOMATIC1111's reader gets every pair back
    exactly, and the prompts whenever its format can carry them (a1111_keeps)."""
    facts = {
        "mode": "txt2img",
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": 20,
        "sampler": sampler,
        "scale": scale,
        "eta": 0.0,
        "guidance_rescale": 0.0,
        "model": model,
        "model_hash": "0123456789",
        "batch_size": 2,
        "dtype": "fp32",
        "device": "cpu",
        "seed": seed,
        "width": 512,
        "height": 768,
        "batch_pos": 1,
    }
    with (
        tempfile.TemporaryDirectory() as folder,
        Image.open(save_png(Image.new("RGB", (1, 1)), Path(folder) / "x.png", facts)) as png,
    ):
        png.load()
        assert json.loads(png.text["ldm"]) == facts
        text = a1111(png.text["parameters"])
    pairs = {
        "Steps": "20",
        "Sampler": SAMPLERS[sampler][2],
        "CFG scale": str(scale),
        "Seed": str(seed),
        "Size": "512x768",
        "Model hash": "0123456789",
        "Model": model,
        "Batch size": "2",
        "Batch pos": "1",
    }
    assert {k: v for k, v in text.items() if k not in ("Prompt", "Negative prompt")} == pairs
    if a1111_keeps(prompt) and a1111_keeps(negative):
        assert (text["Prompt"], text["Negative prompt"]) == (prompt, negative)


@pytest.mark.parametrize("size", [["--H", "1000000"], ["--H", "100000", "--W", "100000"], ["--n-samples", "10000000"]])
def test_work_that_does_not_fit_in_memory_is_refused_before_loading(tmp_path, size, monkeypatch, capsys):
    """An SD v1 checkpoint (its config in the header; its weights never read) asked for images whose estimated memory
    exceeds what the machine has: one line with the estimate and the limit, exit 2, the model never loaded."""
    ckpt = tmp_path / "sd.safetensors"
    save_file({"unused": torch.zeros(1)}, ckpt, metadata={"ldm_config": json.dumps(to_dict(ModelConfig()))})
    monkeypatch.setattr(txt2img, "load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    assert cli("--ckpt", ckpt, "--prompt", "x", "--outdir", tmp_path / "out", *size) == 2
    err = capsys.readouterr().err.strip()
    estimate = r"error: \d+ image\(s\) of \d+x\d+ need about [\d.]+ GiB of memory beside the weights, "
    assert re.fullmatch(estimate + r"more than the [\d.]+ GiB available \(cpu\)", err), err


def test_the_models_sampling_defaults_fill_what_is_not_given(files, tmp_path):
    """A model whose config carries sampling defaults: txt2img.py uses them for the flags not given (the PNG says so
    and equals the image made with them spelt out); a flag still wins; a model without them keeps SD v1's."""
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", ["sampling.sampler=euler", "sampling.steps=7", "sampling.scale=3"]
    )
    ckpt = tmp_path / "tuned.safetensors"
    save_single_file(randomize_(StableDiffusion(cfg)).eval(), ckpt)
    base = ["--ckpt", ckpt, "--prompt", "a cat", "--H", "16", "--W", "16"]
    assert cli(*base, "--outdir", tmp_path / "a") == 0
    assert cli(*base, "--outdir", tmp_path / "b", "--sampler", "euler", "--steps", "7", "--scale", "3") == 0
    assert cli(*base, "--outdir", tmp_path / "c", "--steps", "4") == 0
    facts = [json.loads(Image.open(tmp_path / d / "00000.png").text["ldm"]) for d in "abc"]
    assert [(f["sampler"], f["steps"], f["scale"]) for f in facts] == [("euler", 7, 3.0)] * 2 + [("euler", 4, 3.0)]
    assert np.array_equal(pixels(tmp_path / "a" / "00000.png"), pixels(tmp_path / "b" / "00000.png"))
    sd = ["--ckpt", files / "tiny4.safetensors", "--prompt", "a cat", "--H", "16", "--W", "16", "--outdir", tmp_path]
    assert cli(*sd, "--steps", "2") == 0
    facts = json.loads(Image.open(tmp_path / "00000.png").text["ldm"])
    assert (facts["sampler"], facts["scale"]) == ("ddim", 7.5) and ModelConfig().sampling.steps == 50


@pytest.mark.parametrize(
    "flags, dtype",
    [("fpu sse avx512f avx512_bf16 amx_tile", "bf16"), ("fpu amx_bf16 amx_tile", "bf16"), ("fpu avx2 avx512f", "fp32")],
)
def test_dtype_auto_picks_bf16_where_the_cpu_has_bf16_kernels(files, tmp_path, monkeypatch, capsys, flags, dtype):
    """--dtype auto reads the CPU's flags (here a made-up /proc/cpuinfo), says once what it chose and why, and the PNG
    records the dtype it ran in."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    assert runtime.auto_dtype("cpu")[0] == dtype and runtime.auto_dtype("cuda")[0] == "fp16"
    out = tmp_path / "out"
    args = ["--ckpt", files / "tiny4.safetensors", "--prompt", "x", "--steps", 1, "--dtype", "auto", "--outdir", out]
    assert cli(*args, "--n-samples", 2, "--skip-grid") == 0
    err = capsys.readouterr().err
    assert err.count("note: --dtype auto") == 1 and f"auto: {dtype} (this CPU has " in err
    assert json.loads(Image.open(out / "00001.png").text["ldm"])["dtype"] == dtype


def test_images_are_written_as_their_sub_batch_is_made(files, tmp_path, monkeypatch):
    """Sub-batches are sized at the throughput knee (SUB_BATCH_LATENTS, here two 16 px images) and each one's PNGs
    are written before the next starts: a long run shows its first images at once. The same images as one batch."""
    out, seen = tmp_path / "out", []
    pipe = load_pipeline(files / "tiny4.safetensors")
    request = Request("x", n_samples=5, steps=2, seed=3)
    whole = pipe.generate(request, progress=False)
    monkeypatch.setattr(pipeline, "SUB_BATCH_LATENTS", 2 * 8 * 8)
    spec = OutputSpec(out, grid=False, metadata=False)
    paths = list(make_images(pipe, request, spec, {}, callback=lambda *_: seen.append(len(list(out.glob("*.png"))))))
    assert seen == [0, 0, 2, 2, 4, 4] and [p.name for p in paths] == [f"0000{i}.png" for i in range(5)]
    assert all(np.array_equal(np.asarray(Image.open(p)), np.asarray(image)) for p, image in zip(paths, whole))
