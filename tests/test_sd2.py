"""Stable Diffusion 2.x and SD-Turbo against diffusers, on tiny random SD2-topology models that diffusers and
transformers build here: Linear proj_in / proj_out, per-level head counts from fixed-width heads (SD2's 64-channel
heads scaled down to 16), attention upcast, a gelu CLIP text model whose tokenizer pads with "!", v-prediction and
epsilon. Images: mean |difference| <= 1/255 and final latents within 1e-4 of diffusers' pipelines."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_controlnet import FACTOR8, controlnet_config, smooth_image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import ldm.attention
import ldm.checkpoint
import ldm.unet
import train_unet
from conftest import (
    PROMPT,
    ROOT,
    assert_same,
    cli,
    compvis_original_config,
    diffusers_run,
    ours_run,
    pixels,
    randomize_,
    run_in_process,
    tiny_diffusers_vae,
    tiny_model,
)
from ldm import convert
from ldm.checkpoint import load_model, peek_config, save_diffusers_folder, save_single_file
from ldm.config import SamplingConfig, load_config, sd2_config, to_dict
from ldm.controlnet import ControlNet, save_controlnet
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.request import Control
from ldm.samplers import SAMPLERS, make_scheduler
from ldm.text_encoder import build_tokenizer
from ldm.unet import UNetModel

TINY_SD2 = ROOT / "configs" / "tiny-sd2.yaml"
CONTEXT = 48  # SD2's 1024-wide context, scaled down (SD v1's tiny model has 32)
WIDTHS = (32, 64, 64)
HEAD_CHANNELS = 16  # SD2's 64-channel heads, scaled down: 2, 4, 4 heads per level
OUT_BIAS = "model.diffusion_model.out.2.bias"
TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def sd2_pipeline(folder, prediction="epsilon", in_channels=4, scheduler=None) -> StableDiffusionPipeline:
    """A tiny SD2-topology pipeline made and saved (to `folder`) by diffusers and transformers; cross-attention
    scaled up 10x so the prompt matters (as conftest.tiny_model)."""
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        block_out_channels=WIDTHS,
        layers_per_block=1,
        cross_attention_dim=CONTEXT,
        attention_head_dim=[w // HEAD_CHANNELS for w in WIDTHS],
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = tiny_diffusers_vae()
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=CONTEXT, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"
        )
    )
    for i, m in enumerate((unet, vae, text)):
        randomize_(m, seed=i)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2." in name:
                p.mul_(10)
    build_tokenizer().save_pretrained(folder / "clip-tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "clip-tokenizer", pad_token="!")  # OpenCLIP pads with "!"
    scheduler = scheduler or DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "diffusers")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """{(prediction, in_channels): (our pipeline, diffusers' pipeline, its folder)}, ours loaded from the folder."""
    out = {}
    for prediction, channels in (("v_prediction", 4), ("epsilon", 4), ("v_prediction", 9)):
        folder = tmp_path_factory.mktemp(f"sd2-{prediction}-{channels}")
        ref = sd2_pipeline(folder, prediction, channels)
        out[prediction, channels] = (Pipeline(load_model(folder / "diffusers")).eval(), ref, folder / "diffusers")
    return out


def test_sd2_folder_reads_as_the_sd2_unet(sd2):
    ours, ref, _ = sd2["v_prediction", 4]
    u = ours.cfg.unet
    assert (u.use_linear_in_transformer, u.upcast_attention, u.num_head_channels, u.context_dim) == (
        True,
        True,
        HEAD_CHANNELS,
        CONTEXT,
    )
    assert ours.cfg.parameterization == "v" and ours.cfg.text_encoder.hidden_act == "gelu"
    tiny = load_config(TINY_SD2)  # the same topology, as a config file
    assert (ours.cfg.unet, ours.cfg.text_encoder) == (tiny.unet, tiny.text_encoder)
    assert isinstance(ours.unet.input_blocks[1][1].proj_in, torch.nn.Linear)
    for hw in ((8, 8), (10, 6)):
        x, t, c = torch.randn(2, 4, *hw), torch.tensor([3, 981]), torch.randn(2, 77, CONTEXT)
        with torch.inference_mode():
            mine, theirs = ours.unet(x, t, c), ref.unet(x, t, c).sample
        assert mine.std() > 0.05 and (mine - theirs).abs().max() <= 1e-4


def test_the_tokenizer_of_the_folder_pads_with_the_exclamation_mark(sd2):
    ours, ref, _ = sd2["epsilon", 4]
    ids = ours.text_encoder.tokenize("a red apple")
    assert (
        ids[0, -1] == 0
        and ids.tolist()
        == ref.tokenizer("a red apple", padding="max_length", max_length=77, return_tensors="pt").input_ids.tolist()
    )


@pytest.mark.parametrize(
    "prediction, sampler", [("v_prediction", s) for s in SAMPLERS] + [("epsilon", "ddim"), ("epsilon", "euler_a")]
)
def test_txt2img_matches_diffusers(sd2, prediction, sampler):
    ours, ref, _ = sd2[prediction, 4]
    ref.scheduler = make_scheduler(sampler, ours.cfg)
    images, trajectory = ours_run(ours, seed=3, n=2, sampler=sampler)
    theirs, latents = diffusers_run(ref, seed=3, n=2)
    assert_same(images, theirs, trajectory[-1], latents)
    assert pixels(images).std() > 8  # not flat


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_img2img_matches_diffusers(sd2, sampler):
    ours, ref, _ = sd2["v_prediction", 4]
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.scheduler = make_scheduler(sampler, ours.cfg)
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    images, trajectory = ours_run(ours, seed=11, n=2, mode="img2img", init_image=image, strength=0.6, sampler=sampler)
    theirs, latents = diffusers_run(img2img, seed=11, n=2, image=image, strength=0.6)
    assert_same(images, theirs, trajectory[-1], latents)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_nine_channel_inpainting_matches_diffusers(sd2, sampler):
    ours, ref, _ = sd2["v_prediction", 9]
    inpaint = StableDiffusionInpaintPipeline(**ref.components)
    inpaint.scheduler = make_scheduler(sampler, ours.cfg)
    image = Image.fromarray(np.random.default_rng(8).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 255
    images, trajectory = ours_run(
        ours, seed=2, n=1, mode="inpaint", init_image=image, mask=Image.fromarray(mask), sampler=sampler
    )
    theirs, latents = diffusers_run(
        inpaint, seed=2, n=1, image=image, mask_image=Image.fromarray(mask), height=16, width=16
    )
    assert_same(images, theirs, trajectory[-1], latents, region=mask > 0)  # diffusers does not paste the rest back


def test_sd_turbo_one_step_matches_diffusers(tmp_path):
    """SD-Turbo's folder: Euler with "trailing" timesteps (one step starts at t = 999 from pure noise), sampled with
    euler_a at 1 step without guidance (our scale 1; diffusers' guidance 0 or 1)."""
    turbo = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="trailing"
    )
    ref = sd2_pipeline(tmp_path, scheduler=turbo)
    ours = Pipeline(load_model(tmp_path / "diffusers")).eval()
    assert ours.cfg.timestep_spacing == "trailing"
    images, trajectory = ours_run(ours, seed=5, n=2, sampler="euler_a", steps=1, scale=1)
    for guidance in (0.0, 1.0):
        theirs, latents = diffusers_run(ref, seed=5, n=2, num_inference_steps=1, guidance_scale=guidance)
        assert_same(images, theirs, trajectory[-1], latents)


# ---------------------------------------------------------------- single files: OpenCLIP keys, which model, v or eps


def test_our_single_file_is_read_by_diffusers_from_single_file_to_the_same_weights(sd2, tmp_path):
    ours, ref, folder = sd2["v_prediction", 4]
    save_single_file(ours.model, tmp_path / "sd2.safetensors")
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in load_file(
        tmp_path / "sd2.safetensors"
    )
    theirs = StableDiffusionPipeline.from_single_file(
        tmp_path / "sd2.safetensors", config=str(folder), local_files_only=True, safety_checker=None
    )
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def bare_file(model, path, stored: bool = False, **changes) -> None:
    """The model's single file as files from elsewhere are: no config of ours in it (stored: with it);
    `changes`: tensors replaced."""
    save_single_file(model, path)
    metadata = {"ldm_config": json.dumps(to_dict(model.cfg))} if stored else None
    save_file(load_file(path) | changes, path, metadata)


def test_a_single_file_with_openclip_keys_and_an_extra_last_block_is_the_diffusers_folder(sd2, tmp_path):
    """Real SD 2 files carry all 24 blocks of the text tower and its projection; SD 2 conditions on the penultimate
    block, which is the last of the diffusers folder's text model."""
    ours, ref, _ = sd2["epsilon", 4]
    g = torch.Generator().manual_seed(9)
    blocks = "cond_stage_model.model.transformer.resblocks."
    save_single_file(ours.model, tmp_path / "ours.safetensors")
    state = load_file(tmp_path / "ours.safetensors")
    extra = {k.replace(blocks + "1.", blocks + "2."): torch.randn(v.shape, generator=g) for k, v in state.items()}
    extra = {k: v for k, v in extra.items() if k.startswith(blocks + "2.")}
    extra |= {
        "cond_stage_model.model.text_projection": torch.randn(CONTEXT, CONTEXT, generator=g),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6052),
    }
    bare_file(ours.model, tmp_path / "v2-1_512-ema-pruned.safetensors", **extra)
    cfg = load_config(TINY_SD2, ["parameterization=eps"])
    model = load_model(tmp_path / "v2-1_512-ema-pruned.safetensors", cfg).eval()
    ids = ref.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 981])
    with torch.inference_mode():
        assert torch.equal(model.text_encoder.tokenize(PROMPT), ids)
        context = ref.text_encoder(ids)[0]
        assert (model.text_encoder(ids) - context).abs().max() <= 1e-5
        context = context.expand(2, -1, -1)
        assert (model.unet(x, t, context) - ref.unet(x, t, context).sample).abs().max() <= 1e-4
        assert (model.vae.decode(x) - ref.vae.decode(x).sample).abs().max() <= 1e-4


