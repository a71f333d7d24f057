"""train_vae.py --tiny: a TAESD decoder distilled from a tiny SD's VAE decoder, 8x (SD's) and 4x (the embedded
model's): one TAESD stage per 2x of the VAE. Its file is what txt2img.py --taesd reads, and diffusers' AutoencoderTiny
of the same factor with the same weights makes the same image (and, with --tiny-encoder, the same latents); both losses
fall on a fixed batch; --tiny-encoder alone is refused."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from test_taesd import autoencoder_tiny

import train_vae
import txt2img
from conftest import PROMPT, ROOT, run_in_process, tiny_model
from ldm.checkpoint import save_diffusers_folder, save_single_file
from ldm.samplers import make_scheduler
from ldm.taesd import load_taesd

CONFIG = str(ROOT / "configs" / "train-vae-tiny.yaml")
STEPS, SEED = 4, 11


@pytest.mark.parametrize("ch_mult", ["[1,2,2,2]", "[1,2,2]"])  # 8x, 4x
def test_tiny_decoder_learns_the_vae_and_decodes_as_autoencoder_tiny(ch_mult, tmp_path):
    model = tiny_model(overrides=(f"vae.ch_mult={ch_mult}",))
    save_single_file(model, tmp_path / "tiny.safetensors")
    save_diffusers_folder(model, tmp_path / "diffusers")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(4):  # one fixed batch: smooth random colour fields
        grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(grid).resize((16, 16), Image.BILINEAR).save(tmp_path / "images" / f"{i}.png")
    out = tmp_path / "run"
    settings = {"data.path": tmp_path / "images", "init_from": tmp_path / "tiny.safetensors", "output_dir": out}
    settings |= {"model.vae.ch_mult": ch_mult, "batch_size": 4, "holdout": 0, "max_steps": 8, "log_every": 1}
    settings |= {"optim.lr": 3e-3}
    argv = ["--config", CONFIG, "--tiny", "--tiny-encoder"] + [f"{k}={v}" for k, v in settings.items()]
    assert run_in_process(train_vae, argv) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 8 and all(logs[-1][k] < 0.7 * logs[0][k] for k in ("dec", "enc"))

    decoder = out / "taesd_decoder.safetensors"
    ae = autoencoder_tiny(model.cfg.vae.factor.bit_length() - 1)  # one stage per 2x, weights replaced below
    # madebyollin's decoder index i is diffusers' decoder.layers[i - 1] (0: the clamp)
    decoder_state = {f"{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in load_file(decoder).items()}
    ae.decoder.layers.load_state_dict(decoder_state)
    ae.encoder.layers.load_state_dict(load_file(out / "taesd_encoder.safetensors"))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        their_latents = ae.encode(2 * x - 1).latents  # diffusers' images are in [-1, 1]
        ours = load_taesd(decoder).encode(x)  # the teacher's latents are small: random weights
        assert their_latents.std() > 0.005 and (ours - their_latents).abs().max() < 1e-6
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "diffusers", vae=ae, safety_checker=None)
    ref.scheduler = make_scheduler("ddim", model.cfg)
    ref.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(SEED)
    theirs = np.asarray(ref(PROMPT, num_inference_steps=STEPS, generator=generator).images[0], dtype=np.float64)
    base = ["--ckpt", tmp_path / "tiny.safetensors", "--prompt", PROMPT, "--steps", STEPS, "--seed", SEED]
    assert txt2img.main([str(a) for a in base + ["--outdir", tmp_path / "out", "--taesd", decoder]]) == 0
    with Image.open(tmp_path / "out" / "00000.png") as image:
        ours = np.asarray(image, dtype=np.float64)
    assert theirs.std() > 5 and np.abs(ours - theirs).mean() <= 1


def test_tiny_refuses_an_encoder_alone(tmp_path, capsys):
    argv = ["--config", CONFIG, f"data.path={tmp_path}", f"output_dir={tmp_path / 'run'}"]
    assert run_in_process(train_vae, argv + ["--tiny-encoder"]) == 2
    assert "tiny_encoder needs tiny" in capsys.readouterr().err
