"""python -m ldm.datasets.split SRC TRAIN HELDOUT --holdout N: an imagefolder split in two, N images held out.

The held-out images are N drawn at random (random.Random(--seed).sample over SRC's images in ldm.data's stable
order); TRAIN gets the others. Both get a copy of their images under the same names and a metadata.jsonl with the
same captions (`file_name`, `text`), so a model trained on TRAIN can be measured on images it never saw (the shipped
ControlNet's edge F1 is measured so, on `data/emoji32-heldout`).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

from ldm.cli import ArgumentParser, run
from ldm.datasets import DatasetError


def write_folder(out: Path, root: Path, files: list[tuple[Path, list[str]]]) -> None:
    """Copy `files` (paths under `root`, with their captions) into the new folder `out` with a metadata.jsonl."""
    rows = []
    for path, captions in files:
        name = path.relative_to(root)
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / name)
        rows.append(json.dumps({"file_name": str(name), "text": captions}, ensure_ascii=False))
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def split(src: Path, train: Path, heldout: Path, holdout: int, seed: int = 0) -> tuple[int, int]:
    """Write TRAIN and HELDOUT from SRC; returns their sizes."""
    from ldm.data import scan_folder  # torch: after the arguments are read

    if not src.is_dir():
        raise DatasetError(f"{src} is not a folder")
    for out in (train, heldout):
        if out.exists() and any(out.iterdir()):
            raise DatasetError(f"{out} exists and is not empty: nothing is overwritten")
    root = src.resolve()
    files, _ = scan_folder(root, "text")
    if not 1 <= holdout < len(files):
        raise DatasetError(f"--holdout must be between 1 and {len(files) - 1} ({src} has {len(files)} images)")
    held = set(random.Random(seed).sample(range(len(files)), holdout))
    write_folder(train, root, [f for i, f in enumerate(files) if i not in held])
    write_folder(heldout, root, [f for i, f in enumerate(files) if i in held])
    return len(files) - holdout, holdout


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ldm.datasets.split", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="imagefolder with captions (e.g. data/emoji32)")
    p.add_argument("train", type=Path, help="output folder for the rest (created; must be empty if it exists)")
    p.add_argument("heldout", type=Path, help="output folder for the held-out images (likewise)")
    p.add_argument("--holdout", type=int, required=True, help="how many images to hold out")
    p.add_argument("--seed", type=int, default=0, help="picks the held-out images (default 0)")
    args = p.parse_args(argv)
    sizes = lambda: split(args.src, args.train, args.heldout, args.holdout, args.seed)  # noqa: E731
    return run(lambda: print("wrote %d + %d images" % sizes()) or 0)


if __name__ == "__main__":
    sys.exit(main())
