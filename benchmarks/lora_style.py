"""The effect of a style LoRA on the embedded model: the style's statistic and the base task's retrieval, LoRA weight
0 against 1 (and any other weights given).

    python benchmarks/lora_style.py data/emoji32 ldm/assets/emoji-gameboy/emoji-gameboy.safetensors --n 100 \
        --out docs/emoji-gameboy-eval.json --real-cache emoji32-inception.safetensors

For each weight the same n captions of DATA (drawn with --seed; image i with seed --seed + i; DDIM 25 steps, guidance
5: python -m ldm.eval's defaults) go through the embedded model with the LoRA merged at that weight, and are measured
by ldm.eval.evaluate (FID, KID, retrieval top-1 / top-5 of each caption's real image among DATA's, Inception
features) and by the Game Boy style's statistic, ldm.datasets.gameboy.palette_share (the share of pixels within
PALETTE_TOLERANCE of the four-colour palette).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ldm

import ldm  # noqa: E402
from ldm.datasets.gameboy import PALETTE_TOLERANCE, palette_share  # noqa: E402
from ldm.eval import evaluate, inception_features, load_inception  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("data", type=Path, help="the base task's imagefolder (data/emoji32)")
p.add_argument("lora", type=Path, help="the LoRA file")
p.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0])
p.add_argument("--n", type=int, default=100)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--steps", type=int, default=25)
p.add_argument("--scale", type=float, default=5.0)
p.add_argument("--real-cache", type=Path, help="a .safetensors file keeping the real images' features")
p.add_argument("--out", type=Path, help="write the JSON report here")
args = p.parse_args()

pipe = ldm.load_pipeline()
features = inception_features(load_inception())
report = {"lora": str(args.lora), "n": args.n, "seed": args.seed, "steps": args.steps, "scale": args.scale}
report |= {"palette_tolerance": PALETTE_TOLERANCE, "weights": {}}
for weight in args.weights:
    pipe.unload_loras()
    pipe.load_lora(args.lora, weight)
    images = []

    def generate(prompts, seed):
        options = dict(steps=args.steps, scale=args.scale, prompt_syntax="plain", progress=False)  # captions, literally
        out = pipe.txt2img(prompts, seed=seed, **options)
        images.extend(out)
        return out

    result = evaluate(args.data, generate, features, args.n, args.seed, cache=args.real_cache, progress=False)
    summary = {k: result[k] for k in ("top1", "top5", "fid", "kid", "chance_top1", "chance_top5")}
    report["weights"][str(weight)] = {"palette_share": palette_share(images)} | summary
    print(f"weight {weight}: {json.dumps(report['weights'][str(weight)])}", flush=True)
if args.out:
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
