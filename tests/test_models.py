"""UNet and VAE against diffusers' own models, through diffusers' own single-file converters."""

import warnings

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from torch.utils.flop_counter import FlopCounterMode

from conftest import compvis_original_config, randomize_
from ldm.unet import DeepCache, UNetModel, skip_branches
from ldm.vae import AutoencoderKL


def diffusers_unet(cfg, unet: UNetModel) -> UNet2DConditionModel:
    """Our weights -> diffusers' convert_ldm_unet_checkpoint -> strict load into UNet2DConditionModel."""
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = sfu.create_unet_diffusers_config_from_ldm(
            compvis_original_config(cfg), checkpoint, image_size=cfg.vae.resolution
        )
    config["norm_num_groups"] = cfg.unet.num_groups  # CompVis hard-codes 32; our tiny config does not
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return ref.eval()


def diffusers_vae(cfg, vae: AutoencoderKL) -> DiffusersVAE:
    checkpoint = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = sfu.create_vae_diffusers_config_from_ldm(
            compvis_original_config(cfg), checkpoint, image_size=cfg.vae.resolution
        )
    config["norm_num_groups"] = cfg.vae.num_groups
    ref = DiffusersVAE(**config)
    ref.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return ref.eval()


def check_unet(cfg, latent_hw):
    torch.manual_seed(0)
    unet = randomize_(UNetModel(cfg.unet)).eval()
    ref = diffusers_unet(cfg, unet)
    x = torch.randn(2, cfg.unet.in_channels, *latent_hw)
    t = torch.tensor([3, 981])
    context = torch.randn(2, 77, cfg.unet.context_dim)
    with torch.inference_mode():
        ours, theirs = unet(x, t, context), ref(x, t, context).sample
    assert ours.shape == (2, cfg.unet.out_channels, *latent_hw)
    assert ours.std() > 0.05  # a real signal, not a zeroed output layer
    assert (ours - theirs).abs().max() <= 1e-4


