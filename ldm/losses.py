"""Training losses of the KL autoencoder: the recipe of SD v1's kl-f8 VAE (CompVis `LPIPSWithDiscriminator`,
after taming-transformers, Esser et al. 2021). Sums run over pixels and are divided by the batch, as there.

Generator (encoder + decoder):
    rec  = w_pix * |x - x̂|  +  w_p * LPIPS(x, x̂)              (squared error with pixel_loss: l2)
    nll  = rec / exp(s) + s                                  s: a learned log-variance (one scalar)
    L_G  = nll + w_kl * KL(q(z|x) || N(0, I))  +  λ * (-D(x̂))  (the GAN term from `disc_start` on)
    λ    = w_disc * ||∇_w nll|| / (||∇_w (-D(x̂))|| + 1e-4)    w: the decoder's last conv (Esser et al. eq. 7)
Discriminator (a PatchGAN), on detached reconstructions:
    hinge:   L_D = 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))
    vanilla: L_D = 0.5 * (mean softplus(-D(x)) + mean softplus(D(x̂)))
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.config import LossConfig
from ldm.io import load_state_strict, read_state_dict
from ldm.vae import DiagonalGaussian

# torchvision's vgg16 ("configuration D"), without its last max-pool: ints are 3x3 convs (+ ReLU), "M" 2x2 max-pools.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features
TAP_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3: the same layer indices, so the same state-dict keys."""
    layers, channels = [], 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)


class LinearHead(nn.Module):
    """The lpips package's NetLinLayer: a 1x1 conv to one channel. Slot 0 was a Dropout, a no-op in eval mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018, VGG16, v0.1), frozen and always in eval mode.

    d(x, y) = sum_l mean_hw( w_l . (f_l(x) - f_l(y))^2 ),  f_l: VGG features at tap l, unit-normalised over channels.
    State dict: torchvision's `features.{i}.weight|bias` + the lpips package's `lin{l}.model.1.weight`.
    Gradients flow to the inputs (that is the point of a training loss); only its own weights are frozen.
    """

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        for tap, channels in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{tap}", LinearHead(channels))
        # lpips' ScalingLayer: [-1, 1] images -> ImageNet-normalised VGG input
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: images in [-1, 1], (B, 3, H, W) with H, W >= 16 -> distance per image, (B,)."""
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one pass through VGG for both
        d = 0.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f.chunk(2)
                d = d + getattr(self, f"lin{TAPS.index(i)}")((fx - fy).pow(2)).mean(dim=[1, 2, 3])
        return d


def load_lpips(paths: list[str | Path]) -> LPIPS:
    """LPIPS from local files whose tensors together hold `features.*` (torchvision's vgg16 weights, e.g.
    vgg16-397923af.pth; its `classifier.*` is ignored) and `lin0..4.model.1.weight` (the lpips package's vgg.pth)."""
    state = {}
    for path in paths:
        state |= read_state_dict(path)[0]
    lpips = LPIPS()
    load_state_strict(
        lpips, {k: v for k, v in state.items() if not k.startswith("classifier.")}, " + ".join(map(str, paths))
    )
    return lpips


class NLayerDiscriminator(nn.Module):
    """PatchGAN of pix2pix / taming: a logit for each overlapping patch. Keys `main.{i}` as CompVis's discriminator.

    n_layers stride-2 convs halve the image, two stride-1 4x4 convs take 2 more pixels: out = size / 2**n - 2.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2 if n < n_layers else 1, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(
    nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float
) -> torch.Tensor:
    """λ = disc_weight * ||∇_w nll|| / (||∇_w g_loss|| + 1e-4), clamped to [0, 1e4] and detached
    (Esser et al. eq. 7)."""
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


class GeneratorLoss(nn.Module):
    """L_G of the module docstring; its one parameter is the learned log-variance (its state dict: `logvar`)."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.logvar = nn.Parameter(torch.tensor(cfg.logvar_init), requires_grad=cfg.learn_logvar)

    def forward(
        self,
        x,
        xrec,
        posterior: DiagonalGaussian,
        last_layer: torch.Tensor,
        lpips: LPIPS | None = None,
        discriminator: nn.Module | None = None,
    ):
        """-> (loss, logs). lpips: None drops the perceptual term. discriminator: None before `disc_start`; else
        the PatchGAN, which this step must not train."""
        cfg = self.cfg
        rec = (x - xrec).abs() if cfg.pixel_loss == "l1" else (x - xrec).pow(2)
        rec = cfg.pixelloss_weight * rec
        if lpips is not None and cfg.perceptual_weight > 0:
            rec = rec + cfg.perceptual_weight * lpips(x, xrec).view(-1, 1, 1, 1)  # broadcast per pixel, as CompVis
        nll = (rec / self.logvar.exp() + self.logvar).sum() / x.shape[0]
        kl = posterior.kl().mean()
        loss = nll + cfg.kl_weight * kl
        logs = {"nll": nll.detach(), "rec": rec.detach().mean(), "kl": kl.detach(), "logvar": self.logvar.detach()}
        if discriminator is not None:
            discriminator.requires_grad_(False)  # no graph into D's weights: only x̂ gets the GAN gradient
            g_loss = -discriminator(xrec).mean()
            discriminator.requires_grad_(True)
            weight = adaptive_weight(nll, g_loss, last_layer, cfg.disc_weight)
            loss = loss + weight * g_loss
            logs |= {"g_loss": g_loss.detach(), "d_weight": weight}
        return loss, logs | {"loss": loss.detach()}


def discriminator_loss(discriminator: nn.Module, x: torch.Tensor, xrec: torch.Tensor, kind: str = "hinge"):
    """-> (L_D, logs). x̂ is detached here, so this step never reaches the autoencoder's weights."""
    logits_real = discriminator(x.detach())
    logits_fake = discriminator(xrec.detach())
    loss = D_LOSSES[kind](logits_real, logits_fake)
    return loss, {
        "d_loss": loss.detach(),
        "logits_real": logits_real.detach().mean(),
        "logits_fake": logits_fake.detach().mean(),
    }
