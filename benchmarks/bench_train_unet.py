"""Training throughput of train_unet.py, with and without the latent cache, against the same loop on diffusers.

    python benchmarks/bench_train_unet.py [--steps 40] [--rounds 2] [--batch-size 8]

One fixed small model (64x64 images, an f=8 VAE -> 8x8x4 latents, a 2-level UNet, a 2-layer text model) on
generated images. Three variants, measured in turn, round after round (CPU speed drifts: compare within a run):
  ours+cache  train_unet.py --cache-latents (VAE posterior and text embeddings read from disk)
  ours        train_unet.py encoding images and captions on the fly
  diffusers   the same step written with diffusers' UNet2DConditionModel, AutoencoderKL, DDPMScheduler,
              EMAModel and transformers' CLIPTextModel, encoding on the fly (diffusers' train_text_to_image loop)
Each reports images/s over the second half of its steps (the first half warms up); the ratios are to diffusers.
Last, the share of diffusers' loop spent encoding images and captions, which bounds what a cache alone can save.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ldm.config import load_config  # noqa: E402
from ldm.data import ImageCaptionDataset, StreamSampler, collate  # noqa: E402
from ldm.diffusers_names import diffusers_configs  # noqa: E402
from ldm.text_encoder import FrozenCLIPEmbedder  # noqa: E402

MODEL = [  # on top of configs/tiny.yaml
    "unet.model_channels=64",
    "unet.channel_mult=[1,2,2]",
    "unet.attention_resolutions=[1,2]",
    "unet.num_head_channels=32",
    "unet.context_dim=64",
    "unet.num_groups=16",
    "vae.ch=32",
    "vae.ch_mult=[1,2,4,4]",
    "vae.resolution=64",
    "vae.num_groups=8",
    "text_encoder.hidden_size=64",
    "text_encoder.intermediate_size=128",
]


def make_images(root: Path, n: int = 64) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"image number {i} of a benchmark"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def ours(data: Path, work: Path, steps: int, batch_size: int, cache: bool) -> float:
    out = work / f"run-{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        str(ROOT / "train_unet.py"),
        "--config",
        str(ROOT / "configs" / "train-unet-tiny.yaml"),
        *[f"model.{m}" for m in MODEL],
        f"data.path={data}",
        "data.resolution=64",
        f"batch_size={batch_size}",
        f"max_steps={steps}",
        f"log_every={steps // 2}",
        f"save_every={steps}",
        "tracker=none",
        f"output_dir={out}",
        f"cache_dir={work / 'cache'}",
    ] + (["--cache-latents"] if cache else [])
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1][
        "images_per_s_per_device"
    ]


def diffusers_loop(data: Path, steps: int, batch_size: int) -> tuple[float, float]:
    """(images/s, the share of that time spent encoding: VAE posterior and text embeddings, what a cache saves)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", MODEL)
    configs = diffusers_configs(cfg)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in configs["unet"].items() if k != "_class_name"}).train()
    vae = (
        AutoencoderKL.from_config({k: v for k, v in configs["vae"].items() if k != "_class_name"})
        .requires_grad_(False)
        .eval()
    )
    text_encoder = FrozenCLIPEmbedder(cfg.text_encoder)  # transformers' CLIPTextModel inside
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    ema = EMAModel(unet.parameters(), decay=0.9999)
    dataset = ImageCaptionDataset(data, 64)
    loader = iter(DataLoader(dataset, batch_size, sampler=StreamSampler(len(dataset), batch_size), collate_fn=collate))
    encoding = 0.0
    for step in range(steps):
        if step == steps // 2:
            start, encoding = time.perf_counter(), 0.0
        batch = next(loader)
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(batch["pixels"]).latent_dist.sample() * cfg.scale_factor
            context = text_encoder.transformer(text_encoder.tokenize(batch["caption"]))[0]
        encoding += time.perf_counter() - t0
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        pred = unet(scheduler.add_noise(latents, noise, t), t, context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    elapsed = time.perf_counter() - start
    return (steps - steps // 2) * batch_size / elapsed, encoding / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        make_images(work / "data")
        ours(work / "data", work, 2, args.batch_size, cache=True)  # build the cache outside the measurements
        results, encoding = {"ours+cache": [], "ours": [], "diffusers": []}, []
        for r in range(args.rounds):
            results["ours+cache"].append(ours(work / "data", work, args.steps, args.batch_size, cache=True))
            results["ours"].append(ours(work / "data", work, args.steps, args.batch_size, cache=False))
            images_per_s, share = diffusers_loop(work / "data", args.steps, args.batch_size)
            results["diffusers"].append(images_per_s)
            encoding.append(share)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in results.items()), flush=True)
    reference = np.mean(results["diffusers"])
    print(
        f"\n{'variant':<12} {'images/s':>9} {'vs diffusers':>13}   "
        f"(batch {args.batch_size}, {args.steps} steps, {args.rounds} rounds, "
        f"torch threads {torch.get_num_threads()})"
    )
    for name, values in results.items():
        print(f"{name:<12} {np.mean(values):>9.1f} {np.mean(values) / reference:>12.2f}x")
    share = np.mean(encoding)
    print(
        f"diffusers' loop spends {share:.0%} of its time encoding images and captions: skipping that alone makes it "
        f"{1 / (1 - share):.2f}x faster"
    )


if __name__ == "__main__":
    main()
