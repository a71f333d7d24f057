r"""Peak RSS of one whole txt2img run (loading the file, converting or compiling, sampling, decoding) with the torch
backend and with the OpenVINO backend, each in a fresh process, on a random SD v1 model saved once in --workdir.

    python benchmarks/openvino_rss.py --workdir /tmp/ov-rss --size 512 --steps 1 \
        torch openvino-cold openvino-warm [--repo OTHER_CHECKOUT]

A side is `torch`, `openvino-cold` (an empty OpenVINO cache: the run converts the UNet and decoder),
`openvino-warm` (the cache the cold run filled: the run only reads and compiles) or `openvino-unet` (OpenVINO alone,
no ldm: the cached UNet graph compiled and called once). DDIM, guidance 7.5 (a batch of 2
UNet rows, as benchmarks/bench_txt2img.py), seed 0. Printed per side: the process's high-water mark (VmHWM) and
the seconds. --repo imports ldm from another checkout (the "before" of a change) with the same model file.

2026-12-08, host `AMD EPYC` (lscpu flags fma avx avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni), 2 cores
shared with other jobs (load average 5-11), OMP_NUM_THREADS=2, torch 2.13, openvino 2026.4.1, 512x512, 1 step:

| side | peak RSS | seconds |
|---|---|---|
| torch (main d259e2d) | 5.80 GiB | 282 |
| OpenVINO f32, converting (main d259e2d) | 14.08 GiB | 1247 |
| OpenVINO f32, cached graphs (main d259e2d) | 13.06 GiB | 142 |
| OpenVINO f32, cached graphs, torch weights spilled (this script's checkout) | 9.67 GiB | 143 |

What is left is OpenVINO's own: its UNet graph alone (read_model + compile_model of the cached f32 graph, one call
on a batch of 2 at 64x64 latents: the openvino-unet side, 47 s) peaks at 7.25 GiB, the converted file's 3.4 GB
mapped and a repacked copy of the weights beside it (the same 7.25 GiB with ENABLE_MMAP off: then read into memory).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SIDES = ("torch", "openvino-cold", "openvino-warm", "openvino-unet")


def gib(kib: int) -> float:
    return kib / 2**20


def unet_graph_call(cache: Path, size: int) -> None:
    """OpenVINO alone: the cached f32 UNet graph read, compiled and called once on a batch of 2 (SD v1's shapes)."""
    import numpy as np
    import openvino

    core = openvino.Core()
    graph = core.compile_model(
        core.read_model(next(cache.glob("unet-*-f32.xml"))), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    g = np.random.default_rng(0)
    graph(
        [
            g.standard_normal((2, 4, size // 8, size // 8), np.float32),
            np.array([500, 500]),
            g.standard_normal((2, 77, 768), np.float32),
        ]
    )


def run_side(side: str, model: Path, size: int, steps: int) -> dict:
    """In this process: one image, then the peak RSS figures."""
    import ldm

    start = time.perf_counter()
    if side == "openvino-unet":
        unet_graph_call(model.parent / "openvino-cache", size)
    else:
        pipe = ldm.load_pipeline(model, backend="torch" if side == "torch" else "openvino")
        pipe.txt2img(PROMPT, steps=steps, sampler="ddim", height=size, width=size, seed=0, progress=False)
    status = Path("/proc/self/status").read_text()
    hwm = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    return {"peak_rss_gib": gib(hwm), "seconds": time.perf_counter() - start}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("sides", nargs="*", help=f"of {', '.join(SIDES)}")
    p.add_argument("--workdir", type=Path, required=True, help="the random model's file and the OpenVINO cache")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose ldm runs")
    p.add_argument("--side-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    model = args.workdir / "model.safetensors"
    if set(args.sides) - set(SIDES):
        p.error(f"sides are among {', '.join(SIDES)}")
    if args.side_of:
        print(json.dumps(run_side(args.side_of, model, args.size, args.steps)))
        return
    if not model.exists():
        save = (
            "import sys; from conftest import ROOT, randomize_; from ldm.checkpoint import save_single_file; "
            "from ldm.config import load_config; from ldm.model import StableDiffusion; "
            "save_single_file(randomize_(StableDiffusion(load_config(ROOT / 'configs' / 'sd-v1.yaml'))).eval(), "
            "sys.argv[1])"
        )
        args.workdir.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-c", save, str(model)], check=True, cwd=ROOT / "tests", env=env)
    cache = args.workdir / "openvino-cache"
    for side in args.sides:
        if side == "openvino-cold":
            shutil.rmtree(cache, ignore_errors=True)
        env = os.environ | {"LDM_OPENVINO_CACHE": str(cache), "PYTHONPATH": str(args.repo.resolve())}
        command = [sys.executable, __file__, "--side-of", side, "--workdir", str(args.workdir)]
        command += ["--size", str(args.size), "--steps", str(args.steps)]
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=args.repo)
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{side} ({args.repo.name}), {args.size}x{args.size}, {args.steps} step(s): peak RSS "
            f"{r['peak_rss_gib']:.2f} GiB, {r['seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
