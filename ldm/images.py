"""Images: loading, converting, canny edges, outpaint canvas."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ldm.errors import LdmError

CANNY_THRESHOLDS = (100, 200)  # cv2.Canny's low and high hysteresis thresholds, lllyasviel's annotator defaults


def canny(image: Image.Image, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """OpenCV's Canny edges of an RGB image (gradients of all three channels), white on black, as RGB."""
    try:
        import cv2
    except ImportError:
        raise LdmError("--control-preprocess canny needs OpenCV: pip install 'ldm[controlnet]'") from None
    edges = cv2.Canny(np.asarray(image.convert("RGB")), *thresholds)
    return Image.fromarray(edges).convert("RGB")
