"""train_unet.py --controlnet: a ControlNet trained beside the frozen model of init_from (the ControlNet paper's
recipe), on fill50k-style data (a `conditioning_image` column) or canny edges, from images or the latent cache; its
file read by txt2img.py --controlnet and by diffusers' ControlNetModel."""

import json
import shutil
import signal

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_controlnet import FACTOR8, controlnet_config
from test_train_unet import CONFIG, assert_same, finish, run, run_here, start, wait_for

import train_unet
from conftest import ROOT, cli, run_in_process
from ldm.checkpoint import load_model, save_single_file
from ldm.config import load_config
from ldm.controlnet import PREFIX, ControlNet, controlnet_key_map, load_controlnet
from ldm.model import StableDiffusion


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """fill50k in small: 12 discs of a colour on white at random places, each with its control image (the disc's
    outline, white on black, in cond/) named by `conditioning_image`."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "cond").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        x, y, r = *rng.integers(4, 12, 2), int(rng.integers(2, 5))
        colour = ("red", (220, 40, 40)) if i % 2 else ("blue", (40, 60, 220))
        image, control = Image.new("RGB", (16, 16), "white"), Image.new("RGB", (16, 16), "black")
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colour[1])
        ImageDraw.Draw(control).ellipse((x - r, y - r, x + r, y + r), outline="white")
        image.save(root / f"{i:02d}.png")
        control.save(root / "cond" / f"{i:02d}.png")
        rows.append(
            {"file_name": f"{i:02d}.png", "conditioning_image": f"cond/{i:02d}.png", "text": f"a {colour[0]} disc"}
        )
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_single_file(StableDiffusion(load_config(ROOT / "configs" / "tiny.yaml")), path)
    return path


def args(shapes, init, out, *extra) -> list[str]:
    return [
        f"data.path={shapes}",
        f"init_from={init}",
        "--controlnet",
        "batch_size=4",
        "max_steps=4",
        "save_every=1",
        "log_every=1",
        "deterministic=true",
        "ema.decay=0.9",
        "optim.lr=1e-3",  # far above the recipe's 1e-5: four steps must move the ControlNet
        "optim.warmup_steps=2",
        "validation.every=0",
        f"output_dir={out}",
        *extra,
    ]


def test_the_controlnet_starts_as_a_copy_of_the_encoder_with_zero_residuals(init):
    """Initialised from the UNet: its encoder and middle block bit for bit, zero convs and middle_block_out zero, the
    hint block random; so the first prediction with the ControlNet is the frozen UNet's alone, bit for bit."""
    model = load_model(init)
    net = ControlNet.from_unet(model.unet, model.cfg)
    unet_state = model.unet.state_dict()
    for name, tensor in net.state_dict().items():
        if name.startswith(("zero_convs", "middle_block_out")):
            assert not tensor.any(), name
        elif name.startswith("input_hint_block"):
            assert tensor.std() > 0, name
        else:
            assert torch.equal(tensor, unet_state[name]), name
    g = torch.Generator().manual_seed(0)
    x, hint, context = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 16, 16, generator=g), None
    context = model.text_encoder.encode(["a red disc", "a blue disc"])
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, context, control=net(x, hint, t, context)), model.unet(x, t, context))


def test_only_the_controlnet_trains_and_its_checkpoints_hold_it_alone(tmp_path, shapes, init, monkeypatch, capsys):
    """After a run (with validation images: control map | generated), every tensor of the VAE, text encoder and UNet is
    bit for bit init_from's; the ControlNet started as ControlNet.from_unet and moved; the training checkpoints hold
    the ControlNet's tensors alone."""
    built = []
    monkeypatch.setattr(train_unet, "StableDiffusion", lambda cfg: built.append(StableDiffusion(cfg)) or built[-1])
    out = tmp_path / "run"
    argv = ["--config", str(CONFIG), "tracker=none", *args(shapes, init, out, "max_steps=2", "validation.every=2")]
    argv += ["validation.steps=2", "validation.prompts=[a red disc,a blue disc]"]
    assert run_in_process(train_unet, argv) == 0
    assert_same(built[0].state_dict(), load_model(init).state_dict())
    trained = load_file(out / "controlnet.safetensors")
    assert all(k.startswith(PREFIX) for k in trained)
    assert trained[PREFIX + "zero_convs.0.0.weight"].any() and trained[PREFIX + "middle_block_out.0.weight"].any()
    state = load_file(out / "checkpoints" / "step-000002" / "state" / "model.safetensors")
    assert {PREFIX + k for k in state} == trained.keys()
    assert not list((out / "checkpoints" / "step-000002" / "state").glob("model_1*"))
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.size == (4 * 16, 16)  # map | image, map | image
    control = np.asarray(grid.crop((0, 0, 16, 16)))
    assert set(np.unique(control)) <= {0, 255} and control.max() == 255  # the outline of item 0
    config = json.loads((out / "config.json").read_text())
    assert config["controlnet"]["enabled"] is True

    assert "0 files skipped" in capsys.readouterr().out  # the control images are listed, in their column


