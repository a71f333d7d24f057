"""TAESD (ldm.taesd) against diffusers' AutoencoderTiny on the same random weights, in both file layouts, and in
the pipeline: txt2img and img2img with --taesd / --taesd-encode = diffusers' pipelines with vae=AutoencoderTiny; and
the live previews (TAESD, or colours fitted to the VAE)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

import txt2img
from conftest import PROMPT, randomize_, tiny_model
from ldm.checkpoint import save_diffusers_folder, save_single_file
from ldm.errors import CheckpointError
from ldm.pipeline import load_pipeline
from ldm.samplers import make_scheduler
from ldm.taesd import WIDTH, load_taesd

FACTOR8 = ("vae.ch_mult=[1,2,2,2]",)  # TAESD's 8x latents
STEPS, SEED = 4, 11


def autoencoder_tiny(stages: int) -> AutoencoderTiny:
    """diffusers' AutoencoderTiny of `stages` 2x stages (SD's TAESD: 3, 8x; the embedded model's 4x VAE: 2) with random
    weights, scaled (x1.3 for 8x, x1.1 for the shallower 4x) and the last bias 0.5 so that images spread over [0, 1]
    (~90% of pixels unclamped) rather than sit at 0."""
    channels, blocks = (WIDTH,) * (stages + 1), (3,) * stages
    ae = AutoencoderTiny(
        encoder_block_out_channels=channels,
        decoder_block_out_channels=channels,
        num_encoder_blocks=(1, *blocks),
        num_decoder_blocks=(*blocks, 1),
    )
    randomize_(ae, seed=3).eval()
    with torch.no_grad():
        for name, p in ae.named_parameters():
            p.mul_((1.3 if stages == 3 else 1.1) if name.endswith("weight") else 1)
        ae.decoder.layers[-1].bias.fill_(0.5)
    return ae


@pytest.fixture(scope="module")
def tiny_ae():
    """SD's TAESD shape (8x), diffusers' default AutoencoderTiny."""
    return autoencoder_tiny(3)


def madebyollin_files(ae: AutoencoderTiny, folder, suffix: str):
    """taesd_decoder / taesd_encoder files in madebyollin's nn.Sequential layout, by the correspondence of diffusers'
    scripts/convert_tiny_autoencoder_to_diffusers.py (decoder index = diffusers' + 1: his index 0 is the clamp)."""
    state = {k: v.contiguous() for k, v in ae.state_dict().items()}
    parts = {
        "decoder": {
            f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in state.items() if k.startswith("decoder")
        },
        "encoder": {k.removeprefix("encoder.layers."): v for k, v in state.items() if k.startswith("encoder")},
    }
    for part, tensors in parts.items():
        path = folder / f"taesd_{part}{suffix}"
        save_file(tensors, path) if suffix == ".safetensors" else torch.save(tensors, path)
    return folder / f"taesd_decoder{suffix}"


def taesd_path(ae, layout: str, folder):
    if layout == "diffusers":
        ae.save_pretrained(folder / "taesd")
        return folder / "taesd"
    return madebyollin_files(ae, folder, layout)


@pytest.mark.parametrize("stages", [3, 2])
@pytest.mark.parametrize("layout", [".safetensors", ".pth", "diffusers"])
def test_decode_and_encode_equal_autoencoder_tiny(tiny_ae, layout, stages, tmp_path):
    """SD's 8x TAESD, and the 4x one of the embedded model's VAE (AutoencoderTiny with three block_out_channels)."""
    ae = tiny_ae if stages == 3 else autoencoder_tiny(stages)
    taesd = load_taesd(taesd_path(ae, layout, tmp_path))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g) * 2
    x = torch.rand(2, 3, 64, 48, generator=g)
    with torch.no_grad():
        theirs = (ae.decode(z).sample / 2 + 0.5).clamp(0, 1)  # diffusers' postprocess of its [-1, 1] output
        ours = taesd.decode(z)
        side = 8 * 2**stages
        assert taesd.factor == 2**stages and ours.shape == (2, 3, side, side)
        assert ((ours > 0) & (ours < 1)).float().mean() > 0.8 and (ours - theirs).abs().max() < 1e-5
        their_latents = ae.encode(2 * x - 1).latents  # diffusers' images are in [-1, 1]
        assert their_latents.shape[2:] == (64 // 2**stages, 48 // 2**stages) and their_latents.std() > 0.1
        assert (taesd.encode(x) - their_latents).abs().max() < 1e-5
    assert taesd.name == "taesd"


def test_bad_taesd_files_are_named(tiny_ae, tmp_path):
    encoder_file = madebyollin_files(tiny_ae, tmp_path, ".safetensors").with_name("taesd_encoder.safetensors")
    with pytest.raises(CheckpointError, match="is a TAESD encoder"):
        load_taesd(encoder_file)
    save_file({"1.weight": torch.randn(64, 4, 3, 3)}, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match="half.safetensors: missing tensor"):
        load_taesd(tmp_path / "half.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        load_taesd(tmp_path / "empty")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD with an 8x VAE (as SD's, so TAESD fits it): its single file and diffusers folder."""
    model, folder = tiny_model(overrides=FACTOR8), tmp_path_factory.mktemp("sd8")
    save_diffusers_folder(model, folder / "diffusers")
    save_single_file(model, folder / "tiny.safetensors")
    return model, folder


def cli(sd, out, *args) -> tuple[np.ndarray, str, dict]:
    """txt2img.py's image, its A1111 text and JSON facts."""
    base = ["--ckpt", sd[1] / "tiny.safetensors", "--prompt", PROMPT, "--steps", STEPS, "--seed", SEED]
    assert txt2img.main([str(a) for a in base + ["--outdir", out, *args]]) == 0
    with Image.open(out / "00000.png") as image:
        return np.asarray(image, dtype=np.float64), image.info["parameters"], json.loads(image.info["ldm"])


@pytest.mark.parametrize("layout", [".safetensors", "diffusers"])
def test_cli_taesd_equals_diffusers_pipelines_with_autoencoder_tiny(sd, tiny_ae, layout, tmp_path):
    """--taesd: diffusers' txt2img with vae=AutoencoderTiny; --taesd-encode with img2img: diffusers' img2img with it.
    The PNG says the decoder as A1111 writes a VAE, and the facts remake the image."""
    path = taesd_path(tiny_ae, layout, tmp_path)
    ref = StableDiffusionPipeline.from_pretrained(sd[1] / "diffusers", vae=tiny_ae, safety_checker=None)
    ref.scheduler = make_scheduler("ddim", sd[0].cfg)
    ref.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(SEED)
    theirs = np.asarray(ref(PROMPT, num_inference_steps=STEPS, generator=generator).images[0], dtype=np.float64)
    ours, text, facts = cli(sd, tmp_path / "txt2img", "--taesd", path)
    vae, _, _ = cli(sd, tmp_path / "vae")
    assert np.abs(ours - theirs).mean() <= 1 and np.abs(ours - vae).mean() > 10
    assert "VAE: taesd" in text.splitlines()[-1].split(", ") and facts["taesd"] == str(path) and facts["vae"] == "taesd"
    again, _, _ = cli(sd, tmp_path / "again", "--taesd", facts["taesd"])
    assert np.array_equal(ours, again)

    init = tmp_path / "init.png"
    Image.fromarray(theirs.astype(np.uint8)).save(init)
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    generator = torch.Generator().manual_seed(SEED)
    with Image.open(init) as image:
        theirs = img2img(PROMPT, image=image, strength=0.6, num_inference_steps=STEPS, generator=generator).images[0]
    ours, _, facts = cli(
        sd, tmp_path / "img2img", "--taesd", path, "--taesd-encode", "--init-image", init, "--strength", 0.6
    )
    assert np.abs(ours - np.asarray(theirs, dtype=np.float64)).mean() <= 1 and facts["taesd_encode"]


def test_cli_taesd_errors_exit_2(sd, tiny_ae, tmp_path, capsys):
    """--taesd-encode without --taesd, a TAESD on a model whose VAE is not 8x, a decoder without its encoder for
    --taesd-encode: one line each, exit 2, no image."""
    decoder = madebyollin_files(tiny_ae, tmp_path, ".safetensors")
    save_single_file(tiny_model(), tmp_path / "factor2.safetensors")
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "taesd_decoder.safetensors").write_bytes(decoder.read_bytes())
    cases = {
        ("--taesd-encode",): "--taesd-encode encodes with the TAESD of --taesd",
        (
            "--taesd",
            decoder,
            "--ckpt",
            tmp_path / "factor2.safetensors",
        ): "this model's VAE makes 4-channel latents of 1/2",
        ("--taesd", tmp_path / "lone" / "taesd_decoder.safetensors", "--taesd-encode"): "has no encoder",
    }
    for args, message in cases.items():
        common = ["--ckpt", sd[1] / "tiny.safetensors", "--prompt", "x", "--steps", 1, "--outdir", tmp_path / "out"]
        assert txt2img.main([str(a) for a in common + list(args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_previews_are_taesd_or_colours_fitted_to_the_vae(sd, tiny_ae, tmp_path):
    """With a TAESD the live preview is its decode; without, the linear colours fitted to the model's VAE: on the
    embedded model's own images they explain most of the VAE's colours (per latent pixel, R^2 > 0.5)."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe = load_pipeline(sd[1] / "tiny.safetensors", taesd=madebyollin_files(tiny_ae, tmp_path, ".safetensors"))
    assert torch.equal(pipe.decode.preview(z), pipe.taesd.decode(z))

    pipe = load_pipeline()
    trajectory = []
    pipe.txt2img(["an apple", "a red heart", "a blue car"], steps=8, seed=1, progress=False, trajectory=trajectory)
    z, f = trajectory[-1], pipe.cfg.vae.factor
    preview, full = pipe.decode.preview(z), pipe.decode(z)
    assert preview.shape == full.shape
    residual = (F.avg_pool2d(preview, f) - F.avg_pool2d(full, f)).pow(2).mean()
    assert 1 - residual / F.avg_pool2d(full, f).var() > 0.5
