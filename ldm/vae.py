"""The KL-regularised autoencoder of latent diffusion (CompVis `AutoencoderKL`, kl-f8 for SD v1).

Attribute names are the CompVis state-dict names (`first_stage_model.*` of an SD v1 file):
encoder.{conv_in, down.{i}.block.{j}, down.{i}.downsample, mid.{block_1, attn_1, block_2}, norm_out, conv_out},
decoder.{conv_in, mid, up.{i}.block.{j}, up.{i}.upsample, norm_out, conv_out}, quant_conv, post_quant_conv.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.attention import attention
from ldm.config import VAEConfig
from ldm.unet import Upsample


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, c, h * w).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, H*W, C)
        y = attention(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with CompVis's asymmetric padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, optional attention, optional resampling."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, use_attn: bool, cfg: VAEConfig):
        super().__init__()
        channels = [in_channels] + [out_channels] * n_blocks
        self.block = nn.ModuleList(
            ResnetBlock(a, b, cfg.num_groups, cfg.dropout) for a, b in zip(channels, channels[1:])
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels, cfg.num_groups) for _ in range(n_blocks if use_attn else 0))

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class Mid(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.num_groups, cfg.dropout)
        self.attn_1 = AttnBlock(channels, cfg.num_groups)
        self.block_2 = ResnetBlock(channels, channels, cfg.num_groups, cfg.dropout)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch, res = cfg.ch, cfg.resolution
        for i, out_ch in enumerate(widths):
            level = Level(in_ch, out_ch, cfg.num_res_blocks, res in cfg.attn_resolutions, cfg)
            if i != len(widths) - 1:
                level.downsample = Downsample(out_ch)
                res //= 2
            self.down.append(level)
            in_ch = out_ch
        self.mid = Mid(in_ch, cfg)
        self.norm_out = Normalize(in_ch, cfg.num_groups)
        self.conv_out = nn.Conv2d(in_ch, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, 3, H, W) -> (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch * ch_mult[i], H / 2^i, W / 2^i)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * z_channels, H / f, W / f): mean and log-variance


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_ch, res = widths[-1], cfg.resolution // 2 ** (len(widths) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = Mid(in_ch, cfg)
        levels = []
        for i in reversed(range(len(widths))):
            level = Level(in_ch, widths[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions, cfg)
            if i != 0:
                level.upsample = Upsample(widths[i])
                res *= 2
            levels.insert(0, level)
            in_ch = widths[i]
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, run last
        self.norm_out = Normalize(in_ch, cfg.num_groups)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, z_channels, h, w) -> (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, h * f, w * f)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn on the generator's device (a CPU generator works for CUDA tensors)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar), per sample."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: images in [-1, 1], (B, 3, H, W) -> posterior over (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) -> images (B, 3, h * f, w * f) in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """Reconstruction through a posterior sample z = mean + std * noise (noise drawn when not given), and the
        posterior."""
        posterior = self.encode(x)
        noise = torch.randn_like(posterior.mean) if noise is None else noise
        return self.decode(posterior.mean + posterior.std * noise), posterior


@torch.no_grad()
def latent_scale_factor(vae: AutoencoderKL, batches, generator: torch.Generator | None = None) -> float:
    """1 / std of posterior samples z ~ q(z|x) over the images of `batches` (each (B, 3, H, W) in [-1, 1]): how
    SD's 0.18215 was measured (CompVis `scale_by_std`: 1 / z.flatten().std(), there on one batch), so that the
    UNet sees latents of about unit variance."""
    total, total_sq, n = 0.0, 0.0, 0
    for x in batches:
        z = vae.encode(x).sample(generator).double()
        total, total_sq, n = total + z.sum(), total_sq + z.pow(2).sum(), n + z.numel()
    var = (total_sq - total**2 / n) / (n - 1)  # the unbiased variance of all latent values, as torch.std
    return float(var.rsqrt())
