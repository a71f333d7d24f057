"""Variety between seeds and prompt adherence of a text-to-image model, at several guidance scales and step counts.

    python benchmarks/variety.py data/emoji32                                  # the embedded model
    python benchmarks/variety.py data/emoji32 --ckpt runs/unet-emoji/model.safetensors --scales 1 3 5 7.5
    python benchmarks/variety.py data/emoji32 --generic                        # prompts that name many emoji

20 captions of DATA are drawn with --seed (as `python -m ldm.eval` draws them), and each is generated with 4 seeds.
For each (guidance scale, steps) row:
- variety: the mean absolute pixel difference (0-255, all channels) between two images of the same caption, over
  its 6 seed pairs and the 20 captions (0 = the seed does not matter);
- top-5: retrieval top-5 of the 80 images (ldm.eval's Inception features: the caption's real image among the 5
  nearest real images).
With --generic the prompts are 20 of the data's CLDR subgroups instead ("an emoji of food fruit", the generic captions
of `python -m ldm.datasets.emoji`), and adherence is the share of images whose nearest real image is of that
subgroup (chance: the subgroup's share of the data, printed), and the variety of the real data is printed first:
that of --seeds real emoji of each subgroup (drawn with --seed), what a model drawing its data's pictures would show.
"""

import argparse
import itertools
import random
from pathlib import Path

import numpy as np
import torch

from ldm.data import scan_folder
from ldm.datasets.emoji import GENERIC_TEMPLATE
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
    p.add_argument("--generic", action="store_true", help="prompts naming a CLDR subgroup (metadata `subgroup`)")
    args = p.parse_args()

    paths, captions = captioned_images(args.data)
    rng = random.Random(args.seed)
    if args.generic:
        found = dict(scan_folder(args.data.resolve(), "subgroup")[0])
        subgroups = [found.get(path, [None])[0] for path in paths]
        targets = rng.sample(sorted(set(filter(None, subgroups))), args.prompts)
        prompts = [GENERIC_TEMPLATE.format(t) for t in targets]
        chance = np.mean([subgroups.count(t) / len(paths) for t in targets])
        adherence = f"subgroup (chance {100 * chance:.1f}%)"
    else:
        targets = rng.sample(range(len(paths)), args.prompts)
        prompts, adherence = [captions[t] for t in targets], "top-5"
    size = load_images(paths[:1])[0].width
    features = inception_features(load_inception())
    real = real_features(paths, features, args.real_cache)
    print(f"{args.prompts} prompts x {args.seeds} seeds, {args.sampler}, {size}x{size}", flush=True)
    if args.generic:
        members = [[p for p, s in zip(paths, subgroups) if s == t] for t in targets]
        real_spread = np.mean(
            [variety(load_images(rng.sample(m, min(args.seeds, len(m))))) for m in members if len(m) > 1]
        )
        print(f"real emoji of these subgroups: variety {real_spread:.2f}", flush=True)
    print(f"{'scale':>6} {'steps':>6} {'variety':>8} {adherence}", flush=True)
    for scale, steps in itertools.product(args.scales, args.steps):
        generate = pipeline_generate(args.ckpt, steps, scale, args.sampler, size)
        per_prompt = [generate([prompt] * args.seeds, 0) for prompt in prompts]
        spread = float(np.mean([variety(images) for images in per_prompt]))
        generated = features([im for images in per_prompt for im in images])
        repeated = [t for t in targets for _ in range(args.seeds)]
        if args.generic:  # the nearest real image is of the prompt's subgroup
            nearest = torch.cdist(generated.double(), real.double()).argmin(1).tolist()
            share = np.mean([subgroups[n] == t for n, t in zip(nearest, repeated)])
        else:
            share = top_k(retrieval_ranks(generated, real, repeated), 5)
        print(f"{scale:6.1f} {steps:6d} {spread:8.2f} {100 * share:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
