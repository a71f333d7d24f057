"""VAE losses: key names against torchvision / lpips / taming, the gradient paths, hand-checked formulas."""

import math

import pytest
import torch

from conftest import randomize_
from ldm.checkpoint import CheckpointError
from ldm.config import ConfigError, LossConfig
from ldm.losses import (
    LPIPS,
    GeneratorLoss,
    NLayerDiscriminator,
    adaptive_weight,
    discriminator_loss,
    hinge_d_loss,
    load_lpips,
    vanilla_d_loss,
)
from ldm.vae import AutoencoderKL

# torchvision's vgg16().features: conv layers at these indices (cfg "D": 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M,
# each conv followed by a ReLU), with these (out, in) channels; the lpips package's heads lin0..4 over relu1_2..relu5_3.
TORCHVISION_VGG16_CONVS = {
    0: (64, 3),
    2: (64, 64),
    5: (128, 64),
    7: (128, 128),
    10: (256, 128),
    12: (256, 256),
    14: (256, 256),
    17: (512, 256),
    19: (512, 512),
    21: (512, 512),
    24: (512, 512),
    26: (512, 512),
    28: (512, 512),
}
LPIPS_HEADS = {0: 64, 1: 128, 2: 256, 3: 512, 4: 512}


def expected_lpips_shapes():
    shapes = {}
    for i, (out, inp) in TORCHVISION_VGG16_CONVS.items():
        shapes[f"features.{i}.weight"], shapes[f"features.{i}.bias"] = (out, inp, 3, 3), (out,)
    for tap, c in LPIPS_HEADS.items():
        shapes[f"lin{tap}.model.1.weight"] = (1, c, 1, 1)
    return shapes


def test_lpips_state_dict_is_torchvision_vgg16_features_plus_lpips_heads():
    assert {k: tuple(v.shape) for k, v in LPIPS().state_dict().items()} == expected_lpips_shapes()


