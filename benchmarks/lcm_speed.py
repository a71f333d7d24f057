r"""The fast CPU path against diffusers' (issue 29), on random SD v1 weights at 512x512, sides interleaved, medians.

    python benchmarks/lcm_speed.py --part decode [--repeats 5] [--latent 64]
    python benchmarks/lcm_speed.py --part pipeline [--repeats 2] [--size 512] [--config configs/tiny.yaml]

--part decode: seconds per decode of one 64x64 latent (a 512x512 image) by our VAE decoder, our TAESD, diffusers'
AutoencoderTiny (the same TAESD weights) and the live preview without TAESD (ldm.decode's fitted linear colours),
and each one's ratio to our VAE's.

--part pipeline: seconds per image and the ratio to diffusers' DDIM-20 (guidance 7.5) of diffusers' LCM 4 steps
(LCMScheduler, guidance 1) + AutoencoderTiny, what a diffusers user does for speed, and ours: `--sampler lcm`
4 steps, guidance 1, + TAESD (needs the samplers stream's "lcm"). DDIM-20 is extrapolated from --measured-steps
as benchmarks/bench_txt2img.py does (the whole call + the remaining steps x UNet time per step).

The PSNR of TAESD's decode against the VAE's needs TAESD's real weights, trained for SD's VAE: random weights say
nothing of it, and madebyollin's files are not reachable from here.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_txt2img import PROMPT, UNetTimer, cpu_flags, save_model  # noqa: E402
from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline  # noqa: E402

import ldm  # noqa: E402
from conftest import ROOT, randomize_  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.decode import fit_rgb_projection  # noqa: E402
from ldm.model import StableDiffusion  # noqa: E402
from ldm.samplers import make_scheduler  # noqa: E402
from ldm.taesd import load_taesd  # noqa: E402
from ldm.vae import AutoencoderKL  # noqa: E402


def table(times: dict[str, list[float]], base: str, unit: str) -> None:
    """Medians, their ratio to `base`'s, and the spread of each side's runs."""
    print(f"| side | {unit} (median) | ratio to {base} | runs |")
    print("|---|---:|---:|---|")
    for side, runs in times.items():
        median = statistics.median(runs)
        spread = ", ".join(f"{t:.3g}" for t in runs)
        print(f"| {side} | {median:.4g} | {median / statistics.median(times[base]):.3g}x | {spread} |")


def interleaved(sides: dict, repeats: int) -> dict[str, list[float]]:
    """Each side's call once to warm up, then `repeats` rounds of every side in turn (reversed every other round)."""
    for call in sides.values():
        call()
    times = {side: [] for side in sides}
    for r in range(repeats):
        for side in list(sides)[:: -1 if r % 2 else 1]:
            t0 = time.perf_counter()
            sides[side]()
            times[side].append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def decode_part(args, folder: Path) -> None:
    cfg = load_config(args.config)
    model = StableDiffusion(cfg, empty=True)  # the UNet and text encoder on the meta device: only the VAE is real
    model.first_stage_model = randomize_(AutoencoderKL(cfg.vae)).eval()
    tiny = randomize_(AutoencoderTiny()).eval()
    tiny.save_pretrained(folder / "taesd")
    taesd = load_taesd(folder / "taesd")
    projection = fit_rgb_projection(model)
    z = torch.randn(1, cfg.vae.embed_dim, args.latent, args.latent, generator=torch.Generator().manual_seed(0))
    sides = {
        "ldm VAE decoder": lambda: model.decode_first_stage(z),
        "ldm TAESD": lambda: taesd.decode(z),
        "diffusers AutoencoderTiny": lambda: tiny.decode(z),
        "ldm preview, fitted colours": lambda: torch.einsum("bchw,cd->bdhw", z, projection[:-1]),
    }
    side = args.latent * cfg.vae.factor
    print(
        f"decode of a {args.latent}x{args.latent} latent ({side}x{side} image), fp32, {torch.get_num_threads()} threads"
    )
    table(interleaved(sides, args.repeats), "ldm VAE decoder", "s per decode")


def pipeline_part(args, folder: Path) -> None:
    cfg = load_config(args.config)
    save_model(cfg, folder)
    randomize_(AutoencoderTiny()).eval().save_pretrained(folder / "taesd")
    ddim = StableDiffusionPipeline.from_pretrained(folder / "diffusers", safety_checker=None)
    ddim.scheduler = make_scheduler("ddim", cfg)
    lcm = StableDiffusionPipeline(**ddim.components | {"vae": AutoencoderTiny.from_pretrained(folder / "taesd")})
    lcm.scheduler = LCMScheduler.from_config(ddim.scheduler.config)
    for pipe in (ddim, lcm):
        pipe.set_progress_bar_config(disable=True)
    ours = ldm.load_pipeline(folder / "model.safetensors", taesd=folder / "taesd")
    timer, size, seed = UNetTimer(ddim.unet), args.size, torch.Generator
    ddim_parts = []

    def ddim_measured():
        timer.total = 0.0
        t0 = time.perf_counter()
        ddim(PROMPT, num_inference_steps=args.measured_steps, height=size, width=size, generator=seed().manual_seed(0))
        ddim_parts.append((time.perf_counter() - t0, timer.total))

    sides = {
        "diffusers DDIM-20": ddim_measured,
        "diffusers LCM-4 + AutoencoderTiny": lambda: lcm(
            PROMPT, num_inference_steps=4, guidance_scale=1.0, height=size, width=size, generator=seed().manual_seed(0)
        ),
        "ldm LCM-4 + TAESD": lambda: ours.txt2img(
            PROMPT, sampler="lcm", steps=4, scale=1.0, height=size, width=size, seed=0, progress=False
        ),
    }
    times = interleaved(sides, args.repeats)
    per_step = [unet / args.measured_steps for _, unet in ddim_parts[1:]]
    times["diffusers DDIM-20"] = [
        whole + (20 - args.measured_steps) * step for (whole, _), step in zip(ddim_parts[1:], per_step)
    ]
    print(f"txt2img {size}x{size}, fp32, {torch.get_num_threads()} threads (DDIM-20 from {args.measured_steps} steps)")
    table(times, "diffusers DDIM-20", "s per image")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("decode", "pipeline"), default="decode")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sd-v1.yaml")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latent", type=int, default=64, help="--part decode: the latent's side (64: a 512x512 image)")
    p.add_argument("--size", type=int, default=512, help="--part pipeline: the image side")
    p.add_argument("--measured-steps", type=int, default=2, help="--part pipeline: DDIM steps run, 20 extrapolated")
    args = p.parse_args()
    print(f"host: {cpu_flags()}")
    with tempfile.TemporaryDirectory() as folder:
        (decode_part if args.part == "decode" else pipeline_part)(args, Path(folder))


if __name__ == "__main__":
    main()
