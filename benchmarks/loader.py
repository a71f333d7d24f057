"""How fast the CPU feeds training from images: 512 px JPEG decode + resize + crop (ldm.data.open_rgb and
ldm.buckets.fit, what the shard loader does per sample) in images/s, with 1..N worker processes, and the cores one
A100 needs at MosaicML's SD2 rates (~36 images/s at 512², ~137 at 256²). Prints the host's lscpu model and flags.

    python benchmarks/loader.py [--images 256] [--workers 2]
"""

import argparse
import io
import multiprocessing
import random
import subprocess
import time

import numpy as np
import torch
from PIL import Image

from ldm.buckets import fit
from ldm.data import open_rgb

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
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


if __name__ == "__main__":
    main()
