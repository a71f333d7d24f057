"""The README's fine-tuning example: a small image set to teach the embedded model, and the picture of the result.

    python docs/shapes.py data/shapes                 # 216 coloured shapes on white, 32x32, captions in metadata.jsonl
    python train_unet.py --config configs/finetune-emoji.yaml data.path=data/shapes
    python docs/shapes.py --figure runs/finetune-emoji/model.safetensors   # docs/finetune-shapes.png: before | after

Each image is one shape of one colour at a random place and size ("a red circle", "a blue square", ...), the kind of
small, consistent set a fine-tune learns in minutes on a CPU.
"""

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

import ldm

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a purple square",
    "an orange triangle",
]
SIZE, ZOOM, LABEL = 32, 4, 16


def draw_shape(shape: str, colour: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """One shape on white, drawn at 4x and downsampled (smooth edges)."""
    big = 4 * SIZE
    image = Image.new("RGB", (big, big), "white")
    r = rng.uniform(0.25, 0.4) * big
    cx, cy = rng.uniform(r + 4, big - r - 4), rng.uniform(r + 4, big - r - 4)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def write_dataset(out: Path, per_class: int = 12) -> None:
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for i in range(per_class):
                name = f"{colour}-{shape}-{i:02d}.png"
                draw_shape(shape, rgb, rng).save(out / name)
                article = "an" if colour == "orange" else "a"
                rows.append({"file_name": name, "text": [f"{article} {colour} {shape}", f"{colour} {shape}"]})
    (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} images and metadata.jsonl to {out}")


def write_figure(finetuned: Path, out: Path = Path("docs/finetune-shapes.png")) -> None:
    """Top row: the embedded model; bottom row: the fine-tuned one; same prompt and seed per column, shown 4x."""
    rows = [ldm.load_pipeline(path) for path in (None, finetuned)]
    side = SIZE * ZOOM
    grid = Image.new("RGB", (len(PROMPTS) * side, 2 * side + LABEL), "white")
    draw = ImageDraw.Draw(grid)
    for j, pipe in enumerate(rows):
        for i, prompt in enumerate(PROMPTS):
            image = pipe.txt2img(prompt, seed=0, progress=False)[0]
            grid.paste(image.resize((side, side), Image.NEAREST), (i * side, j * side))
    for i, prompt in enumerate(PROMPTS):
        draw.text((i * side + 4, 2 * side + 2), prompt, fill="black")
    grid.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", type=Path, help="the dataset folder to write")
    p.add_argument(
        "--figure", type=Path, metavar="MODEL", help="write docs/finetune-shapes.png from this fine-tuned model"
    )
    args = p.parse_args()
    if args.figure:
        write_figure(args.figure)
    if args.out:
        write_dataset(args.out)