SIDECAR_V = 'model:\n  params:\n    parameterization: "v"\n'


@pytest.mark.parametrize(
    "stored, sidecar, config, out_bias, prediction, rule",
    [
        (True, "model: {}\n", "eps", -3.0, "v", "the config stored in the file"),
        (False, SIDECAR_V, "eps", 3.0, "v", "model.yaml beside the file"),
        (False, "model:\n  params: {}\n", None, -3.0, "eps", "model.yaml beside the file"),
        (False, None, "eps", -3.0, "eps", "the config given"),
        (False, None, None, -3.0, "v", "AUTOMATIC1111's check"),
        (False, None, None, 3.0, "eps", "AUTOMATIC1111's check"),
    ],
)
def test_v_or_eps_from_the_first_rule_that_says(
    sd2, tmp_path, monkeypatch, capsys, stored, sidecar, config, out_bias, prediction, rule
):
    """In order: the config stored in the file, a .yaml beside it, the config given (--config), else the UNet at t =
    999 (a UNet built to trip it: its output shifted by out_bias). The tiny SD2 config stands in for SD 2's, which is
    what the tensors are detected as."""
    monkeypatch.setattr(ldm.checkpoint, "sd2_config", lambda: load_config(TINY_SD2))
    ours, _, _ = sd2["v_prediction", 4]
    path = tmp_path / "model.safetensors"
    bias = {OUT_BIAS: torch.full((4,), out_bias)}
    bare_file(ours.model, path, stored, **bias)
    if sidecar is not None:
        path.with_suffix(".yaml").write_text(sidecar)
    cfg = load_config(TINY_SD2, [f"parameterization={config}"]) if config else None
    model = load_model(path, cfg)
    assert model.cfg.parameterization == prediction
    kind = "a v-prediction" if prediction == "v" else "an epsilon"
    assert f"note: model.safetensors: {kind} model ({rule}" in capsys.readouterr().err
    detected = not stored and config is None
    assert model.cfg.image_size == (96 if detected and prediction == "v" else 8)  # 768-v: 768x768 by default


