"""How much memory sampling needs, and how much the machine has: what the pipeline sizes its sub-batches by and
refuses a request with (check_memory), before any of it is allocated."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.config import ModelConfig
from ldm.request import InputError, Request

VAE_TILE = 64  # latents a side beyond which the VAE decodes in tiles


def machine_memory(device: str | torch.device) -> tuple[int, int]:
    """(total, available) bytes of the memory `device` computes in: a CUDA device's from its driver, else the machine's
    (/proc/meminfo's MemTotal and MemAvailable; os.sysconf's physical pages where there is no /proc)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        info = {key: int(value.split()[0]) * 1024 for key, value in (line.split(":", 1) for line in lines)}  # kB
        return info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return total, total


def estimate_memory(
    cfg: ModelConfig,
    batch: int,
    height: int,
    width: int,
    rows: int = 2,
    value_bytes: int = 4,
    vae_tile: int = VAE_TILE,
    fused_attention: bool = True,
) -> int:
    """Bytes that sampling `batch` images of height x width holds at its peak beyond the weights: the larger of one
    UNet call (on rows * batch latents: 2 when guided, Request.unet_rows) and one VAE decode, plus the batch's decoded
    images. In values of `value_bytes` (4: fp32):

    UNet: the input blocks' outputs wait for their skip connections (all alive at the middle block), plus the working
    set of the widest block: a SpatialTransformer's GEGLU holds ~16 values per channel and token (its 8C projection,
    gelu(gate), the product) and its residual stream ~4 more; a ResBlock ~8 (concatenated input, norm, SiLU, conv).
    Attention: torch's SDPA on CPU never holds the tokens x tokens matrix (its fused flash kernel; measured here:
    16,384 tokens take 7 MiB beyond q, k and v, where the matrix is 1 GiB); fused_attention=False (for devices where
    it is not measured) adds heads x tokens^2 at the largest attention resolution.
    VAE decoder: one image at a time, in tiles of at most vae_tile latents a side: ~8 tensors of its widest
    activation (a level's input channels x its pixels). Decoded images: float32, ~3 copies (the decodes, their
    concatenation, the 8-bit conversion). Against the peak RSS of a txt2img call on CPU (benchmarks: see the test
    test_a_10000_image_request_runs_in_sub_batches_of_bounded_memory), the estimate was 1.1x-1.9x what was used:
    tiny model 1,000 images of 16 px 714 / 523 MiB, one of 256 px 183 / 163 MiB; SD v1 one image of 512 px
    2,058 / 1,107 MiB.
    """
    u, v = cfg.unet, cfg.vae
    h, w = height // v.factor, width // v.factor
    n = batch * rows
    skips, working, attention_matrix, ch = u.model_channels * h * w, 0, 0, u.model_channels
    for level, mult in enumerate(u.channel_mult):
        tokens, ch = -(-h // 2**level) * -(-w // 2**level), u.model_channels * mult
        attends = 2**level in u.attention_resolutions
        skips += (u.num_res_blocks + (level < len(u.channel_mult) - 1)) * ch * tokens
        working = max(working, (20 if attends else 8) * 2 * ch * tokens)  # output blocks: C + C_skip channels in
        if attends and not fused_attention:
            heads = ch // u.num_head_channels if u.num_head_channels > 0 else u.num_heads
            attention_matrix = max(attention_matrix, 2 * heads * tokens**2)  # the scores and their softmax
    unet = n * (skips + working + attention_matrix)
    tile_h, tile_w = min(h, vae_tile) * v.factor, min(w, vae_tile) * v.factor
    widths = [v.ch * m for m in v.ch_mult]
    inputs = widths[1:] + widths[-1:]  # the channels coming into each level of the decoder (level i + 1's width)
    vae = max(8 * max(c_in, c) * (tile_h // 2**i) * (tile_w // 2**i) for i, (c_in, c) in enumerate(zip(inputs, widths)))
    vae += 4 * height * width * (max(h, w) > vae_tile)  # the tiled decode's image and weight sums
    images = 3 * batch * v.out_ch * height * width
    return value_bytes * (max(unet, vae) + images + 8 * n * v.embed_dim * h * w)  # + latents, noise, scheduler state


def check_memory(request: Request, cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype) -> None:
    """InputError unless one image of a resolved request fits in the memory available (estimate_memory) beside the
    8-bit results of the others; more run in sub-batches. Needs only the model's config: a front end runs it before
    loading the weights."""
    device, (width, height) = torch.device(device), request.output_size(cfg.vae.factor)
    images = len(request.prompts) * request.n_samples
    cpu = device.type == "cpu"
    need = estimate_memory(cfg, 1, height, width, request.unet_rows, dtype.itemsize, fused_attention=cpu)
    need += (images - 1) * 3 * height * width  # the other images, as 8-bit RGB
    available = machine_memory(device)[1]
    if need > available:
        raise InputError(
            f"{images} image(s) of {width}x{height} need about {need / 2**30:.1f} GiB of memory "
            f"beside the weights, more than the {available / 2**30:.1f} GiB available ({device.type})"
        )
