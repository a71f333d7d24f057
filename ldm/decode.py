"""Latents -> images: the VAE decoder (or TAESD, ldm.taesd) one image at a time, in overlapping tiles beyond a size,
and again in float32 where a half-precision decode overflowed (SD's black images)."""

from __future__ import annotations

import warnings

import torch

from ldm.model import StableDiffusion
from ldm.taesd import TAESD


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

    def first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """D(z_0 / scale_factor) in [-1, 1] by the torch VAE, the OpenVINO backend's decoder or TAESD (from z_0)."""
        if self.taesd is not None:
            return self.taesd.decode(z) * 2 - 1
        return self.model.decode_first_stage(z) if self.openvino is None else self.openvino.decode_first_stage(z)

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
