"""Stable Diffusion 2.x and SD-Turbo against diffusers, on tiny random SD2-topology models that diffusers and
transformers build here: Linear proj_in / proj_out, per-level head counts from fixed-width heads (SD2's 64-channel
heads scaled down to 16), attention upcast, a gelu CLIP text model whose tokenizer pads with "!", v-prediction and
epsilon. Images: mean |difference| <= 1/255 and final latents within 1e-4 of diffusers' pipelines."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import assert_same, diffusers_run, ours_run, pixels, randomize_
from ldm.checkpoint import load_model
from ldm.pipeline import Pipeline
from ldm.samplers import SAMPLERS, make_scheduler
from ldm.text_encoder import build_tokenizer

CONTEXT = 48  # SD2's 1024-wide context, scaled down (SD v1's tiny model has 32)
WIDTHS = (32, 64, 64)
HEAD_CHANNELS = 16  # SD2's 64-channel heads, scaled down: 2, 4, 4 heads per level


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
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        norm_num_groups=4,
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
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
    """{(prediction, in_channels): (our pipeline, diffusers' pipeline)}, ours loaded from diffusers' folder."""
    out = {}
    for prediction, channels in (("v_prediction", 4), ("epsilon", 4), ("v_prediction", 9)):
        folder = tmp_path_factory.mktemp(f"sd2-{prediction}-{channels}")
        ref = sd2_pipeline(folder, prediction, channels)
        out[prediction, channels] = (Pipeline(load_model(folder / "diffusers")).eval(), ref)
    return out


def test_sd2_folder_reads_as_the_sd2_unet(sd2):
    ours, ref = sd2["v_prediction", 4]
    u = ours.cfg.unet
    assert (u.use_linear_in_transformer, u.upcast_attention, u.num_head_channels, u.context_dim) == (
        True,
        True,
        HEAD_CHANNELS,
        CONTEXT,
    )
    assert ours.cfg.parameterization == "v" and ours.cfg.text_encoder.hidden_act == "gelu"
    assert isinstance(ours.unet.input_blocks[1][1].proj_in, torch.nn.Linear)
    for hw in ((8, 8), (10, 6)):
        x, t, c = torch.randn(2, 4, *hw), torch.tensor([3, 981]), torch.randn(2, 77, CONTEXT)
        with torch.inference_mode():
            mine, theirs = ours.unet(x, t, c), ref.unet(x, t, c).sample
        assert mine.std() > 0.05 and (mine - theirs).abs().max() <= 1e-4


def test_the_tokenizer_of_the_folder_pads_with_the_exclamation_mark(sd2):
    ours, ref = sd2["epsilon", 4]
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
    ours, ref = sd2[prediction, 4]
    ref.scheduler = make_scheduler(sampler, ours.cfg)
    images, trajectory = ours_run(ours, seed=3, n=2, sampler=sampler)
    theirs, latents = diffusers_run(ref, seed=3, n=2)
    assert_same(images, theirs, trajectory[-1], latents)
    assert pixels(images).std() > 8  # not flat


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_img2img_matches_diffusers(sd2, sampler):
    ours, ref = sd2["v_prediction", 4]
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.scheduler = make_scheduler(sampler, ours.cfg)
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    images, trajectory = ours_run(ours, seed=11, n=2, mode="img2img", init_image=image, strength=0.6, sampler=sampler)
    theirs, latents = diffusers_run(img2img, seed=11, n=2, image=image, strength=0.6)
    assert_same(images, theirs, trajectory[-1], latents)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_nine_channel_inpainting_matches_diffusers(sd2, sampler):
    ours, ref = sd2["v_prediction", 9]
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
