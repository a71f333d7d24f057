"""How well a model's VAE keeps colours: solid shapes of 12 hues (and black, grey) on white, encoded and decoded.

    python benchmarks/vae_colours.py                       # the embedded emoji model
    python benchmarks/vae_colours.py --ckpt runs/vae-emoji/model.safetensors --size 32 --grid colours.png

For each colour, a filled triangle on white is encoded to its posterior mode and decoded; the table gives the mean
colour of the shape's pixels before and after, and the mean absolute error per channel (0-255) on those pixels.
The embedded model's target (issue #19): every row within 20/255. --grid writes the shapes (top row) and their
reconstructions (bottom row), shown 3x.
"""

import argparse
import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

import ldm
from ldm.images import to_pil, to_tensor

TARGET = 20  # max mean absolute error per channel, 0-255


def colours() -> dict[str, tuple[int, int, int]]:
    """12 hues 30 degrees apart at full saturation (value 0.85), then black and mid grey."""
    named = {}
    for k in range(12):
        r, g, b = colorsys.hsv_to_rgb(k / 12, 1.0, 0.85)
        named[f"hue {30 * k:3d}"] = (round(255 * r), round(255 * g), round(255 * b))
    return named | {"black": (0, 0, 0), "grey": (128, 128, 128)}


def shape(colour: tuple[int, int, int], size: int) -> tuple[Image.Image, np.ndarray]:
    """A triangle of `colour` covering about half of a white square; and the mask of its interior (1 px inset)."""
    image = Image.new("RGB", (size, size), "white")
    corners = [(size * 0.5, size * 0.1), (size * 0.9, size * 0.88), (size * 0.1, size * 0.88)]
    ImageDraw.Draw(image).polygon(corners, fill=colour)
    inner = Image.new("L", (size, size), 0)
    inset = [(size * 0.5, size * 0.22), (size * 0.8, size * 0.82), (size * 0.2, size * 0.82)]
    ImageDraw.Draw(inner).polygon(inset, fill=255)
    return image, np.array(inner) > 0


def reconstruct(pipe, size: int):
    """Each colour's shape through the VAE: (name, colour, its shape, the reconstruction, the mean reconstructed
    colour on the shape's pixels, their mean absolute error per channel)."""
    rows = []
    for name, colour in colours().items():
        image, mask = shape(colour, size)
        with torch.no_grad():
            z = pipe.vae.encode(2 * to_tensor(image) - 1).mode()
            decoded = to_pil((pipe.vae.decode(z) / 2 + 0.5).clamp(0, 1))[0]
        out = np.asarray(decoded, dtype=np.float64)
        mae = float(np.abs(out[mask] - np.asarray(colour, dtype=np.float64)).mean())
        got = tuple(int(c) for c in out[mask].mean(axis=0).round())
        rows.append((name, colour, image, decoded, got, mae))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="a model (default: the embedded emoji model)")
    p.add_argument("--size", type=int, help="image side (default: the model's)")
    p.add_argument("--grid", help="also write a PNG: the shapes above, their reconstructions below")
    args = p.parse_args()
    pipe = ldm.load_pipeline(args.ckpt)
    size = args.size or pipe.cfg.image_size * 2 ** (len(pipe.cfg.vae.ch_mult) - 1)
    rows = reconstruct(pipe, size)
    print(f"{'colour':10} {'input':>15} {'reconstructed':>15} {'MAE/channel':>12}")
    for name, colour, _, _, got, mae in rows:
        print(f"{name:10} {str(colour):>15} {str(got):>15} {mae:12.1f}{'' if mae <= TARGET else '  > target'}")
    print(f"worst {max(row[-1] for row in rows):.1f} (target <= {TARGET})")
    if args.grid:
        grid = Image.new("RGB", (size * len(rows), 2 * size), "white")
        for i, (_, _, image, decoded, _, _) in enumerate(rows):
            grid.paste(image, (i * size, 0))
            grid.paste(decoded, (i * size, size))
        grid.resize((3 * grid.width, 3 * grid.height), Image.NEAREST).save(args.grid)


if __name__ == "__main__":
    main()
