"""train_unet.py through its real command line, on tiny generated datasets.

Every run is a subprocess (one process, or two over gloo with `accelerate launch --multi_gpu`, which on a
machine without GPUs runs DDP on the CPU); the bad-input checks call the script's main() in this process.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ldm.io
import train_unet
import txt2img
from conftest import (
    ROOT,
    WATCH_OPENS,
    check_corpus_run,
    generators,
    launcher,
    run_in_process,
    tiny_model,
    write_bad_corpus,
)
from ldm import DEFAULT_MODEL
from ldm.checkpoint import TEXT, UNET, load_model, save_diffusers_folder, save_single_file
from ldm.config import LCMTrainConfig, LoRAConfig, load_config
from ldm.consistency import LatentConsistency, LoRAForm
from ldm.convert import main as convert
from ldm.data import ImageCaptionDataset
from ldm.diffusion import Diffusion
from ldm.lora import diffusers_layer_names, save_lora
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.training import LoRATrainable

CONFIG = ROOT / "configs" / "train-unet-tiny.yaml"
ENV = os.environ | {
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}  # runs compared on one device kind
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def caption(colour: str) -> str:
    # The colour word repeated: the text encoder is random (no CLIP weights offline), and one differing token
    # among 77 is a faint signal for a UNet that trains for a minute; twenty are not.
    return " ".join([colour] * 20)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """32 noisy single-colour 20x16 images named by their captions, one corrupt file and one entry pointing outside."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(32):
        name = list(COLOURS)[i % 4]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 26, (16, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": [caption(name), f"a {name} picture"]})
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows += [{"file_name": "broken.png", "text": "broken"}, {"file_name": "../outside.png", "text": "escape"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def command(*args, processes=1):
    """The command line of a run, without a tracker unless args name one."""
    return launcher(processes) + [str(ROOT / "train_unet.py"), "--config", str(CONFIG), "tracker=none", *map(str, args)]


def start(*args, processes=1):
    return subprocess.Popen(
        command(*args, processes=processes),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, expect=0) -> str:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == expect, out[-3000:]
    return out


def run(*args, processes=1) -> str:
    return finish(start(*args, processes=processes))


def run_here(*args) -> None:
    """A one-process run through the script's main() in this process: no interpreter and imports to start (seconds
    each); the runs that need a process of their own (signals, several processes, compared outputs) use run()."""
    assert run_in_process(train_unet, ["--config", str(CONFIG), "tracker=none", *map(str, args)]) == 0


def wait_for(condition, proc, timeout=300, interval=0.001):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended first:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def unet_weights(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "state" / "model.safetensors")


def assert_same(a: dict, b: dict, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigterm_and_a_sigkill_mid_write_is_exact(tmp_path, colours):
    """Uninterrupted vs. stopped by SIGTERM, resumed, killed with SIGKILL while writing a checkpoint, resumed:
    the same weights and EMA at the last step, bit for bit. Eps prediction, images encoded on the fly."""
    common = [
        f"data.path={colours}",
        "max_steps=8",
        "save_every=1",
        "keep_last=2",
        "batch_size=4",
        "log_every=1",
        "deterministic=true",
        "ema.decay=0.9",
        "min_snr_gamma=5",
        "optim.lr_scheduler=cosine",
        "optim.warmup_steps=2",
    ]
    straight = start(*common, f"output_dir={tmp_path / 'straight'}")
    run_dir = tmp_path / "interrupted"
    checkpoints = run_dir / "checkpoints"
    proc = start(*common, f"output_dir={run_dir}")
    wait_for(lambda: (checkpoints / "step-000002").exists(), proc, interval=0.01)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    stopped = max(int(p.name[5:]) for p in checkpoints.glob("step-??????"))
    assert f"SIGTERM: stopped at step {stopped}" in out and stopped < 8 and not (run_dir / "model.safetensors").exists()

    proc = start(*common, f"output_dir={run_dir}", "--resume", "latest")
    torn = checkpoints / f"step-{stopped + 1:06d}.tmp"
    wait_for(torn.exists, proc)
    proc.kill()
    proc.wait()
    assert torn.exists()  # killed mid-write: the torn folder is left behind, the good ones are intact

    out = run(*common, f"output_dir={run_dir}", "--resume", "latest")
    assert f"resumed from {checkpoints / f'step-{stopped:06d}'} at step {stopped}" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000007", "step-000008"]  # keep_last=2, no .tmp left
    finish(straight)
    assert_same(unet_weights(run_dir, 8), unet_weights(tmp_path / "straight", 8))
    assert_same(load_file(run_dir / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors"))
    assert "skipped broken.png: unreadable" in out and "skipped ../outside.png: outside the dataset folder" in out

    model = load_model(run_dir / "model.safetensors")  # what txt2img.py --ckpt reads: the EMA UNet inside
    assert model.cfg.unet.model_channels == 32 and model.cfg.parameterization == "eps"
    assert convert([str(run_dir / "model.safetensors"), str(tmp_path / "diffusers")]) == 0
    assert (tmp_path / "diffusers" / "model_index.json").exists()


def start_in_terminal(*args, log: Path):
    """A run as from a terminal, in a process group of its own which a Ctrl-C signals whole (DataLoader workers too)."""
    return subprocess.Popen(
        command(*args), cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def test_ctrl_c_saves_and_resume_is_exact_and_a_second_ctrl_c_exits_at_once(tmp_path, colours):
    """Ctrl-C (SIGINT to the run's process group, its 2 DataLoader workers included, which ignore it): the run
    finishes its step, saves a checkpoint and exits 0; --resume latest then reaches an uninterrupted run's weights
    and EMA bit for bit. A second Ctrl-C ends the process at once (here during a slow validation)."""
    common = [
        f"data.path={colours}",
        "max_steps=6",
        "save_every=100",
        "batch_size=4",
        "log_every=1",
        "deterministic=true",
        "ema.decay=0.9",
        "data.num_workers=2",
    ]
    straight = start(*common, f"output_dir={tmp_path / 'straight'}")
    run_dir, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    proc = start_in_terminal(*common, f"output_dir={run_dir}", log=log)
    wait_for((run_dir / "metrics.jsonl").exists, proc, interval=0.01)  # step 1 is done
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    stopped = int(next(p.name[5:] for p in (run_dir / "checkpoints").iterdir()))
    assert "Ctrl-C: stopping after this step with a checkpoint" in out and "Traceback" not in out
    assert (
        f"Ctrl-C (SIGINT): stopped at step {stopped} after saving; continue with --resume latest" in out and stopped < 6
    )
    assert not (run_dir / "model.safetensors").exists()

    out = run(*common, f"output_dir={run_dir}", "--resume", "latest")
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped:06d}'} at step {stopped}" in out
    finish(straight)
    assert_same(unet_weights(run_dir, 6), unet_weights(tmp_path / "straight", 6))
    assert_same(load_file(run_dir / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors"))

    run_dir, log = tmp_path / "twice", tmp_path / "twice.log"
    proc = start_in_terminal(
        f"data.path={colours}",
        "batch_size=2",
        "log_every=1",
        "validation.every=1",
        "validation.steps=1000",
        "validation.prompts=[red]",
        f"output_dir={run_dir}",
        log=log,
    )
    wait_for((run_dir / "metrics.jsonl").exists, proc, interval=0.01)  # step 1 is logged: its validation runs
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(lambda: "Ctrl-C: stopping" in log.read_text(), proc, interval=0.01)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    assert proc.wait(timeout=60) == -signal.SIGINT and time.monotonic() - sent < 10
    assert "Traceback" not in log.read_text() and not list(run_dir.glob("checkpoints/step-??????"))


@pytest.mark.parametrize(
    "start_from, sig, file",
    [
        ("init", signal.SIGINT, "model.safetensors"),
        ("lora", signal.SIGTERM, "lora.safetensors"),
        ("scratch", signal.SIGINT, "model.safetensors"),
    ],
)
def test_a_stopped_fine_tune_leaves_its_weights_where_the_next_command_looks(
    tmp_path, colours, lora_init, start_from, sig, file
):
    """A fine-tune (init_from: the whole UNet, or a LoRA) stopped by Ctrl-C or SIGTERM writes the weights of the step it
    stopped at (the checkpoint's inference file, EMA weights in) into output_dir, as a finished run does, and says so;
    a run from scratch, whose early weights are no model yet, names the checkpoint's file instead."""
    start_args = {"init": [f"init_from={tmp_path / 'init.safetensors'}"], "scratch": []}
    start_args["lora"] = start_args["init"] + ["--lora", "4"]
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start_in_terminal(
        f"data.path={colours}",
        *start_args[start_from],
        "batch_size=2",
        "log_every=1",
        "validation.every=0",
        f"output_dir={run_dir}",
        log=log,
    )
    wait_for((run_dir / "metrics.jsonl").exists, proc, interval=0.01)  # step 1 is done
    os.killpg(proc.pid, sig)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    stopped = int(checkpoint.name[5:])
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C (SIGINT)"
    assert f"{name}: stopped at step {stopped} after saving; continue with --resume latest" in out
    weights = checkpoint / file if start_from == "scratch" else run_dir / file
    assert f"the weights of step {stopped}: {weights}\n" in out and "Traceback" not in out
    assert (run_dir / file).exists() == (start_from != "scratch")
    assert_same(load_file(weights), load_file(checkpoint / file))
    if start_from == "init":
        model = load_model(weights)  # what txt2img.py --ckpt reads: the fine-tuned UNet
        assert any(not torch.equal(a, b) for a, b in zip(model.unet.parameters(), lora_init.unet.parameters()))


def test_two_processes_match_one_with_twice_the_batch(tmp_path, colours):
    """DDP over gloo, batch 4 per process, against one process with batch 8; v prediction from the latent cache,
    which the first run builds and the second reuses (with gradient checkpointing, which changes no number).
    Only the main process writes checkpoints and logs."""
    common = [
        f"data.path={colours}",
        "--cache-latents",
        f"cache_dir={tmp_path / 'cache'}",
        "model.parameterization=v",
        "max_steps=3",
        "save_every=2",
        "log_every=1",
        "data.random_flip=true",
    ]
    one = run(*common, "batch_size=8", f"output_dir={tmp_path / 'one'}")
    assert "encoding 33 images into the latent cache" in one
    two = run(*common, "batch_size=4", "model.unet.use_checkpoint=true", f"output_dir={tmp_path / 'two'}", processes=2)
    assert "encoding" not in two and two.count("saved checkpoint") == 2
    assert_same(unet_weights(tmp_path / "two", 3), unet_weights(tmp_path / "one", 3), exact=False)
    assert_same(
        load_file(tmp_path / "two" / "model.safetensors"),
        load_file(tmp_path / "one" / "model.safetensors"),
        exact=False,
    )
    assert [m["step"] for m in metrics(tmp_path / "two")] == [1, 2, 3]
    for a, b in zip(metrics(tmp_path / "two"), metrics(tmp_path / "one")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    state = tmp_path / "two" / "checkpoints" / "step-000003" / "state"
    assert (state / "random_states_0.pkl").exists() and (state / "random_states_1.pkl").exists()
    assert "skipped broken.png: unreadable" in two


def test_x0_with_learned_sigma_from_a_checkpoint(tmp_path, colours, tiny_cfg):
    """Start from a checkpoint's VAE and text encoder with a fresh UNet that also predicts the variance; fp16 with
    loss scaling, gradient accumulation, validation images sampled with the learned variance, TensorBoard."""
    torch.manual_seed(0)
    init = StableDiffusion(tiny_cfg)
    save_single_file(init, tmp_path / "init.safetensors")
    run_here(
        f"data.path={colours}",
        f"init_from={tmp_path / 'init.safetensors'}",
        "reinit_unet=true",
        "--learn-sigma",
        "model.parameterization=x0",
        "offset_noise=0.1",
        "grad_accum=2",
        "max_steps=2",
        "batch_size=2",
        "log_every=1",
        "validation.every=1",
        "validation.steps=2",
        "validation.sampler=ddpm",
        "validation.prompts=[red,blue]",
        "mixed_precision=fp16",
        "tracker=tensorboard",
        f"output_dir={tmp_path / 'run'}",
    )
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.cfg.learn_sigma and model.cfg.unet.out_channels == 8 and model.cfg.parameterization == "x0"
    assert_same(model.vae.state_dict(), init.vae.state_dict())  # frozen
    assert all(np.isfinite(m["loss"]) for m in metrics(tmp_path / "run"))
    for step in (1, 2):  # a row of one 16x16 image per prompt, sampled with the learned variance
        assert Image.open(tmp_path / "run" / "validation" / f"step-{step:06d}.png").size == (32, 16)
    events = EventAccumulator(str(next((tmp_path / "run" / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert "validation" in events.Tags()["images"] and {"loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, colours):
    """lr 1e30 makes the weights infinite after step 1: later gradients are NaN, skipped, and the run gives up."""
    proc = start(
        f"data.path={colours}",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "max_nan_skips=1",
        "max_steps=5",
        "batch_size=2",
        f"output_dir={tmp_path / 'run'}",
    )
    out = finish(proc, expect=1)
    assert (
        "error: non-finite gradients for 2 steps in a row at step 3" in out
        and not (tmp_path / "run" / "model.safetensors").exists()
    )
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "state").is_dir()  # the last good state, resumable


def test_the_bad_input_corpus_is_skipped_named_and_summed_up(tmp_path):
    """Every file of conftest.write_bad_corpus is drawn (3 steps of 8 > 18 items) and used or skipped with its reason in
    the end-of-run summary; nothing outside the folder is opened; the 10,000-character caption warns once, briefly."""
    expected = write_bad_corpus(tmp_path / "data")
    args = [
        f"data.path={tmp_path / 'data'}",
        "max_steps=3",
        "batch_size=8",
        "caption_dropout=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    out = finish(
        subprocess.Popen(
            [sys.executable, "-c", WATCH_OPENS, str(tmp_path)] + command(*args)[1:],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
    check_corpus_run(out, expected, tmp_path)
    warned = [line for line in out.splitlines() if "truncated because CLIP" in line]
    assert len(warned) == 1 and len(warned[0]) < 400 and (tmp_path / "run" / "model.safetensors").exists()


def folder_digest(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_disk_full_while_writing_a_checkpoint(tmp_path, colours, monkeypatch, capsys, writer):
    """The disk fills up while checkpoint step 4 is written, halfway through a file, as the two writers report it:
    safetensors (our model.safetensors) with ENOSPC, torch.save (Accelerate's optimizer.bin) with an errno-less
    RuntimeError while the disk has no space left. The partial folder goes, step 2 stays intact and resumable,
    and the error is one line naming it."""
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    argv = [
        "--config",
        str(CONFIG),
        f"data.path={colours}",
        "max_steps=4",
        "save_every=2",
        "batch_size=2",
        "tracker=none",
        f"output_dir={run_dir}",
    ]
    before = {}

    def fill_the_disk(path):
        before.update(folder_digest(checkpoints / "step-000002"))
        Path(path).write_bytes(b"\0" * 1000)  # the part that fitted
        if writer == "safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    module, name = (ldm.io, "save_file") if writer == "safetensors" else (torch, "save")
    real = getattr(module, name)
    monkeypatch.setattr(
        module,
        name,
        lambda obj, path, *a, **k: fill_the_disk(path) if "step-000004.tmp" in str(path) else real(obj, path, *a, **k),
    )
    assert run_in_process(train_unet, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "error: the disk is full while writing checkpoint step-000004: "
        f"the previous checkpoint {checkpoints / 'step-000002'} is intact (--resume latest continues from it)"
    )
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"] and not (run_dir / "model.safetensors").exists()
    assert before and folder_digest(checkpoints / "step-000002") == before

    monkeypatch.undo()
    assert run_in_process(train_unet, argv + ["--resume", "latest"]) == 0
    assert f"resumed from {checkpoints / 'step-000002'} at step 2" in capsys.readouterr().out
    assert (
        sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000004"]
        and (run_dir / "model.safetensors").exists()
    )


def test_disk_full_while_writing_the_final_model(tmp_path, colours, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real = ldm.io.save_file

    def save_file(tensors, path, *args, **kwargs):
        if Path(path).parent != run_dir:
            return real(tensors, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ldm.io, "save_file", save_file)
    argv = [
        "--config",
        str(CONFIG),
        f"data.path={colours}",
        "max_steps=2",
        "batch_size=2",
        "tracker=none",
        f"output_dir={run_dir}",
    ]
    assert run_in_process(train_unet, argv) == 2
    last = run_dir / "checkpoints" / "step-000002" / "model.safetensors"
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"error: the disk is full while writing {run_dir / 'model.safetensors'}: {last} is the same model"
    )
    assert not [p for p in run_dir.iterdir() if "model.safetensors" in p.name] and load_model(
        last
    )  # no partial file left


@pytest.mark.compile
def test_compiled_unet_trains_as_the_eager_one(tmp_path, colours):
    """compile=true (Accelerate's dynamo_backend=inductor): about ten minutes of compiling on 2 CPU cores."""
    common = [f"data.path={colours}", "max_steps=3", "batch_size=2", "log_every=1"]
    compiled = start(*common, "compile=true", f"output_dir={tmp_path / 'compiled'}")
    run(*common, f"output_dir={tmp_path / 'eager'}")
    finish(compiled)
    for a, b in zip(metrics(tmp_path / "compiled"), metrics(tmp_path / "eager")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-3
        )
    eager, compiled = (
        load_file(tmp_path / "eager" / "model.safetensors"),
        load_file(tmp_path / "compiled" / "model.safetensors"),
    )
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["train-unet-tiny.yaml", "train-unet-sd-v1.yaml", "finetune-emoji.yaml"])
def test_shipped_configs_are_valid(name):
    cfg, _ = train_unet.load_train_config(
        train_unet.parse_args(["--config", str(ROOT / "configs" / name), "init_from=''"])
    )
    assert cfg.max_steps >= 1 and cfg.data.resolution % 2 ** (len(cfg.model.vae.ch_mult) - 1) == 0
    if name != "train-unet-sd-v1.yaml":  # a first run shows what it learns
        assert 1 <= cfg.validation.every <= cfg.max_steps


def test_the_fine_tune_config_starts_from_the_embedded_model(tmp_path, colours, capsys):
    """configs/finetune-emoji.yaml as the README runs it, for 2 steps: the embedded model's VAE and text encoder stay,
    its UNet moves, and the validation image comes from the fine-tuned model. (tests/test_docs.py runs the README's
    command line itself; here main() runs in this process.)"""
    argv = ["--config", str(ROOT / "configs" / "finetune-emoji.yaml"), f"data.path={colours}", "max_steps=2"]
    argv += ["validation.every=2", "validation.steps=2", f"cache_dir={tmp_path / 'cache'}"]
    assert run_in_process(train_unet, [*argv, f"output_dir={tmp_path / 'run'}"]) == 0
    out = "".join(capsys.readouterr())
    embedded, tuned = load_model(DEFAULT_MODEL), load_model(tmp_path / "run" / "model.safetensors")
    assert tuned.cfg == embedded.cfg and "wrote" in out
    assert_same(tuned.vae.state_dict(), embedded.vae.state_dict())
    assert_same(tuned.text_encoder.state_dict(), embedded.text_encoder.state_dict())
    assert not all(
        torch.equal(a, b) for a, b in zip(tuned.unet.state_dict().values(), embedded.unet.state_dict().values())
    )
    assert Image.open(tmp_path / "run" / "validation" / "step-000002.png").size == (4 * 32, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (["data.path=X", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["data.path=X", "batch_size=0"], "batch_size must be >= 1"),
        (["data.path=X", "model.beta_schedule=cosine"], "model.beta_schedule must be one of"),
        (["data.path=X", "model.rescale_betas_zero_snr=true"], "needs parameterization v or x0"),
        (["data.path=X", "tracker=mlflow"], "tracker must be tensorboard, wandb or none"),
        (
            ["data.path=X", "data.center_crop=false", "--cache-latents"],
            "cannot be combined with data.center_crop=false",
        ),
        (["data.path=X", "--resume", "nowhere"], "--resume nowhere: not a training checkpoint"),
        (["data.path=X", "init_from=missing.safetensors"], "checkpoint not found: missing.safetensors"),
        (
            ["data.path=X", "validation.sampler=plms", "model.parameterization=v", "model.rescale_betas_zero_snr=true"],
            "cannot sample this model",
        ),
        (["data.path=EMPTY"], "no images with captions found"),
        (["data.path=X", "max_steps=0"], "max_steps must be >= 1, got 0"),
        (["data.path=X", "max_steps=-1"], "max_steps must be >= 1, got -1"),
        (["data.path=X", "data.resolution=0"], "data.resolution must be positive"),
        (["data.path=X", "optim.lr=-1"], "optim.lr must be > 0"),
        (["data.path=X", "validation.steps=0"], "validation needs every >= 0, steps >= 1"),
        (["data.path=X", "output_dir=FILE/run"], "cannot create output_dir"),  # unwritable, even for root
        (["data.path=X", "--resume", "UNFINISHED"], "an unfinished checkpoint (its write was cut short)"),
        (["data.path=X", "--resume", "NOCONFIG"], "step-000003: its config.json is unreadable (FileNotFoundError"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.png").write_bytes(b"")
    (tmp_path / "file").write_text("not a folder")
    for name in ("step-000002.tmp", "step-000003"):  # a torn checkpoint; a folder with state/ but no config.json
        (tmp_path / name / "state").mkdir(parents=True)
    (tmp_path / "step-000002.tmp" / "config.json").write_text("{}")
    places = {
        "=X": f"={tmp_path / 'none'}",
        "EMPTY": str(tmp_path / "empty"),
        "FILE": str(tmp_path / "file"),
        "UNFINISHED": str(tmp_path / "step-000002.tmp"),
        "NOCONFIG": str(tmp_path / "step-000003"),
    }
    for key, value in places.items():
        args = [a.replace(key, value) for a in args]
    assert train_unet.main(["--config", str(CONFIG), f"output_dir={tmp_path / 'out'}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_arguments_are_one_line_too(capsys):
    for argv in (["--config"], [], ["--config", str(CONFIG), "--resume"]):
        with pytest.raises(SystemExit) as exit:
            train_unet.main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("train_unet.py: error: ")


def test_learning_samples_follow_the_caption(tmp_path, colours):
    """Loss falls, and sampling (diffusers' DDIM with classifier-free guidance, EMA weights) for a colour gives
    latents nearest to that colour's mean latent far more often than chance (1 in 4).

    The VAE is random but made near-deterministic (posterior std ~ e^-10) and scaled to unit latent variance,
    as SD's scale_factor does, so the latents carry the colours; classification is by nearest class centroid."""
    torch.manual_seed(0)
    init = StableDiffusion(load_config(ROOT / "configs" / "tiny.yaml"))
    data = ImageCaptionDataset(colours, 16)
    with torch.no_grad():
        init.vae.quant_conv.bias[4:] = -20.0  # log-variance channels
        means = torch.stack([init.vae.encode(data[(i, 0)]["pixels"][None]).mean[0] for i in range(len(data))])
    init.cfg.scale_factor = float(1 / means.std())
    save_single_file(init, tmp_path / "init.safetensors")
    run(
        f"data.path={colours}",
        f"init_from={tmp_path / 'init.safetensors'}",
        "--cache-latents",
        f"cache_dir={tmp_path / 'cache'}",
        "model.parameterization=v",
        "min_snr_gamma=5",
        "optim.lr=2e-3",
        "max_steps=120",
        "batch_size=16",
        "log_every=20",
        "save_every=1000",
        f"output_dir={tmp_path / 'run'}",
    )
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert losses[-1] < 0.5 * losses[0], losses
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == [
        "step-000050.png",
        "step-000100.png",
    ]  # the tiny config's

    model = load_model(tmp_path / "run" / "model.safetensors").eval()
    with torch.no_grad():
        by_colour = {c: [] for c in COLOURS}
        for i in range(len(data)):
            if data.name(i) != "broken.png":
                latent = model.vae.encode(data[(i, 0)]["pixels"][None]).mean[0] * model.cfg.scale_factor
                by_colour[list(COLOURS)[int(data.name(i)[:2]) % 4]].append(latent)
        centroids = torch.stack([torch.stack(v).mean(0) for v in by_colour.values()])
        n = 6
        prompts = [caption(c) for c in COLOURS for _ in range(n)]
        cond, uncond = model.text_encoder.encode(prompts), model.text_encoder.encode([""] * len(prompts))
        scheduler = DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        scheduler.set_timesteps(20)
        x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            out_uncond, out_cond = model.unet(
                torch.cat([x, x]), t.expand(2 * len(prompts)), torch.cat([uncond, cond])
            ).chunk(2)
            x = scheduler.step(out_uncond + 2.0 * (out_cond - out_uncond), t, x).prev_sample
    predicted = torch.cdist(x.flatten(1), centroids.flatten(1)).argmin(dim=1)
    accuracy = (predicted == torch.arange(4).repeat_interleave(n)).float().mean().item()
    assert accuracy >= 0.75, (accuracy, predicted.tolist())


def lora_args(tmp_path, colours, name, *args) -> list[str]:
    return [
        f"data.path={colours}",
        f"init_from={tmp_path / 'init.safetensors'}",
        "--lora",
        "4",
        "lora.alpha=2",
        "lora.targets=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,in_layers.2,out_layers.3]",
        "max_steps=4",
        "batch_size=4",
        "save_every=1",
        "log_every=1",
        "deterministic=true",
        "ema.decay=0.9",
        "optim.lr_scheduler=cosine",
        "optim.warmup_steps=2",
        f"output_dir={tmp_path / name}",
        *args,
    ]


def lora_run(tmp_path, colours, name, *args, proc=False, processes=1):
    return (start if proc else run)(*lora_args(tmp_path, colours, name, *args), processes=processes)


@pytest.fixture
def lora_init(tmp_path):
    torch.manual_seed(0)
    init = StableDiffusion(load_config(ROOT / "configs" / "tiny.yaml"))
    save_single_file(init, tmp_path / "init.safetensors")
    return load_model(tmp_path / "init.safetensors")


@pytest.mark.parametrize("text_encoder", [False, True])
def test_a_trained_lora_loads_in_diffusers_with_our_merged_weights(tmp_path, colours, lora_init, text_encoder):
    """train_unet.py --lora (attention, feed-forward, proj_in/out 1x1 convs, LoCon 3x3 convs with validation images
    on the way; with lora.text_encoder=true also the CLIP text encoder's q/k/v/out projections) -> a kohya file with
    diffusers names: diffusers' load_lora_weights + fuse_lora on the same base model gives the UNet and text encoder
    weights our loader merges (Pipeline.load_lora); the training checkpoints hold the LoRA tensors only."""
    flag = f"lora.text_encoder={str(text_encoder).lower()}"
    run_here(*lora_args(tmp_path, colours, "run", "max_steps=2", "validation.every=2", "validation.steps=2", flag))
    path = tmp_path / "run" / "lora.safetensors"
    assert not (tmp_path / "run" / "model.safetensors").exists() and path.stat().st_size < 2**20
    assert (tmp_path / "run" / "validation" / "step-000002.png").exists()
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4" and meta["ss_steps"] == "2"
    assert meta["ss_network_alpha"] == "2.0" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_resnets_1_conv1.alpha" in keys
    text_keys = {k for k in keys if k.startswith("lora_te_")}
    assert ("lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in text_keys) == text_encoder
    assert len(text_keys) == 3 * 4 * 2 * text_encoder  # q, k, v, out of both layers
    ups = [v for k, v in load_file(path).items() if k.endswith("lora_up.weight")]
    assert all(v.abs().max() > 0 for v in ups)  # trained: up starts at zero

    state = tmp_path / "run" / "checkpoints" / "step-000002" / "state"  # the training checkpoint: LoRA tensors only
    files = ["model.safetensors"] + ["model_1.safetensors"] * text_encoder  # the UNet's, the text encoder's
    assert sorted(p.name for p in state.glob("model*.safetensors")) == files
    saved = [load_file(state / f) for f in files]
    assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for part in saved for k in part)
    text_layers = len(text_keys) // 3
    assert [len(part) for part in saved] == [2 * (len(ups) - text_layers)] + [2 * text_layers] * text_encoder

    folder = tmp_path / "diffusers"
    save_diffusers_folder(lora_init, folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.load_lora_weights(str(path))
    ref.fuse_lora()
    ref.unload_lora_weights()
    pipe = Pipeline(lora_init)
    pipe.load_lora(path)
    theirs = dict(ref.unet.named_modules())
    changed = 0
    for ours, name in diffusers_layer_names(lora_init.unet, lora_init.cfg.unet).items():
        weight = lora_init.unet.get_submodule(ours).weight
        torch.testing.assert_close(theirs[name].weight, weight, rtol=0, atol=1e-5, msg=name)
        changed += not torch.equal(weight, pipe.patcher.backups.get(f"{UNET}{ours}.weight", weight))
    theirs = dict(ref.text_encoder.named_modules())
    for name, layer in lora_init.text_encoder.transformer.named_modules():
        if isinstance(layer, torch.nn.Linear):
            torch.testing.assert_close(theirs[name].weight, layer.weight, rtol=0, atol=1e-5, msg=name)
            changed += not torch.equal(layer.weight, pipe.patcher.backups.get(f"{TEXT}{name}.weight", layer.weight))
    assert changed == len(ups)
    cli = ["--ckpt", tmp_path / "init.safetensors", "--prompt", "red", "--lora", path, "--H", 16, "--W", 16]
    assert txt2img.main([str(a) for a in [*cli, "--steps", 2, "--outdir", tmp_path / "out"]]) == 0
    assert 'Lora hashes: "lora: ' in Image.open(tmp_path / "out" / "00000.png").info["parameters"]


def test_a_lora_run_resumes_exactly(tmp_path, colours, lora_init):
    """Uninterrupted vs. stopped by SIGTERM and resumed, a LoRA on the UNet and the text encoder: the same checkpoints
    and LoRA file (EMA weights) bit for bit. A checkpoint holds the LoRA tensors, their optimizer and EMA state, not
    the frozen models (smaller than the UNet's weights alone)."""
    flag = "lora.text_encoder=true"
    straight = lora_run(tmp_path, colours, "straight", flag, proc=True)
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    proc = lora_run(tmp_path, colours, "interrupted", flag, proc=True)
    wait_for(lambda: (checkpoints / "step-000002").exists(), proc, interval=0.01)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    stopped = max(int(p.name[5:]) for p in checkpoints.glob("step-??????"))
    assert f"SIGTERM: stopped at step {stopped}" in out and stopped < 4
    out = lora_run(tmp_path, colours, "interrupted", flag, "--resume", "latest")
    assert f"resumed from {checkpoints / f'step-{stopped:06d}'}" in out
    finish(straight)
    for name in ("model.safetensors", "model_1.safetensors"):
        a, b = (
            load_file(tmp_path / d / "checkpoints" / "step-000004" / "state" / name)
            for d in ("interrupted", "straight")
        )
        assert_same(a, b)
        assert all(".lora." in k for k in a)
    unet_bytes = sum(v.numel() * 4 for v in lora_init.unet.state_dict().values())
    assert sum(f.stat().st_size for f in (checkpoints / "step-000004").rglob("*") if f.is_file()) < unet_bytes
    a, b = (tmp_path / d / "lora.safetensors" for d in ("interrupted", "straight"))
    assert_same(load_file(a), load_file(b))
    meta_a, meta_b = (safe_open(p, "pt").metadata() for p in (a, b))
    assert meta_a.pop("modelspec.title") == "interrupted (ldm train_unet.py)" and meta_a["ss_steps"] == "4"
    assert meta_b.pop("modelspec.title") == "straight (ldm train_unet.py)" and meta_a == meta_b


def test_only_the_lora_trains(tmp_path, colours, lora_init, monkeypatch):
    """After a LoRA run on the UNet and the text encoder, every weight of the three models but the LoRAs' is bit for
    bit init_from's."""
    built = []
    monkeypatch.setattr(train_unet, "StableDiffusion", lambda cfg: built.append(StableDiffusion(cfg)) or built[-1])
    run_here(*lora_args(tmp_path, colours, "run", "max_steps=2", "validation.every=0", "lora.text_encoder=true"))
    state = built[0].state_dict()
    assert_same({k: v for k, v in state.items() if ".lora." not in k}, lora_init.state_dict())
    assert any(".lora." in k for k in state)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora", "0"], "argument --lora: the LoRA rank must be a whole number >= 1, got '0'"),
        (["--lora", "-2"], "argument --lora: the LoRA rank must be a whole number >= 1, got '-2'"),
        (["lora.rank=-1"], "lora.rank and lora.alpha must be >= 0, got -1"),
        (["--lora", "4", "INIT", "lora.targets=[to_q,attn9]"], "lora.targets: 'attn9' is the end of no Linear"),
        (["--lora", "4"], "a LoRA (lora.rank) adapts a trained UNet: it needs init_from, without reinit_unet"),
        (["--lora", "4", "INIT", "reinit_unet=true"], "it needs init_from, without reinit_unet"),
        (["INIT", "lora.text_encoder=true"], "lora.text_encoder=true needs a LoRA rank (--lora RANK)"),
        (["--lora", "4", "INIT", "lora.text_encoder=true", "--cache-latents"], "set cache_latents=false"),
        (["--lcm", "INIT", "lora.rank=0"], "latent consistency distillation (lcm.enabled) trains a LoRA of the UNet"),
        (
            ["--lcm", "INIT", "lora.text_encoder=true"],
            "trains a LoRA of the UNet (lora.rank), without lora.text_encoder",
        ),
        (["--lcm", "INIT", "lcm.w_min=9", "lcm.w_max=3"], "lcm needs 0 <= w_min <= w_max, got 9.0, 3.0"),
        (["--lcm", "INIT", "lcm.solver_steps=2000"], "lcm.solver_steps must be <= model.timesteps (1000), got 2000"),
        (["--lcm", "INIT", "--learn-sigma"], "latent consistency distillation (--lcm) distills a model without"),
    ],
)
def test_bad_lora_input_is_one_line_and_exit_code_2(args, message, tmp_path, colours, lora_init, capsys):
    args = [f"init_from={tmp_path / 'init.safetensors'}" if a == "INIT" else a for a in args]
    argv = ["--config", str(CONFIG), f"data.path={colours}", f"output_dir={tmp_path / 'out'}", *args]
    if args[0] == "--lora" and int(args[1]) < 1:
        with pytest.raises(SystemExit) as exit:
            train_unet.main(argv)
        assert exit.value.code == 2
    else:
        assert train_unet.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("text_encoder", [False, True])
def test_a_lora_trains_on_two_processes_as_on_one_with_twice_the_batch(tmp_path, colours, lora_init, text_encoder):
    """DDP over gloo with only the LoRAs trainable, from the latent cache (or, with the text encoder's LoRAs, from the
    images): the same LoRA file as one process."""
    if text_encoder:
        common = ["lora.text_encoder=true", "max_steps=2"]
    else:
        common = ["--cache-latents", f"cache_dir={tmp_path / 'cache'}", "max_steps=2"]
    lora_run(tmp_path, colours, "one", *common, "batch_size=8")
    lora_run(tmp_path, colours, "two", *common, "batch_size=4", processes=2)
    assert_same(*(load_file(tmp_path / d / "lora.safetensors") for d in ("two", "one")), exact=False)


def test_a_lora_run_does_not_resume_a_full_run(tmp_path, colours, lora_init, capsys):
    """The checkpoint of a whole-UNet run is not resumed as a LoRA run (nor the other way): one line, exit 2."""
    common = [f"data.path={colours}", f"init_from={tmp_path / 'init.safetensors'}", f"output_dir={tmp_path / 'run'}"]
    run_here(*common, "max_steps=1", "batch_size=2", "validation.every=0")
    capsys.readouterr()  # that run's output: the check below reads the second one's alone
    argv = ["--config", str(CONFIG), "tracker=none", *common, "--lora", "4", "--resume", "latest"]
    assert train_unet.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it trained the whole UNet, this run a LoRA of rank 4 on to_q, to_k" in err, err


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_one_latent_consistency_step_is_the_recipes(tmp_path, parameterization):
    """LatentConsistency.loss (train_unet.py --lcm) = one step of diffusers' train_lcm_distill_lora_sd_wds.py written
    out here on diffusers' UNet2DConditionModel with our LoRA loaded by load_lora_weights (the teacher: its adapters
    disabled, as the script does), DDPMScheduler.add_noise, LCMScheduler's boundary scalings and the script's
    DDIMSolver grid, on the same weights, latents, noise, solver points and guidance w (index 0: t_n clamps to 0)."""
    model = tiny_model(parameterization=parameterization)
    torch.manual_seed(1)
    trainable = LoRATrainable(model, LoRAConfig(rank=4, alpha=2), "lcm test")
    with torch.no_grad():
        for p in trainable.module.parameters():
            p.normal_(0, 0.1)  # a student that is not its teacher
    save_lora(trainable.module, tmp_path / "lora.safetensors", "lcm test", 0)
    cfg = LCMTrainConfig(enabled=True)
    lcm = LatentConsistency(Diffusion(model.cfg), cfg)

    grid = (np.arange(1, 51) * (1000 // 50)).round().astype(np.int64) - 1  # the script's DDIMSolver.ddim_timesteps
    assert lcm.grid.tolist() == grid.tolist()
    t, w = lcm.draw(generators(0, 64))
    assert set(t.tolist()) <= set(grid.tolist()) and len(set(t.tolist())) > 20
    assert w.shape == (64, 1, 1, 1) and 5 <= w.min() < 6 and 14 < w.max() <= 15

    index, w = torch.tensor([0, 37]), torch.tensor([5.5, 13.0]).reshape(2, 1, 1, 1)
    gen = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        context = model.text_encoder(model.text_encoder.tokenize(["a red apple", "a blue car"]))
        uncond = model.text_encoder(model.text_encoder.tokenize(["", ""]))
    start = torch.from_numpy(grid[index.numpy()])
    x = Diffusion(model.cfg).q_sample(latents, start, noise)
    ours = lcm.loss(LoRAForm(trainable), x, start, w, context, uncond)

    save_diffusers_folder(model, tmp_path / "diffusers")
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "diffusers", safety_checker=None)
    ref.load_lora_weights(str(tmp_path / "lora.safetensors"))
    unet, scheduler = ref.unet, DDPMScheduler.from_config(ref.scheduler.config)
    boundary = LCMScheduler.from_config(ref.scheduler.config)
    alphas = scheduler.alphas_cumprod
    alphas_prev = torch.cat([alphas[:1], alphas[torch.from_numpy(grid[:-1])]])  # DDIMSolver.ddim_alpha_cumprods_prev
    v = scheduler.config.prediction_type == "v_prediction"

    def shaped(values):
        return torch.stack([torch.as_tensor(c, dtype=torch.float32) for c in values]).reshape(-1, 1, 1, 1)

    def x0_eps(out, t, x):  # the script's get_predicted_original_sample, get_predicted_noise
        a, s = alphas[t].sqrt().reshape(-1, 1, 1, 1), (1 - alphas[t]).sqrt().reshape(-1, 1, 1, 1)
        return (a * x - s * out, a * out + s * x) if v else ((x - s * out) / a, out)

    def consistency(out, t, x):  # c_skip x + c_out x0^
        scalings = [boundary.get_scalings_for_boundary_condition_discrete(int(i)) for i in t]
        return shaped([c[0] for c in scalings]) * x + shaped([c[1] for c in scalings]) * x0_eps(out, t, x)[0]

    with torch.no_grad():
        noisy = scheduler.add_noise(latents, noise, start)
        end = (start - 20).clamp(min=0)
        student = consistency(unet(noisy, start, context).sample, start, noisy)
        unet.disable_adapters()
        teacher = unet(noisy, start, context).sample
        x0_c, eps_c = x0_eps(teacher, start, noisy)
        x0_u, eps_u = x0_eps(unet(noisy, start, uncond).sample, start, noisy)
        unet.enable_adapters()
        pred_x0, pred_noise = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        a_prev = alphas_prev[index].reshape(-1, 1, 1, 1)
        x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise  # DDIMSolver.ddim_step
        target = consistency(unet(x_prev, end, context).sample, end, x_prev)
        theirs = torch.mean(torch.sqrt((student - target) ** 2 + 0.001**2) - 0.001)
    assert (student - consistency(teacher, start, noisy)).abs().max() > 0.01  # the LoRA moves the student
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-4, atol=0)
    ours.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable.params)


def test_an_lcm_lora_trained_by_train_unet_loads_in_diffusers_with_our_merged_weights(tmp_path, colours, lora_init):
    """train_unet.py --lcm (2 steps, validation images at 4 steps of the lcm sampler) -> a kohya LoRA file whose
    weights diffusers' load_lora_weights + fuse_lora merge into the UNet as our loader does."""
    run(*lora_args(tmp_path, colours, "lcm", "--lcm", "max_steps=2", "validation.every=2"))
    path = tmp_path / "lcm" / "lora.safetensors"
    assert (tmp_path / "lcm" / "validation" / "step-000002.png").exists()
    config = json.loads((tmp_path / "lcm" / "config.json").read_text())
    assert config["lcm"]["enabled"] and config["validation"]["sampler"] == "lcm" and config["validation"]["steps"] == 4
    ups = [v for k, v in load_file(path).items() if k.endswith("lora_up.weight")]
    assert all(v.abs().max() > 0 for v in ups)  # trained: up starts at zero

    save_diffusers_folder(lora_init, tmp_path / "diffusers")
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "diffusers", safety_checker=None)
    ref.load_lora_weights(str(path))
    ref.fuse_lora()
    ref.unload_lora_weights()
    pipe = Pipeline(lora_init)
    pipe.load_lora(path)
    theirs, changed = dict(ref.unet.named_modules()), 0
    for ours, name in diffusers_layer_names(lora_init.unet, lora_init.cfg.unet).items():
        weight = lora_init.unet.get_submodule(ours).weight
        torch.testing.assert_close(theirs[name].weight, weight, rtol=0, atol=1e-5, msg=name)
        changed += not torch.equal(weight, pipe.patcher.backups.get(f"{UNET}{ours}.weight", weight))
    assert changed == len(ups)


def test_an_lcm_lora_run_resumes_exactly(tmp_path, colours, lora_init):
    """train_unet.py --lcm stopped after step 1 and resumed = uninterrupted, bit for bit (the LoRA file holds the EMA
    weights): the solver points, guidance and noise are drawn from each sample's own generator."""
    run(*lora_args(tmp_path, colours, "straight", "--lcm", "max_steps=2", "validation.every=0"))
    run(*lora_args(tmp_path, colours, "resumed", "--lcm", "max_steps=1", "validation.every=0"))
    run(*lora_args(tmp_path, colours, "resumed", "--lcm", "max_steps=2", "validation.every=0", "--resume", "latest"))
    assert_same(
        load_file(tmp_path / "straight" / "lora.safetensors"), load_file(tmp_path / "resumed" / "lora.safetensors")
    )
