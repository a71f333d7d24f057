"""Variety between seeds and prompt adherence of a text-to-image model, at several guidance scales and step counts.

    python benchmarks/variety.py data/emoji32                                  # the embedded model
    python benchmarks/variety.py data/emoji32 --ckpt runs/unet-emoji/model.safetensors --scales 1 3 5 7.5

20 captions of DATA are drawn with --seed (as `python -m ldm.eval` draws them), and each is generated with 4 seeds.
For each (guidance scale, steps) row:
- variety: the mean absolute pixel difference (0-255, all channels) between two images of the same caption, over
  its 6 seed pairs and the 20 captions (0 = the seed does not matter);
- top-5: retrieval top-5 of the 80 images (ldm.eval's Inception features: the caption's real image among the 5
  nearest real images).
"""

import argparse
import itertools
import random
from pathlib import Path

import numpy as np

from ldm.eval import (
    captioned_images,
    inception_features,
    load_images,
    load_inception,
    pipeline_generate,
    real_features,
    retrieval_ranks,
    top_k,
)


def variety(images: list) -> float:
    """Mean |a - b| (0-255) over all pairs of images."""
    arrays = [np.asarray(im, dtype=np.float64) for im in images]
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(arrays, 2)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="imagefolder with metadata.jsonl (python -m ldm.datasets.emoji)")
    p.add_argument("--ckpt", help="a model (default: the embedded one)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--scales", type=float, nargs="+", default=[5.0])
    p.add_argument("--steps", type=int, nargs="+", default=[25])
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--seed", type=int, default=0, help="draws the captions")
    p.add_argument("--real-cache", type=Path, help="a .safetensors file keeping the real images' features")
    args = p.parse_args()

    paths, captions = captioned_images(args.data)
    targets = random.Random(args.seed).sample(range(len(paths)), args.prompts)
    size = load_images(paths[:1])[0].width
    features = inception_features(load_inception())
    real = real_features(paths, features, args.real_cache)
    print(f"{args.prompts} captions x {args.seeds} seeds, {args.sampler}, {size}x{size}", flush=True)
    print(f"{'scale':>6} {'steps':>6} {'variety':>8} {'top-5':>6}", flush=True)
    for scale, steps in itertools.product(args.scales, args.steps):
        generate = pipeline_generate(args.ckpt, steps, scale, args.sampler, size)
        per_prompt = [generate([captions[t]] * args.seeds, 0) for t in targets]
        spread = float(np.mean([variety(images) for images in per_prompt]))
        ranks = retrieval_ranks(
            features([im for images in per_prompt for im in images]),
            real,
            [t for t in targets for _ in range(args.seeds)],
        )
        print(f"{scale:6.1f} {steps:6d} {spread:8.2f} {100 * top_k(ranks, 5):5.1f}%", flush=True)


if __name__ == "__main__":
    main()