def test_txt2img_draws_a_768_v_file_at_its_size_by_default(sd2, tmp_path, monkeypatch, capsys):
    """A file that says nothing of itself, whose UNet says v: the 768-v model, sized before loading (peek_config) at
    96x96 latents (768 px with SD 2's VAE, 192 px with the tiny one's)."""
    monkeypatch.setattr(ldm.checkpoint, "sd2_config", lambda: load_config(TINY_SD2))
    ours, _, _ = sd2["v_prediction", 4]
    bare_file(ours.model, tmp_path / "v2-1_768-ema-pruned.safetensors", **{OUT_BIAS: torch.full((4,), -3.0)})
    ckpt = tmp_path / "v2-1_768-ema-pruned.safetensors"
    assert cli("--ckpt", ckpt, "--prompt", "a red apple", "--steps", 1, "--outdir", tmp_path / "out") == 0
    side = 96 * load_config(TINY_SD2).vae.factor
    assert Image.open(next((tmp_path / "out").glob("*.png"))).size == (side, side)
    assert "a v-prediction model (AUTOMATIC1111's check of the UNet at t = 999)" in capsys.readouterr().err


def test_which_model_a_file_is_comes_from_its_tensors(tmp_path):
    """From the safetensors header alone (peek_config, before loading): OpenCLIP's text tower or a 1024-wide context
    is SD 2.x, 9 input channels an inpainting UNet; a v1 file stays v1."""
    g = torch.Generator().manual_seed(0)
    conv_in, to_k = "model.diffusion_model.input_blocks.0.0.weight", TO_K
    files = {
        "v2-1_768-ema-pruned": (
            {conv_in: (320, 4, 3, 3), "cond_stage_model.model.ln_final.weight": (1024,)},
            SIDECAR_V,
        ),
        "512-inpainting-ema": ({conv_in: (320, 9, 3, 3), to_k: (320, 1024)}, "model:\n  params: {}\n"),
        "v1-5-pruned-emaonly": ({conv_in: (320, 4, 3, 3), to_k: (320, 768)}, None),
    }
    for name, (shapes, sidecar) in files.items():
        save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, tmp_path / f"{name}.safetensors")
        if sidecar:
            (tmp_path / f"{name}.yaml").write_text(sidecar)
    assert load_config(ROOT / "configs" / "sd-v2.yaml") == sd2_config()  # the same numbers, for readers
    turbo = load_config(ROOT / "configs" / "sd-turbo.yaml")
    assert dataclasses.replace(turbo, timestep_spacing="", sampling=SamplingConfig()) == sd2_config()
    v768 = peek_config(tmp_path / "v2-1_768-ema-pruned.safetensors")
    assert v768 == load_config(ROOT / "configs" / "sd-v2-v.yaml")
    inpainting = peek_config(tmp_path / "512-inpainting-ema.safetensors")
    assert inpainting == load_config(ROOT / "configs" / "sd-v2-inpainting.yaml")
    assert peek_config(tmp_path / "v1-5-pruned-emaonly.safetensors") == load_config(ROOT / "configs" / "sd-v1.yaml")


