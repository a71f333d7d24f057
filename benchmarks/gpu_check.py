r"""The Python half of benchmarks/gpu_check.sh: parity with diffusers on a device, xformers, and txt2img speed.

    python benchmarks/gpu_check.py --device cuda     # SD v1 sizes: 512x512, 20 steps, fp16 / bf16 / fp32
    python benchmarks/gpu_check.py --device cpu      # tiny sizes (configs/tiny.yaml), so that the script cannot rot

1. Parity: the UNet and the VAE decoder with random weights, ours against diffusers' (converted by diffusers' own
   single-file converters, tests/test_models.py), on the device in each dtype: relative L2 of the difference.
2. xformers (CUDA, when installed): ldm.attention through xformers against torch's SDPA.
3. txt2img: one image per side (ours, diffusers), same random weights, DDIM, guidance 7.5: iterations per second of
   the whole call, and the PSNR of diffusers' image against ours.
Exits 1 when a parity check is off by more than its tolerance.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
from bench_txt2img import generate, psnr, save_model  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from test_models import diffusers_unet, diffusers_vae  # noqa: E402

import ldm  # noqa: E402
from conftest import randomize_  # noqa: E402
from ldm.attention import attention  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.model import StableDiffusion  # noqa: E402
from ldm.runtime import DTYPES  # noqa: E402
from ldm.samplers import make_scheduler  # noqa: E402

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}  # relative L2 of the difference to diffusers' output


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def parity(cfg, device: str, dtypes: list[str], latent: int) -> bool:
    model = randomize_(StableDiffusion(cfg)).eval()
    ok = True
    for name in dtypes:
        dtype = DTYPES[name]
        unet, ref = model.unet.to(device, dtype), diffusers_unet(cfg, model.unet).to(device, dtype)
        vae, ref_vae = model.vae.to(device, dtype), diffusers_vae(cfg, model.vae).to(device, dtype)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
        c = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
        t = torch.tensor([10, 900], device=device)
        with torch.inference_mode():
            errors = {
                "UNet": rel(unet(x, t, c), ref(x, t, c).sample),
                "VAE decode": rel(vae.decode(x[:1]), ref_vae.decode(x[:1]).sample),
            }
        for part, error in errors.items():
            good = error <= TOLERANCE[name]
            ok &= good
            print(f"parity {part} {name} on {device}: relative L2 {error:.2e} ({'ok' if good else 'FAILED'})")
        model.float()
    return ok


def xformers_check(device: str) -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        print("xformers: not installed, skipped")
        return True
    if device != "cuda":
        print("xformers: CUDA only, skipped")
        return True
    q, k, v = (torch.randn(2, 4096, 320, device=device, dtype=torch.float16) for _ in range(3))
    with_x = attention(q, k, v, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(*(t.reshape(2, -1, 8, 40).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, -1, 320)
    error = rel(with_x, ref)
    print(f"xformers attention against SDPA: relative L2 {error:.2e}")
    return error <= TOLERANCE["fp16"]


def speed(cfg, device: str, dtype: str, size: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_model(cfg, folder)
        ours = ldm.load_pipeline(folder / "model.safetensors", device, DTYPES[dtype])
        theirs = StableDiffusionPipeline.from_pretrained(folder / "diffusers", safety_checker=None)
        theirs = theirs.to(device, DTYPES[dtype])
        theirs.scheduler = make_scheduler("ddim", cfg)
        theirs.set_progress_bar_config(disable=True)
        images, rates = {}, {}
        for side, pipe in (("ours", ours), ("diffusers", theirs), ("ours", ours), ("diffusers", theirs)):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            images[side] = generate(side, pipe, size, steps)  # the second round is timed: the first warms up
            if device == "cuda":
                torch.cuda.synchronize()
            rates[side] = steps / (time.perf_counter() - start)
    print(
        f"txt2img {size}x{size}, {steps} DDIM steps, {dtype} on {device}: ours {rates['ours']:.2f} it/s, "
        f"diffusers {rates['diffusers']:.2f} it/s (ours/diffusers time {rates['diffusers'] / rates['ours']:.3f}); "
        f"PSNR of diffusers' image against ours {psnr(images['ours'], images['diffusers']):.1f} dB"
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda, but torch sees no CUDA device (use --device cpu for the tiny run)")
    gpu = args.device == "cuda"
    cfg = load_config(ROOT / "configs" / ("sd-v1.yaml" if gpu else "tiny.yaml"))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if gpu else 'CPU'}")
    ok = parity(cfg, args.device, ["fp32", "fp16", "bf16"] if gpu else ["fp32", "bf16"], 64 if gpu else 8)
    ok &= xformers_check(args.device)
    speed(cfg, args.device, "fp16" if gpu else "fp32", 512 if gpu else 16, 20 if gpu else 3)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
