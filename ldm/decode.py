"""Latents -> images: the VAE decoder (or TAESD, ldm.taesd) one image at a time, in overlapping tiles beyond a size,
and again in float32 where a half-precision decode overflowed (SD's black images); and live previews, cheap enough
to show every few steps: TAESD when there is one, else a linear map of each latent pixel to a colour fitted to the
model's VAE (AUTOMATIC1111's "Approx cheap", fitted here rather than shipped per model)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ldm.model import StableDiffusion
from ldm.taesd import TAESD

PREVIEW_FIT_LATENTS = (1, 16, 16)  # the random latents (batch, side, side) that fit_rgb_projection decodes


@torch.no_grad()
def fit_rgb_projection(model: StableDiffusion, seed: int = 0) -> torch.Tensor:
    """The (C + 1, 3) matrix M of least squares [z, 1] M ~ rgb over the pixels of random N(0, 1) latents z (the
    UNet's scale) and the mean colour in [0, 1] of each one's f x f block of the VAE's decode: latents -> colours
    in one matrix product (A1111's "Approx cheap" preview)."""
    weight = next(model.vae.parameters())
    b, side, _ = PREVIEW_FIT_LATENTS
    z = torch.randn(b, model.cfg.vae.embed_dim, side, side, generator=torch.Generator().manual_seed(seed))
    rgb = F.avg_pool2d(
        (model.decode_first_stage(z.to(weight)).float().cpu() / 2 + 0.5).clamp(0, 1), model.cfg.vae.factor
    )
    inputs = torch.cat([z, torch.ones(b, 1, side, side)], dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1)
    return torch.linalg.lstsq(inputs, rgb.permute(0, 2, 3, 1).reshape(-1, 3)).solution


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Offsets of tiles of `tile` that cover [0, size), `stride` apart, the last one flush with the end."""
    return sorted(set(range(0, max(size - tile, 0), stride)) | {max(size - tile, 0)})


def ramp(size: int, width: int) -> torch.Tensor:
    """Blending weight along one tile side: rises linearly over `width` pixels from each edge, 1 inside."""
    i = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.minimum(i, size - i).div(width).clamp(max=1)


class Decoder:
    """D(z_0 / scale_factor) of a model's VAE (or the OpenVINO backend's decoder, `openvino`; or TAESD's decoder of
    z_0, `taesd`), one image at a time, in tiles of `tile` latents a side blended over `overlap` latents when a latent
    side is larger than `tile`."""

    def __init__(self, model: StableDiffusion, tile: int, overlap: int, openvino=None, taesd: TAESD | None = None):
        self.model, self.tile, self.overlap, self.openvino, self.taesd = model, tile, overlap, openvino, taesd
        self.projection: torch.Tensor | None = None  # fit_rgb_projection's, made at the first preview without TAESD

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> CPU images (B, 3, H, W) in [0, 1].

        An image whose half-precision decode (fp16 / bf16 weights, or autocast) overflows to inf / NaN, as SD's VAE
        does in fp16 (the black images), is decoded again with the VAE in fp32, saying so once."""
        z, vae = latents, self.model.vae
        decode = self.tiled if max(z.shape[-2:]) > self.tile else self.first_stage
        images = [decode(z[i : i + 1]) for i in range(len(z))]
        dtype = next(vae.parameters()).dtype
        half = dtype != torch.float32 or torch.is_autocast_enabled(z.device.type)
        overflowed = [i for i, image in enumerate(images) if half and not image.isfinite().all()]
        if overflowed:
            warnings.warn(
                "the VAE's half-precision decode overflowed (inf / NaN: a black image); decoding again in float32"
            )
            vae.float()
            try:
                with torch.autocast(z.device.type, enabled=False):
                    for i in overflowed:
                        images[i] = decode(z[i : i + 1].float())
            finally:
                vae.to(dtype)
        return (torch.cat([image.float() for image in images]).cpu() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> rough CPU images (B, 3, H, W) in [0, 1]: TAESD's decode, else the fitted linear colours of the
        latent pixels, each shown as an f x f block."""
        if self.taesd is not None:
            return self.tiny(latents).float().cpu()
        if self.projection is None:
            self.projection = fit_rgb_projection(self.model)
        z = latents.float().cpu()
        rgb = torch.einsum("bchw,cd->bdhw", z, self.projection[:-1]) + self.projection[-1][:, None, None]
        return F.interpolate(rgb.clamp(0, 1), scale_factor=self.model.cfg.vae.factor, mode="nearest")

    def first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """D(z_0 / scale_factor) in [-1, 1] by the torch VAE, the OpenVINO backend's decoder or TAESD (from z_0)."""
        if self.taesd is not None:
            return self.tiny(z) * 2 - 1
        return self.model.decode_first_stage(z) if self.openvino is None else self.openvino.decode_first_stage(z)

    def tiny(self, z: torch.Tensor) -> torch.Tensor:
        """TAESD's images in [0, 1] of z_0, by its torch decoder or the OpenVINO backend's conversion of it."""
        return self.taesd.decode(z) if self.openvino is None else self.openvino.taesd_decode(z).to(z.device)

    def tiled(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents (1, C, h, w) in tile-sized tiles overlapping by `overlap`, as the weighted mean of the tiles
        covering each pixel (weights ramp up linearly over the overlap, so seams fade out). GroupNorm statistics and
        the mid-block attention become per tile: close to the plain decode, not equal."""
        f, tile, overlap = self.model.cfg.vae.factor, self.tile, self.overlap
        h, w = z.shape[-2:]
        out = torch.zeros(1, self.model.cfg.vae.out_ch, h * f, w * f)
        weight = torch.zeros(1, 1, h * f, w * f)
        for y in tile_starts(h, tile, tile - overlap):
            for x in tile_starts(w, tile, tile - overlap):
                piece = self.first_stage(z[..., y : y + tile, x : x + tile]).float().cpu()
                ph, pw = piece.shape[-2:]
                wgt = ramp(ph, overlap * f)[:, None] * ramp(pw, overlap * f)[None, :]
                out[..., y * f : y * f + ph, x * f : x * f + pw] += piece * wgt
                weight[..., y * f : y * f + ph, x * f : x * f + pw] += wgt
        return (out / weight).to(z.device)
