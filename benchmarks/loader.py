"""How fast the CPU feeds training from images: 512 px JPEG decode + resize + crop (ldm.data.open_rgb and
ldm.buckets.fit, what the shard loader does per sample) in images/s, with 1..N worker processes, and the cores one
A100 needs at MosaicML's SD2 rates (~36 images/s at 512², ~137 at 256²). With --precompute N: the images/s of
ldm.precompute's encode_shard (decode, cover-crop to 512², SD's KL-f8 VAE encoder, tokenize, write the shard) on a
shard of N such JPEGs, with a randomly initialized full-size VAE (its speed does not depend on the weights), on the
GPU when there is one. Prints the host's lscpu model and flags.

    python benchmarks/loader.py [--images 256] [--workers 2] [--precompute 4]
"""

import argparse
import io
import multiprocessing
import random
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.buckets import fit
from ldm.config import DataConfig, TextEncoderConfig, VAEConfig
from ldm.data import open_rgb
from ldm.precompute import encode_shard
from ldm.text_encoder import build_text_encoder
from ldm.vae import AutoencoderKL

A100_IMAGES_PER_S = 36  # MosaicML's SD2 training throughput per A100 at 512²


def jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n photo-like JPEGs of 640x512 (img2dataset's keep_ratio output at 512): smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = np.mgrid[0:512, 0:640]
        base = (np.stack([x * rng.uniform(0.1, 0.4), y * rng.uniform(0.1, 0.4), (x + y) * 0.2], -1) % 255).astype(
            np.float32
        )
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def load(data: bytes) -> tuple:
    return tuple(fit(open_rgb(data), (512, 512), False, False, random.Random(0))[0].shape)


def lscpu() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu: not available"
    return "\n".join(line for line in info.splitlines() if line.split(":")[0] in ("Model name", "CPU(s)", "Flags"))


def precompute_rate(images: int, batch_size: int = 4) -> float:
    """images/s of encode_shard on one shard of `images` 512 px JPEGs with captions, SD v1's VAE and tokenizer."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL(VAEConfig()).to(device).eval()  # SD v1's KL-f8 at full size, random weights
    text_encoder = build_text_encoder(TextEncoderConfig())
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "00000.tar"
        with tarfile.open(shard, "w") as tar:
            for i, data in enumerate(jpegs(images, seed=1)):
                for ext, payload in (("jpg", data), ("txt", b"a photo of a gradient")):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        with torch.no_grad():
            vae.encode(torch.randn(1, 3, 512, 512, device=device))  # warm up
        start = time.perf_counter()
        encode_shard(str(shard), Path(tmp) / "out.tar", vae, text_encoder, DataConfig(), batch_size, device)
        return images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    p.add_argument("--precompute", type=int, default=0, help="also time ldm.precompute on this many 512 px images")
    args = p.parse_args()
    print(lscpu())
    data, per_core = jpegs(args.images), 0.0
    for workers in range(1, args.workers + 1):
        with multiprocessing.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:  # a core each
            pool.map(load, data[:workers])  # warm the workers
            start = time.perf_counter()
            pool.map(load, data, chunksize=4)
            rate = len(data) / (time.perf_counter() - start)
        print(f"{workers} worker(s): {rate:.1f} images/s, {rate / workers:.1f} per core")
        per_core = max(per_core, rate / workers)
    need = A100_IMAGES_PER_S / per_core
    print(f"one A100 at {A100_IMAGES_PER_S} images/s of 512²: {need:.1f} cores of this CPU (at its best rate a core)")
    if args.precompute:
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
        rate = precompute_rate(args.precompute)
        print(f"precompute, 512² on SD's KL-f8 VAE (fp32, {where}): {rate:.2f} images/s, {3600 * rate:.0f} an hour")


if __name__ == "__main__":
    main()