def check_vae(cfg, image_hw):
    vae = randomize_(AutoencoderKL(cfg.vae), seed=1).eval()
    ref = diffusers_vae(cfg, vae)
    images = torch.rand(2, 3, *image_hw) * 2 - 1
    f = 2 ** (len(cfg.vae.ch_mult) - 1)
    z = torch.randn(2, cfg.vae.embed_dim, image_hw[0] // f, image_hw[1] // f)
    with torch.inference_mode():
        ours, theirs = vae.encode(images), ref.encode(images).latent_dist
        assert ours.mean.std() > 0.05
        assert (ours.mean - theirs.mean).abs().max() <= 1e-4
        assert (ours.std - theirs.std).abs().max() <= 1e-4
        decoded, ref_decoded = vae.decode(z), ref.decode(z).sample
    assert decoded.shape == (2, 3, *image_hw) and decoded.std() > 0.05
    assert (decoded - ref_decoded).abs().max() <= 1e-4


def test_unet_matches_diffusers(tiny_cfg):
    check_unet(tiny_cfg, (8, 8))


def test_unet_non_square_and_scalar_timestep(tiny_cfg):
    unet = randomize_(UNetModel(tiny_cfg.unet)).eval()
    ref = diffusers_unet(tiny_cfg, unet)
    x, context = torch.randn(1, 4, 8, 16), torch.randn(1, 77, tiny_cfg.unet.context_dim)
    with torch.inference_mode():
        assert (unet(x, torch.tensor(500), context) - ref(x, 500, context).sample).abs().max() <= 1e-4


def test_unet_sides_not_divisible_by_its_downsampling(tiny_cfg):
    check_unet(tiny_cfg, (10, 6))  # 10 -> 5 -> 3 and back: upsampled to each skip's size, as diffusers does


def test_unet_head_channels_and_depth(tiny_cfg):
    tiny_cfg.unet.num_heads, tiny_cfg.unet.num_head_channels, tiny_cfg.unet.transformer_depth = 4, -1, 2
    check_unet(tiny_cfg, (8, 8))


def test_unet_gradient_checkpointing_same_gradients(tiny_cfg):
    unet = randomize_(UNetModel(tiny_cfg.unet)).train()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 77, 32)
    unet(x, t, c).square().mean().backward()
    plain = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    unet.cfg.use_checkpoint = True
    unet(x, t, c).square().mean().backward()
    for a, p in zip(plain, unet.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_deepcache_shallow_call_on_its_own_deep_features_is_the_full_call(tiny_cfg):
    """For every skip branch: a cached (shallow) call on the same input as the full call before it reuses exactly the
    deep features that call made, so its output is the full call's, bit for bit: the shallow path takes the right
    skips and the right blocks. A full call is what diffusers' UNet gives (test_unet_matches_diffusers)."""
    unet = randomize_(UNetModel(tiny_cfg.unet)).eval()
    x, t, c = torch.randn(2, 4, 10, 6), torch.tensor([3, 700]), torch.randn(2, 77, tiny_cfg.unet.context_dim)
    middle = []
    unet.middle_block.register_forward_hook(lambda *_: middle.append(1))
    with torch.inference_mode():
        full = unet(x, t, c)
        for branch in range(skip_branches(tiny_cfg.unet)):
            cache = DeepCache(2, branch)
            assert torch.equal(unet(x, t, c, cache=cache), full)
            middle.clear()
            assert torch.equal(unet(x, t, c, cache=cache), full) and not middle  # shallow: the middle block did not run
            assert not torch.equal(unet(x * 0.9, t, c, cache=cache), full) and middle  # the third call: a full one


def test_deepcache_3_makes_over_2x_fewer_unet_flops_at_sd_v1_shapes(sd_cfg):
    """torch's FLOP counter over three calls of the SD v1 UNet (batch 2 for CFG, 64x64 latents, 77 tokens), built on
    the meta device (shapes only, nothing computed): DeepCache N=3 on branch 0 runs one full call (1.61 TFLOP) and two
    shallow ones (0.13 TFLOP each): 2.6x fewer FLOPs per step than no caching; branch 1 saves less (2.1x)."""
    with torch.device("meta"):
        unet = UNetModel(sd_cfg.unet).eval()
        x, t, c = torch.randn(2, 4, 64, 64), torch.tensor(500), torch.randn(2, 77, 768)
    saved = []
    for branch in (0, 1):
        cache, calls = DeepCache(3, branch), []
        for _ in range(3):
            with FlopCounterMode(display=False) as counter:
                unet(x, t, c, cache=cache)
            calls.append(counter.get_total_flops())
        assert calls[0] > 1.5e12 and calls[1] == calls[2]  # the first call: the whole UNet
        saved.append(3 * calls[0] / sum(calls))  # no caching: three full calls
    assert saved[0] >= 2.5 and 2 <= saved[1] < saved[0]


def test_vae_matches_diffusers(tiny_cfg):
    check_vae(tiny_cfg, (16, 16))


def test_vae_posterior_kl_and_sample(tiny_cfg):
    vae = randomize_(AutoencoderKL(tiny_cfg.vae)).eval()
    post = vae.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    g = torch.Generator().manual_seed(0)
    sample = post.sample(g)
    expected = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample, expected)
    # KL of N(m, s^2) to N(0, 1) per element: 0.5 (m^2 + s^2 - 1 - log s^2)
    var = post.std**2
    assert torch.allclose(post.kl(), 0.5 * (post.mean**2 + var - 1 - var.log()).sum(dim=[1, 2, 3]), rtol=1e-4)


@pytest.mark.slow
def test_full_sd_v1_unet_and_vae_match_diffusers(sd_cfg):
    check_unet(sd_cfg, (16, 16))
    check_vae(sd_cfg, (64, 64))


def test_latent_scale_factor_gives_unit_std_latents(tiny_cfg):
    from ldm.vae import latent_scale_factor

    vae = randomize_(AutoencoderKL(tiny_cfg.vae), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(3, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3)]
    s = latent_scale_factor(vae, batches, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same posterior noise again
    with torch.no_grad():
        z = torch.cat([vae.encode(x).sample(g) for x in batches])
    assert abs(s - 1 / z.std().item()) < 1e-4 * s and s != 1.0
    assert (s * z).std().item() == pytest.approx(1.0, abs=1e-5)


def test_vae_forward_reconstructs_through_the_given_noise(tiny_cfg):
    vae = randomize_(AutoencoderKL(tiny_cfg.vae), seed=4).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, tiny_cfg.vae.embed_dim, 8, 8)
    with torch.no_grad():
        xrec, post = vae(x, noise)
        assert torch.equal(xrec, vae.decode(post.mean + post.std * noise))