def test_a_run_can_start_from_a_controlnet_file(tmp_path, shapes, init, monkeypatch):
    """controlnet.init_from: the ControlNet starts as the file (here an fp16 copy of an earlier run's), bit for bit
    after the cast, and trains from there (a missing file: test_bad_input_is_one_line_and_exit_code_2)."""
    first = tmp_path / "first"
    assert run_in_process(train_unet, ["--config", str(CONFIG), "tracker=none", *args(shapes, init, first)]) == 0
    from ldm.convert import main as convert

    assert convert([str(first / "controlnet.safetensors"), str(half := tmp_path / "half.safetensors"), "--half"]) == 0
    started, load = [], train_unet.load_controlnet

    def recording(*a):
        net = load(*a)
        started.append({k: v.clone() for k, v in net.state_dict().items()})  # before training changes it
        return net

    monkeypatch.setattr(train_unet, "load_controlnet", recording)
    out = tmp_path / "again"
    argv = ["--config", str(CONFIG), "tracker=none", *args(shapes, init, out, f"controlnet.init_from={half}")]
    assert run_in_process(train_unet, argv) == 0
    (start,) = started
    assert {PREFIX + k for k in start} == load_file(half).keys()
    for key, value in load_file(half).items():
        assert torch.equal(start[key.removeprefix(PREFIX)].half(), value), key
    trained = load_file(out / "controlnet.safetensors")
    assert any(not torch.equal(trained[k].half(), v) for k, v in load_file(half).items())  # it trained on


def test_the_default_lr_of_the_mode_is_1e_5_unless_set(tmp_path, init):
    (tmp_path / "train.yaml").write_text("max_steps: 1\n")
    for extra, lr in (([], 1e-5), (["optim.lr=3e-5"], 3e-5)):
        argv = ["--config", str(tmp_path / "train.yaml"), "--controlnet", f"init_from={init}", *extra]
        cfg, _ = train_unet.load_train_config(train_unet.parse_args(argv))
        assert cfg.optim.lr == lr
    cfg, _ = train_unet.load_train_config(train_unet.parse_args(["--config", str(tmp_path / "train.yaml")]))
    assert cfg.optim.lr == 1e-4


def test_a_controlnet_run_resumes_exactly_from_the_latent_cache(tmp_path, shapes, init):
    """Uninterrupted vs. stopped by SIGTERM and resumed, from the latent cache (control maps in it): the same
    checkpoints (ControlNet, EMA) and controlnet.safetensors bit for bit."""
    common = ["--cache-latents", f"cache_dir={tmp_path / 'cache'}", "data.random_flip=true"]
    run(*args(shapes, init, tmp_path / "straight", *common))
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    proc = start(*args(shapes, init, tmp_path / "interrupted", *common))
    wait_for(lambda: (checkpoints / "step-000002").exists(), proc, interval=0.01)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    stopped = max(int(p.name[5:]) for p in checkpoints.glob("step-??????"))
    assert f"SIGTERM: stopped at step {stopped}" in out and stopped < 4
    out = run(*args(shapes, init, tmp_path / "interrupted", *common), "--resume", "latest")
    assert f"resumed from {checkpoints / f'step-{stopped:06d}'}" in out
    for name in ("state/model.safetensors", "controlnet.safetensors"):
        a, b = (load_file(tmp_path / d / "checkpoints" / "step-000004" / name) for d in ("interrupted", "straight"))
        assert_same(a, b)
    assert_same(*(load_file(tmp_path / d / "controlnet.safetensors") for d in ("interrupted", "straight")))