def test_load_lpips_from_torchvision_and_lpips_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) for k, s in expected_lpips_shapes().items()}
    vgg = {k: v for k, v in tensors.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.randn(8, 4, generator=g)  # a full vgg16() file has its classifier too
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save({k: v for k, v in tensors.items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    lpips = load_lpips([tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth"])
    assert all(torch.equal(lpips.state_dict()[k], v) for k, v in tensors.items())
    assert not any(p.requires_grad for p in lpips.parameters())
    with pytest.raises(CheckpointError, match=r"missing tensor 'lin0\.model\.1\.weight'"):
        load_lpips([tmp_path / "vgg16-397923af.pth"])


def test_lpips_is_a_distance_and_stays_in_eval_mode():
    lpips = randomize_(LPIPS()).train()
    assert not lpips.training
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(d, lpips(y, x))
    assert lpips(x, x).abs().max() < 1e-6


def tiny_vae(tiny_cfg, seed=0):
    return randomize_(AutoencoderKL(tiny_cfg.vae), seed=seed)


def test_perceptual_term_gives_the_decoder_a_gradient(tiny_cfg):
    vae, lpips = tiny_vae(tiny_cfg), randomize_(LPIPS(), seed=2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    last = vae.decoder.conv_out.weight
    grads = {}
    for weight in (1.0, 0.0):  # perceptual alone (no pixel, no KL term), then nothing at all
        loss_fn = GeneratorLoss(LossConfig(pixelloss_weight=0.0, kl_weight=0.0, perceptual_weight=weight))
        xrec, posterior = vae(x)
        loss, _ = loss_fn(x, xrec, posterior, last, lpips)
        vae.zero_grad()
        loss.backward()
        grads[weight] = [p.grad.clone() for p in vae.decoder.parameters()]
    assert all(torch.isfinite(g).all() for g in grads[1.0])
    assert sum(g.abs().sum() for g in grads[1.0]) > 0
    assert sum(g.abs().sum() for g in grads[0.0]) == 0  # so the gradient above is the perceptual term's


def test_nll_and_kl_follow_compvis_sums_and_logvar_is_learned(tiny_cfg):
    vae = tiny_vae(tiny_cfg)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    xrec, posterior = vae(x)
    s = 0.7
    loss_fn = GeneratorLoss(LossConfig(logvar_init=s, kl_weight=0.01))
    loss, logs = loss_fn(x, xrec, posterior, vae.decoder.conv_out.weight)
    l1 = (x - xrec).abs().detach()
    nll = (l1 / math.exp(s) + s).sum() / 2  # sum over pixels, mean over the batch
    kl = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar).sum() / 2
    assert torch.allclose(logs["nll"], nll) and torch.allclose(loss, nll + 0.01 * kl)
    loss.backward()  # d nll / ds = sum(1 - |x - x̂| e^-s) / B
    assert loss_fn.logvar.grad.item() == pytest.approx(((1 - l1 * math.exp(-s)).sum() / 2).item(), rel=1e-4)
    assert list(loss_fn.state_dict()) == ["logvar"]  # all that a training checkpoint keeps of it


def test_discriminator_step_leaves_generator_gradients_untouched(tiny_cfg):
    vae = tiny_vae(tiny_cfg)
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2)
    loss_fn = GeneratorLoss(LossConfig(disc_weight=1.0))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    xrec, posterior = vae(x)
    g_loss, logs = loss_fn(x, xrec, posterior, vae.decoder.conv_out.weight, discriminator=disc)
    g_loss.backward()
    assert logs["d_weight"] > 0 and "g_loss" in logs
    assert all(p.grad is None for p in disc.parameters())  # the generator step does not train D
    before = {n: p.grad.clone() for n, p in vae.named_parameters()}
    d_loss, _ = discriminator_loss(disc, x, xrec, "hinge")
    d_loss.backward()
    assert all(torch.equal(p.grad, before[n]) for n, p in vae.named_parameters())
    # ...and trains D (the last bias may get none: hinge's -1 and +1 cancel while all logits are within the margin)
    assert all(p.grad.abs().sum() > 0 for n, p in disc.named_parameters() if n.endswith("weight"))


def test_adaptive_weight_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    nll = 3 * w[0] + 4 * w[1]  # gradient (3, 4): norm 5
    g = 2 * w[1] - 7.0  # gradient (0, 2): norm 2
    assert adaptive_weight(nll, g, w, disc_weight=0.5).item() == pytest.approx(0.5 * 5 / (2 + 1e-4))
    flat = 0 * w.sum()  # no gradient: 5 / 1e-4 = 5e4, clamped to 1e4
    assert adaptive_weight(nll, flat, w, disc_weight=0.5).item() == pytest.approx(0.5 * 1e4)


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 1) / 2 + (0 + 1.5) / 2))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((softplus(-2) + softplus(0)) / 2 + (softplus(-2) + softplus(0.5)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


def test_patchgan_keys_and_pix2pix_receptive_grid():
    disc = NLayerDiscriminator(3, ndf=4, n_layers=3)
    # taming's NLayerDiscriminator: conv(+bias), lrelu, then [conv(no bias), BatchNorm, lrelu] x 3, conv(+bias)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {
        "main.0.weight",
        "main.0.bias",
        "main.2.weight",
        "main.5.weight",
        "main.8.weight",
        "main.11.weight",
        "main.11.bias",
    }
    expected |= {f"main.{i}.{b}" for i in (3, 6, 9) for b in bn}
    assert set(disc.state_dict()) == expected
    # pix2pix's 70x70 PatchGAN maps a 256x256 image to a 30x30 grid of logits
    assert disc(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


@pytest.mark.parametrize("key, value", [("pixel_loss", "l3"), ("disc_loss", "wgan")])
def test_bad_loss_names_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"loss.{key} must be"):
        LossConfig(**{key: value})
