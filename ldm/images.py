"""Images in and out of the pipeline: files read as PIL images, PIL <-> tensors, canny edges, the outpainting canvas."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from ldm.errors import LdmError

CANNY_THRESHOLDS = (100, 200)  # cv2.Canny's low and high hysteresis thresholds, lllyasviel's annotator defaults


class ImageError(LdmError):
    """An image file that cannot be read; the message names it."""


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """An image file as a PIL image in `mode`, EXIF rotation applied; ImageError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert(mode)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None


def resized(image: Image.Image, width: int, height: int, what: str = "", why: str = "") -> Image.Image:
    """The image at width x height (Lanczos, as diffusers), with a warning naming it (`what`, `why`: the reason for
    the size) when its size changes; none when `what` is empty."""
    if image.size != (width, height) and what:
        warnings.warn(f"{what} resized from {image.width}x{image.height} to {width}x{height} ({why})")
    return image.resize((width, height), Image.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (1, C, H, W) float32 in [0, 1]."""
    array = np.array(image, dtype=np.float32) / 255
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding to 8 bits as diffusers does."""
    array = (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def canny(image: Image.Image, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """OpenCV's Canny edges of an RGB image (gradients of all three channels), white on black, as RGB."""
    try:
        import cv2
    except ImportError:
        raise LdmError("--control-preprocess canny needs OpenCV: pip install 'ldm[controlnet]'") from None
    edges = cv2.Canny(np.asarray(image.convert("RGB")), *thresholds)
    return Image.fromarray(edges).convert("RGB")


def outpaint_padding(size: tuple[int, int], padding: tuple[int, int, int, int], factor: int) -> tuple[int, ...]:
    """The padding (left, top, right, bottom) that outpainting an image of size (width, height) really adds: left
    and top rounded up to multiples of the VAE factor, right and bottom up so that the canvas sides are multiples
    too."""
    left, top = -(-padding[0] // factor) * factor, -(-padding[1] // factor) * factor
    width = -(-(left + size[0] + padding[2]) // factor) * factor
    height = -(-(top + size[1] + padding[3]) // factor) * factor
    return left, top, width - left - size[0], height - top - size[1]


def outpaint_canvas(
    image: Image.Image, padding: tuple[int, int, int, int], factor: int, mask_blur: int = 4
) -> tuple[Image.Image, Image.Image, tuple[int, ...]]:
    """The canvas, mask and padding of outpainting `image` by padding = (left, top, right, bottom) pixels
    (outpaint_padding rounds them; ldm.request.Request.check checks them).

    The new area is pre-filled with the image's border colours carried outwards and blurred over about an eighth of
    the canvas (AUTOMATIC1111's "fill" masked content, applied to the new area only; not mk2's spectral noise): a
    plain start that the sampler repaints. The mask is 0 over the original, so its pixels come back exactly, and
    rises from 0 at its border to 1 at mask_blur pixels from it (the feathered border: the first pixels outside are
    mostly the fill, which is the original's edge, then more and more the generated picture)."""
    image = image.convert("RGB")
    left, top, right, bottom = outpaint_padding(image.size, padding, factor)
    width, height = left + image.width + right, top + image.height + bottom
    array = np.asarray(image)
    filled = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    blurred = Image.fromarray(filled).filter(ImageFilter.GaussianBlur(max(width, height) / 8))
    canvas = np.asarray(blurred).copy()
    canvas[top : top + image.height, left : left + image.width] = array
    y, x = np.mgrid[:height, :width] + 0.5
    dx = np.maximum.reduce([left - x, np.zeros_like(x), x - left - image.width])
    dy = np.maximum.reduce([top - y, np.zeros_like(y), y - top - image.height])
    distance = np.hypot(dx, dy)  # from the original's rectangle, in pixels (0 inside it, >= 0.5 outside)
    mask = np.clip(distance / mask_blur, 0, 1) if mask_blur else (distance > 0).astype(np.float64)
    mask_image = Image.fromarray((mask * 255).round().astype(np.uint8))
    return Image.fromarray(canvas), mask_image, (left, top, right, bottom)
