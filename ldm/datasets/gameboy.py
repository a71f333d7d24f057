"""python -m ldm.datasets.gameboy SRC OUT: an imagefolder redrawn in the four greens of a Game Boy screen.

The style of ldm's shipped LoRA (ldm/assets/emoji-gameboy/). Each pixel's luma Y = 0.299 R + 0.587 G + 0.114 B
(ITU-R BT.601, 0..255, unrounded) picks one of four shades by quarter (Y < 64 the darkest, ..., Y >= 192 the
lightest), so white backgrounds become the lightest green and dark outlines the darkest. The palette is BGB's (the
Game Boy emulator's default): #081820, #346856, #88c070, #e0f8d0. OUT gets one PNG per image of SRC under the same
name and a metadata.jsonl with the same captions (`file_name`, `text`); SRC is any folder ldm.data reads
(metadata.jsonl or .csv, or a .txt beside each image).

`palette_share` is the style's statistic: the share of pixels within PALETTE_TOLERANCE of a palette colour (1 for
a transformed image, ~0 for an emoji on white, whose background is 57 away from the lightest shade).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.cli import ArgumentParser, run
from ldm.datasets import DatasetError

PALETTE = np.array([(8, 24, 32), (52, 104, 86), (136, 192, 112), (224, 248, 208)], dtype=np.float64)
PALETTE_TOLERANCE = 24.0  # Euclidean distance in 0..255 RGB; the shades are 91 to 140 apart


def gameboy(image: Image.Image) -> Image.Image:
    """An RGB image in the four palette shades, by quarters of its luma."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    return Image.fromarray(PALETTE[np.clip(luma // 64, 0, 3).astype(int)].astype(np.uint8))


def palette_distance(images: list[Image.Image]) -> np.ndarray:
    """(N, H, W) distance of every pixel to its nearest palette colour."""
    rgb = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in images])
    return np.linalg.norm(rgb[..., None, :] - PALETTE, axis=-1).min(-1)


def palette_share(images: list[Image.Image]) -> float:
    """The share of all pixels of the images within PALETTE_TOLERANCE of a palette colour."""
    return float((palette_distance(images) <= PALETTE_TOLERANCE).mean())


def build(src: Path, out: Path) -> int:
    """Write OUT from SRC; returns the number of images."""
    from ldm.data import open_rgb, scan_folder  # torch: after the arguments are read

    if not Path(src).is_dir():
        raise DatasetError(f"{src} is not a folder")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} exists and is not empty: nothing is overwritten")
    files, _ = scan_folder(Path(src).resolve(), "text")
    if not files:
        raise DatasetError(f"{src} holds no captioned image (a metadata.jsonl with file_name and text, or .txt files)")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, captions in files:
        name = path.relative_to(Path(src).resolve()).with_suffix(".png")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        gameboy(open_rgb(path)).save(out / name)
        rows.append(json.dumps({"file_name": str(name), "text": captions}, ensure_ascii=False))
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ldm.datasets.gameboy", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="imagefolder with captions (e.g. data/emoji32)")
    p.add_argument("out", type=Path, help="output folder (created; must be empty if it exists)")
    args = p.parse_args(argv)
    return run(lambda: print(f"wrote {build(args.src, args.out)} images to {args.out}") or 0)


if __name__ == "__main__":
    sys.exit(main())
