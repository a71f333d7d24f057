"""The effect of a canny ControlNet on images it never saw: edge F1, FID, KID and retrieval, without and with it.

    python benchmarks/controlnet_edges.py data/emoji32-heldout ldm/assets/emoji-canny/emoji-canny.safetensors \
        --out docs/emoji-canny-eval.json --grid docs/emoji-canny.png

DATA is an imagefolder the ControlNet was not trained on (`python -m ldm.datasets.split` makes one). For each image
i (seed --seed + i, the model's own sampling defaults) one image is generated without the ControlNet and one with
it, its control map being the canny edges of the real image (ldm.controlnet.canny, OpenCV, thresholds 100 / 200, as
training computes them), for each --prompts setting: "caption", the image's first caption (the base model may have
learnt that emoji: its layout then comes from the prompt already), and "empty", the empty prompt (the layout can
come from the ControlNet only). Measured on each generated image:

- edge F1 (the BSDS boundary measure, with a matching tolerance): the generated image's canny edges G against the
  control map E; precision = share of G within `--tolerance` pixels (Chebyshev) of an E pixel, recall = share of E
  within it of a G pixel, F1 = 2PR / (P + R), over all pixels of the set pooled. Printed at tolerance 0 and 1.
- FID, KID and retrieval top-1 / top-5 (ldm.eval's Inception features): the generated set against DATA's real
  images; retrieval ranks each image's own real image among all of DATA's. With only ~100 images FID is biased
  upwards (its covariances have 2,048 dimensions): compare the two rows, not other FIDs.

--grid writes rows of (edge map | per --prompts setting: without, with | real image) for the first 8 images, 4x.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ldm

import ldm  # noqa: E402
from ldm.controlnet import Control, canny  # noqa: E402
from ldm.eval import (  # noqa: E402
    captioned_images,
    fid,
    inception_features,
    kid,
    load_images,
    load_inception,
    retrieval_ranks,
    top_k,
)


def edges(image: Image.Image) -> torch.Tensor:
    """A white-on-black edge map as a (1, 1, H, W) tensor of 0 / 1."""
    return torch.from_numpy(np.asarray(image.convert("L")) > 127)[None, None].float()


def edge_counts(g: torch.Tensor, e: torch.Tensor, tolerance: int) -> np.ndarray:
    """[matched G pixels, G pixels, matched E pixels, E pixels] of one pair of edge maps (see the module's doc)."""
    near = lambda x: F.max_pool2d(x, 2 * tolerance + 1, 1, tolerance) if tolerance else x  # noqa: E731
    return np.array([(g * near(e)).sum(), g.sum(), (e * near(g)).sum(), e.sum()], dtype=np.float64)


def f1(counts: np.ndarray) -> dict:
    precision, recall = counts[0] / max(counts[1], 1), counts[2] / max(counts[3], 1)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-12)}


p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("data", type=Path, help="held-out imagefolder (data/emoji32-heldout)")
p.add_argument("controlnet", type=Path, help="the ControlNet file")
p.add_argument("--ckpt", help="the model (default: the embedded one)")
p.add_argument("--n", type=int, help="images (default: all of DATA)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--scale", type=float, default=1.0, help="the ControlNet's scale")
p.add_argument("--prompts", nargs="+", choices=["caption", "empty"], default=["caption", "empty"])
p.add_argument("--out", type=Path, help="write the JSON report here")
p.add_argument("--grid", type=Path, help="write the picture grid here")
args = p.parse_args()

paths, captions = captioned_images(args.data)
paths, captions = paths[: args.n], captions[: args.n]
real = load_images(paths)
maps = [canny(im) for im in real]
pipe = ldm.load_pipeline(args.ckpt)
net = pipe.load_controlnet(args.controlnet)
size = real[0].width
generated = {f"{prompts}, {side} ControlNet": [] for prompts in args.prompts for side in ("without", "with")}
for i, (caption, image) in enumerate(zip(captions, real)):
    options = dict(seed=args.seed + i, height=size, width=size, prompt_syntax="plain", progress=False)
    for prompts in args.prompts:
        prompt = caption if prompts == "caption" else ""
        generated[f"{prompts}, without ControlNet"] += pipe.txt2img(prompt, **options)
        control = Control(net, image, "canny", args.scale)
        generated[f"{prompts}, with ControlNet"] += pipe.txt2img(prompt, controls=[control], **options)

features = inception_features(load_inception())
real_features = features(real)
sampling = pipe.cfg.sampling
report = {"data": str(args.data), "controlnet": str(args.controlnet), "n": len(real), "seed": args.seed}
report |= {"sampling": [sampling.sampler, sampling.steps, sampling.scale], "control_scale": args.scale, "rows": {}}
map_edges = [edges(e) for e in maps]
for name, images in generated.items():
    row = {}
    pairs = [(edges(canny(g)), e) for g, e in zip(images, map_edges)]
    for tolerance in (0, 1):
        counts = sum(edge_counts(g, e, tolerance) for g, e in pairs)
        row[f"edge_tolerance{tolerance}"] = f1(counts)
    fake = features(images)
    ranks = retrieval_ranks(fake, real_features, list(range(len(real))))
    row |= {"fid": fid(real_features, fake), "kid": kid(real_features, fake, seed=args.seed)[0]}
    row |= {"top1": top_k(ranks, 1), "top5": top_k(ranks, 5), "chance_top5": min(5, len(real)) / len(real)}
    report["rows"][name] = row
    print(f"{name}: {json.dumps(row)}", flush=True)
if args.out:
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
if args.grid:
    rows = [[maps[i], *(images[i] for images in generated.values()), real[i]] for i in range(min(8, len(real)))]
    grid = Image.new("RGB", (len(rows[0]) * size * 4, len(rows) * size * 4), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((size * 4, size * 4), Image.NEAREST), (c * size * 4, r * size * 4))
    grid.save(args.grid)
    print(f"wrote {args.grid}")