def test_two_processes_match_one_with_twice_the_batch(tmp_path, shapes, init):
    one = run(*args(shapes, init, tmp_path / "one", "max_steps=2", "batch_size=8"))
    two = run(*args(shapes, init, tmp_path / "two", "max_steps=2", "batch_size=4"), processes=2)
    assert "2 process(es)" in two and "1 process(es)" in one
    assert_same(*(load_file(tmp_path / d / "controlnet.safetensors") for d in ("two", "one")), exact=False)


def test_a_canny_controlnet_loads_in_txt2img_and_in_diffusers(tmp_path, shapes):
    """An f=8 model (64-pixel images, lllyasviel's 8x hint block) trained with controlnet.preprocess=canny: its file
    is what diffusers' ControlNetModel.from_single_file reads into the same tensors, and txt2img.py --controlnet
    draws with it."""
    torch.manual_seed(0)
    base = StableDiffusion(load_config(ROOT / "configs" / "tiny.yaml", FACTOR8))
    save_single_file(base, tmp_path / "init.safetensors")
    extra = ["controlnet.preprocess=canny", "data.resolution=64", "max_steps=1", "batch_size=2"]
    run_here(*args(shapes, tmp_path / "init.safetensors", tmp_path / "run", *extra), *[f"model.{o}" for o in FACTOR8])
    path = tmp_path / "run" / "controlnet.safetensors"
    ours = load_controlnet(path, base.cfg)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps(controlnet_config(base.cfg)))
    theirs = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    their_state = theirs.state_dict()
    mapping = controlnet_key_map(ours)
    for name, tensor in ours.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        prefix = max((p for p in mapping if module == p or module.startswith(p + ".")), key=len)
        assert torch.equal(their_state[mapping[prefix] + module[len(prefix) :] + "." + leaf], tensor), name
    Image.open(shapes / "03.png").resize((64, 64)).save(tmp_path / "control.png")
    cmd = ["--ckpt", tmp_path / "init.safetensors", "--prompt", "a red disc", "--H", 64, "--W", 64, "--steps", 2]
    cmd += ["--controlnet", path, "--control-image", tmp_path / "control.png", "--control-preprocess", "canny"]
    assert cli(*cmd, "--outdir", tmp_path / "out") == 0
    assert Image.open(tmp_path / "out" / "00000.png").size == (64, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", "conditioning_image 'cond/missing.png' of '00.png' is not found"),
        ("controlnet.preprocess=sobel", "controlnet.preprocess must be one of none, canny, got 'sobel'"),
        ("no-init", "a ControlNet (controlnet.enabled) trains beside a trained, frozen model: it needs init_from"),
        ("controlnet.conditioning_column=depth", "00.png has no 'depth' in its metadata (12 images lack one)"),
        ("controlnet.init_from=nowhere.safetensors", "checkpoint not found: nowhere.safetensors"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(change, message, tmp_path, shapes, init, capsys):
    data = shapes
    if change == "missing":
        data = tmp_path / "data"
        shutil.copytree(shapes, data)
        lines = (shapes / "metadata.jsonl").read_text().splitlines()
        row = json.loads(lines[0]) | {"conditioning_image": "cond/missing.png"}
        (data / "metadata.jsonl").write_text("\n".join([json.dumps(row), *lines[1:]]))
    argv = ["--config", str(CONFIG), *args(data, init, tmp_path / "out")]
    if change == "no-init":
        argv = [a for a in argv if not a.startswith("init_from=")]
    elif change != "missing":
        argv.append(change)
    assert train_unet.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_controlnet_run_does_not_resume_a_unet_run(tmp_path, shapes, init, capsys):
    common = [f"data.path={shapes}", f"init_from={init}", f"output_dir={tmp_path / 'run'}", "validation.every=0"]
    run_here(*common, "max_steps=1", "batch_size=2")
    capsys.readouterr()  # that run's output: the check below reads the second one's alone
    assert (
        train_unet.main(["--config", str(CONFIG), "tracker=none", *common, "--controlnet", "--resume", "latest"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it trained the UNet, this run a ControlNet (controlnet.enabled)" in err, err
