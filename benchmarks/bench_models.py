"""Ours vs diffusers on the same random weights, full SD v1 size, fp32 on CPU, measured in one run.

    python benchmarks/bench_models.py [--repeats 3] [--latent 64] [--only unet|vae]

For each of (1) one UNet call, batch 2 (classifier-free guidance), and (2) a VAE decode
latent -> 8x image, it interleaves ours and diffusers' `repeats` times and prints the medians, the
ratio ours/theirs with its spread, and the achieved GFLOP/s against a GEMM rate measured in the
same run (FLOPs counted by torch.utils.flop_counter on one call). Peak RSS of each side is measured
in a fresh subprocess (`--rss-of`) holding only that side's weights: the process's whole resident
memory at its high-water mark during one call (weights included).
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ROOT, randomize_  # noqa: E402
from test_models import diffusers_unet, diffusers_vae  # noqa: E402

from ldm.config import load_config  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402
from ldm.vae import AutoencoderKL  # noqa: E402


def gemm_rate(n: int = 4096, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def workloads(kind: str, latent: int):
    """(ours, theirs, run, flops): the two models on the same weights, and run(model) on fixed inputs."""
    cfg = load_config(ROOT / "configs" / "sd-v1.yaml")
    g = torch.Generator().manual_seed(0)
    if kind == "unet":
        ours = randomize_(UNetModel(cfg.unet)).eval()
        theirs = diffusers_unet(cfg, ours)
        x, t, c = torch.randn(2, 4, latent, latent, generator=g), torch.tensor([500, 500]), torch.randn(2, 77, 768, generator=g)

        def run(model):
            out = model(x, t, c)
            return out if model is ours else out.sample
    else:
        ours = randomize_(AutoencoderKL(cfg.vae)).eval()
        theirs = diffusers_vae(cfg, ours)
        z = torch.randn(1, 4, latent, latent, generator=g)

        def run(model):
            out = model.decode(z)
            return out if model is ours else out.sample
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run(ours)
    return ours, theirs, run, counter.get_total_flops()


def timed(run, model) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        run(model)
        return time.perf_counter() - t0


def peak_rss_of_one_call(run, model) -> float:
    """Peak resident memory (GiB) while `run(model)` runs: the kernel's high-water mark, reset first."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    timed(run, model)
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2**20


def peak_rss_gib(kind: str, side: str, latent: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-of", kind, side, "--latent", str(latent)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gib"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--only", choices=["unet", "vae"])
    p.add_argument("--rss-of", nargs=2, metavar=("KIND", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_of:
        kind, side = args.rss_of
        ours, theirs, run, _ = workloads(kind, args.latent)
        model = ours if side == "ours" else theirs
        del ours, theirs  # only the measured side's weights stay resident
        gc.collect()
        print(json.dumps({"peak_rss_gib": peak_rss_of_one_call(run, model)}))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, latent {args.latent}x{args.latent}")
    for kind in [args.only] if args.only else ["unet", "vae"]:
        ours, theirs, run, flops = workloads(kind, args.latent)
        timed(run, ours), timed(run, theirs)  # warm-up
        t_ours, t_theirs, ratios, gemm = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so a change of machine phase hits both sides
            gemm.append(gemm_rate())
            t_ours.append(timed(run, ours))
            t_theirs.append(timed(run, theirs))
            ratios.append(t_ours[-1] / t_theirs[-1])
        m_ours, m_theirs, rate = statistics.median(t_ours), statistics.median(t_theirs), statistics.median(gemm)
        rss_ours, rss_theirs = peak_rss_gib(kind, "ours", args.latent), peak_rss_gib(kind, "theirs", args.latent)
        print(
            f"{kind}: {flops / 1e12:.2f} TFLOP | ours {m_ours:.2f} s ({flops / m_ours / 1e9:.0f} GFLOP/s, {flops / m_ours / 1e9 / rate:.2f} of GEMM) | "
            f"diffusers {m_theirs:.2f} s ({flops / m_theirs / 1e9 / rate:.2f} of GEMM) | ratio ours/diffusers {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}..{max(ratios):.3f}] | GEMM {rate:.0f} GFLOP/s [{min(gemm):.0f}..{max(gemm):.0f}] | "
            f"peak RSS ours {rss_ours:.2f} GiB, diffusers {rss_theirs:.2f} GiB"
        )


if __name__ == "__main__":
    main()
