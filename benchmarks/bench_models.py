"""Ours vs diffusers on the same random weights, full SD v1 size, fp32 on CPU, measured in one run.

    python benchmarks/bench_models.py [--repeats 3] [--latent 64] [--only unet|vae] [--config configs/sd-v1.yaml]

For each of (1) one UNet call, batch 2 (classifier-free guidance), and (2) a VAE decode
latent -> 8x image, it interleaves ours and diffusers' `repeats` times and prints the medians, the
ratio ours/theirs with its spread, and the achieved GFLOP/s against a GEMM rate measured in the
same run (FLOPs counted by torch.utils.flop_counter on one call). The random weights are saved once
(our CompVis names, and the same tensors under diffusers' names via ldm.diffusers_names' key maps); peak RSS
of each side is measured in a fresh subprocess (`--rss-of`) that loads only its own side's file:
the process's whole resident memory at its high-water mark during one call (weights included).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import ROOT, randomize_  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.diffusers_names import diffusers_configs, rename, unet_key_map, vae_attn_shapes, vae_key_map  # noqa: E402
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


def save_weights(kind: str, cfg, folder: Path) -> None:
    """Random weights of one model, saved once: ours.safetensors (CompVis names), diffusers.safetensors (the same
    tensors renamed)."""
    if kind == "unet":
        state = randomize_(UNetModel(cfg.unet)).state_dict()
        theirs = rename(state, unet_key_map(cfg.unet))
    else:
        state = randomize_(AutoencoderKL(cfg.vae)).state_dict()
        theirs = vae_attn_shapes(rename(state, vae_key_map(cfg.vae)), to_linear=True)
    save_file(state, folder / "ours.safetensors")
    save_file({k: v.contiguous() for k, v in theirs.items()}, folder / "diffusers.safetensors")


def load_side(kind: str, side: str, cfg, folder: Path) -> torch.nn.Module:
    """One side's model built on the meta device and given the saved tensors (assign=True: no second copy)."""
    with torch.device("meta"):
        if side == "ours":
            model = UNetModel(cfg.unet) if kind == "unet" else AutoencoderKL(cfg.vae)
        else:
            config = {k: v for k, v in diffusers_configs(cfg)[kind].items() if k != "_class_name"}
            model = (UNet2DConditionModel if kind == "unet" else DiffusersVAE).from_config(config)
    model.load_state_dict(
        load_file(folder / f"{side if side == 'ours' else 'diffusers'}.safetensors"), strict=True, assign=True
    )
    return model.eval()


def workload(kind: str, cfg, latent: int):
    """run(model, side): one call on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    if kind == "unet":
        x, t, c = (
            torch.randn(2, cfg.unet.in_channels, latent, latent, generator=g),
            torch.tensor([500, 500]),
            torch.randn(2, 77, cfg.unet.context_dim, generator=g),
        )
        return lambda model, side: model(x, t, c) if side == "ours" else model(x, t, c).sample
    z = torch.randn(1, cfg.vae.embed_dim, latent, latent, generator=g)
    return lambda model, side: model.decode(z) if side == "ours" else model.decode(z).sample


def timed(run, model, side) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        run(model, side)
        return time.perf_counter() - t0


def peak_rss_of_one_call(run, model, side) -> float:
    """Peak resident memory (GiB) while `run(model, side)` runs: the kernel's high-water mark, reset first."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    timed(run, model, side)
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2**20


def peak_rss_gib(kind: str, side: str, args, folder: Path) -> float:
    command = [
        sys.executable,
        __file__,
        "--rss-of",
        kind,
        side,
        str(folder),
        "--latent",
        str(args.latent),
        "--config",
        str(args.config),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gib"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--only", choices=["unet", "vae"])
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "sd-v1.yaml",
        help="model architecture (tiny.yaml: a quick check of the script)",
    )
    p.add_argument("--rss-of", nargs=3, metavar=("KIND", "SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cfg = load_config(args.config)
    if args.rss_of:
        kind, side, folder = args.rss_of
        model = load_side(kind, side, cfg, Path(folder))
        print(json.dumps({"peak_rss_gib": peak_rss_of_one_call(workload(kind, cfg, args.latent), model, side)}))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, latent {args.latent}x{args.latent}, "
        f"{args.config.name}"
    )
    for kind in [args.only] if args.only else ["unet", "vae"]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            save_weights(kind, cfg, folder)
            run = workload(kind, cfg, args.latent)
            models = {side: load_side(kind, side, cfg, folder) for side in ("ours", "theirs")}
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                run(models["ours"], "ours")
            flops = counter.get_total_flops()
            with torch.inference_mode():  # the same weights, the same numbers
                max_diff = (run(models["ours"], "ours") - run(models["theirs"], "theirs")).abs().max().item()
            t_ours, t_theirs, ratios, gemm = [], [], [], []
            for _ in range(args.repeats):  # interleaved, so a change of machine phase hits both sides
                gemm.append(gemm_rate())
                t_ours.append(timed(run, models["ours"], "ours"))
                t_theirs.append(timed(run, models["theirs"], "theirs"))
                ratios.append(t_ours[-1] / t_theirs[-1])
            del models
            gc.collect()
            rss_ours, rss_theirs = peak_rss_gib(kind, "ours", args, folder), peak_rss_gib(kind, "theirs", args, folder)
        m_ours, m_theirs, rate = statistics.median(t_ours), statistics.median(t_theirs), statistics.median(gemm)
        print(
            f"{kind}: {flops / 1e12:.2f} TFLOP | ours {m_ours:.2f} s ({flops / m_ours / 1e9:.0f} GFLOP/s, "
            f"{flops / m_ours / 1e9 / rate:.2f} of GEMM) | "
            f"diffusers {m_theirs:.2f} s ({flops / m_theirs / 1e9 / rate:.2f} of GEMM) | "
            f"ratio ours/diffusers {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}..{max(ratios):.3f}] | GEMM {rate:.0f} GFLOP/s [{min(gemm):.0f}..{max(gemm):.0f}] | "
            f"peak RSS ours {rss_ours:.2f} GiB, diffusers {rss_theirs:.2f} GiB | max |ours - diffusers| {max_diff:.1e}"
        )


if __name__ == "__main__":
    main()