def test_convert_both_ways_keeps_every_tensor_and_the_openclip_tokenizer(sd2, tmp_path, capsys):
    _, _, folder = sd2["epsilon", 4]
    assert convert.main([str(folder), str(tmp_path / "sd2.safetensors")]) == 0
    assert any(k.startswith("cond_stage_model.model.") for k in load_file(tmp_path / "sd2.safetensors"))
    assert convert.main([str(tmp_path / "sd2.safetensors"), str(tmp_path / "back")]) == 0
    for sub in ("unet", "vae", "text_encoder"):
        (a,), (b,) = [sorted((f / sub).glob("*.safetensors")) for f in (folder, tmp_path / "back")]
        a, b = load_file(a), load_file(b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    tokenizer = load_model(tmp_path / "back").tokenizer
    assert tokenizer("a", padding="max_length", max_length=5).input_ids == [49406, 320, 49407, 0, 0]


# ---------------------------------------------------------------- training, half precision


def test_train_unet_trains_the_tiny_sd2_config_with_v_prediction_at_zero_terminal_snr(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, (name, rgb) in enumerate([("red", (220, 40, 40)), ("blue", (40, 60, 220))] * 2):
        pixels = np.clip(np.array(rgb) + rng.integers(-25, 26, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a {name} picture"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    argv = ["--config", str(ROOT / "configs" / "train-unet-tiny-sd2.yaml"), "tracker=none", f"data.path={tmp_path}"]
    argv += ["max_steps=2", "batch_size=2", "validation.every=2", "validation.steps=2", "validation.sampler=euler"]
    argv += ["model.rescale_betas_zero_snr=true", f"output_dir={tmp_path / 'run'}"]
    assert run_in_process(train_unet, argv) == 0
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.cfg.unet == load_config(TINY_SD2).unet and model.cfg.text_encoder.open_clip
    assert model.cfg.parameterization == "v" and model.cfg.rescale_betas_zero_snr
    assert any(k.startswith("cond_stage_model.model.") for k in load_file(tmp_path / "run" / "model.safetensors"))
    assert Image.open(tmp_path / "run" / "validation" / "step-000002.png").size == (32, 16)


def test_the_sd2_training_configs_are_valid():
    def read(name, *overrides):
        return train_unet.load_train_config(
            train_unet.parse_args(["--config", str(ROOT / "configs" / name), *overrides])
        )[0]

    assert read("train-unet-tiny-sd2.yaml").model == load_config(TINY_SD2)
    full = read("train-unet-sd-v2.yaml", "init_from=''")  # its model comes from the file of init_from
    assert full.data.resolution == 768 and 1 <= full.validation.every <= full.max_steps


def test_upcast_attention_runs_attention_in_float32_in_half_precision(monkeypatch):
    """SD 2.1's q k^T overflows fp16 (black images in A1111 without --no-half): its attention is computed in float32
    when the UNet runs in half precision, and in the model's own dtype otherwise."""
    seen = []

    def recording(q, k, v, heads):
        seen.append(q.dtype)
        return ldm.attention.attention(q, k, v, heads)

    monkeypatch.setattr(ldm.unet, "attention", recording)
    cfg = load_config(TINY_SD2)
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, CONTEXT)
    for upcast, dtype, expected in [(True, torch.bfloat16, torch.float32), (False, torch.bfloat16, torch.bfloat16)]:
        cfg.unet.upcast_attention = upcast
        unet = randomize_(UNetModel(cfg.unet)).to(dtype).eval()
        seen.clear()
        with torch.inference_mode():
            assert unet(x.to(dtype), torch.tensor([10]), c.to(dtype)).dtype == dtype
        assert seen and set(seen) == {expected}


@pytest.mark.slow
def test_full_sd_2_1_single_file_loads_strictly_and_its_unet_is_diffusers(tmp_path):
    """The full-size SD 2.1 architecture on random weights, written as real SD 2.1 files are (OpenCLIP's 24 blocks and
    projection, fp16, no config of ours): detected and loaded strictly with no config, its UNet = diffusers' UNet made
    by diffusers' own converter from the file."""
    model = randomize_(StableDiffusion(sd2_config()))
    save_single_file(model, tmp_path / "ours.safetensors", torch.float16)
    del model
    state = load_file(tmp_path / "ours.safetensors")
    g = torch.Generator().manual_seed(1)
    blocks = "cond_stage_model.model.transformer.resblocks."
    state |= {
        k.replace(blocks + "22.", blocks + "23."): torch.randn(v.shape, generator=g).half() * 0.02
        for k, v in state.items()
        if k.startswith(blocks + "22.")
    }
    state |= {
        "cond_stage_model.model.text_projection": torch.randn(1024, 1024, generator=g).half(),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6052),
    }
    real = {  # names and shapes of v2-1_768-ema-pruned.safetensors
        blocks + "23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        TO_K: (320, 1024),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
    }
    assert {k: tuple(state[k].shape) for k in real} == real
    save_file(state, tmp_path / "v2-1_768-ema-pruned.safetensors")
    del state
    loaded = load_model(tmp_path / "v2-1_768-ema-pruned.safetensors")
    assert dataclasses.replace(loaded.cfg, parameterization="eps", image_size=64) == sd2_config()
    unet = loaded.unet.eval()
    del loaded
    with safe_open(tmp_path / "v2-1_768-ema-pruned.safetensors", "pt") as f:
        checkpoint = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
    original = compvis_original_config(sd2_config())
    params = original["model"]["params"]["unet_config"]["params"]
    del params["num_heads"]
    params |= {"num_head_channels": 64, "use_linear_in_transformer": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    del checkpoint
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 1024)
    with torch.inference_mode():
        ours, theirs = unet(x, t, c), ref.eval()(x, t, c).sample
    assert ours.std() > 0.05 and (ours - theirs).abs().max() <= 1e-3


def test_an_sd2_controlnet_matches_diffusers(tmp_path):
    """A ControlNet of the tiny SD2 model (Linear projections and 16-channel heads in its encoder copy, an 8x VAE for
    its hint block): its file read by diffusers' ControlNetModel.from_single_file, and the images of
    StableDiffusionControlNetPipeline on our exported folder."""
    model = tiny_model(parameterization="v", overrides=FACTOR8, config="tiny-sd2.yaml")
    save_diffusers_folder(model, tmp_path / "sd2")
    base = StableDiffusionPipeline.from_pretrained(tmp_path / "sd2", safety_checker=None)
    base.scheduler = make_scheduler("ddim", model.cfg)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps(controlnet_config(model.cfg)))
    net = randomize_(ControlNet(model.cfg), 1)
    with torch.no_grad():  # residuals as large as the UNet's own activations, so that a wrong one shows
        for name, p in net.named_parameters():
            if name.startswith(("zero_convs", "middle_block_out")):
                p.mul_(30)
    save_controlnet(net, tmp_path / "control.safetensors")
    theirs = ControlNetModel.from_single_file(
        str(tmp_path / "control.safetensors"), config=str(tmp_path / "config"), local_files_only=True
    )
    pipe = Pipeline(model)
    hint = smooth_image(4, 64, 64)
    control = Control(pipe.load_controlnet(tmp_path / "control.safetensors"), hint, scale=0.8)
    images, trajectory = ours_run(pipe, 5, 2, controls=[control])
    ref = StableDiffusionControlNetPipeline(**base.components, controlnet=theirs.eval())
    ref.set_progress_bar_config(disable=True)
    theirs_images, latents = diffusers_run(
        ref, 5, 2, image=hint, controlnet_conditioning_scale=0.8, height=64, width=64
    )
    assert_same(images, theirs_images, trajectory[-1], latents)
    assert (trajectory[-1] - ours_run(pipe, 5, 2)[1][-1]).abs().mean() > 1e-2  # the ControlNet matters
