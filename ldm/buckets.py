"""Aspect-ratio buckets (NovelAI, "Aspect Ratio Bucketing", 2022): train on whole images of every shape instead of
square crops of them.

NovelAI's buckets at SD scale: widths from 256 to 1024 in steps of 64, each with the largest height (a multiple of 64,
at most 1024) whose area stays within 512x768; the same sizes turned on their side; and 512x512. Scaled to a model of
another `resolution` R: area <= 1.5 R^2, sides from R/2 to 2R in steps of `step` (the VAE factor times the UNet's
downsampling must divide it), plus R x R. Each image goes to the bucket nearest its aspect ratio (in log ratio),
is scaled to cover it (the smallest scale at which both sides reach the bucket's: never more) and cropped to
it; a batch holds one bucket.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """The (width, height) buckets for images of `resolution` (NovelAI's construction, scaled), by aspect ratio."""
    max_area, low, high = 1.5 * resolution**2, resolution // 2, 2 * resolution
    sizes = {(resolution, resolution)}
    for width in range(low - low % step or step, high + 1, step):
        height = min(high, int(max_area / width) // step * step)
        if height >= low:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest(sizes: list[tuple[int, int]], width: int, height: int) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (in log ratio; the first of equals)."""
    ratio = math.log(width / height)
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][0] / sizes[i][1]) - ratio))


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is scaled to so that it just covers the bucket (sides rounded, never below the bucket's)."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale))


def fit(
    img: Image.Image, bucket: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Scale to cover the bucket (bicubic), crop (center or random), flip -> ((3, H, W) in [-1, 1], (left, top))."""
    w, h = cover_size(*img.size, bucket)
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (
        ((w - bucket[0]) // 2, (h - bucket[1]) // 2)
        if center_crop
        else (rng.randint(0, w - bucket[0]), rng.randint(0, h - bucket[1]))
    )
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0, (left, top)
