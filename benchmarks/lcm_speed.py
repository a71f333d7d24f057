r"""The fast CPU path against diffusers' (issue 29), on random SD v1 weights at 512x512, sides interleaved, medians.

    python benchmarks/lcm_speed.py --part decode [--repeats 5] [--latent 64]
    python benchmarks/lcm_speed.py --part pipeline [--repeats 2] [--size 512] [--config configs/tiny.yaml] \
        [--sides ...] [--workdir DIR] [--no-rss]

--part decode: seconds per decode of one 64x64 latent (a 512x512 image) by our VAE decoder, our TAESD, diffusers'
AutoencoderTiny (the same TAESD weights) and the live preview without TAESD (ldm.decode's fitted linear colours),
and each one's ratio to our VAE's.

--part pipeline: seconds per image and the ratio to diffusers' DDIM-20 (guidance 7.5) of diffusers' LCM 4 steps
(LCMScheduler, guidance 1) + AutoencoderTiny, what a diffusers user does for speed, and ours: `--sampler lcm`
4 steps, guidance 1, + TAESD, on torch and on the OpenVINO backend, and DeepCache N=3 DDIM-20 as in issue #18. The
DDIM-20 sides are extrapolated from --measured-steps as benchmarks/bench_txt2img.py does (the whole call + the
remaining steps x UNet time per step; 3 measured steps are one DeepCache cycle); the LCM sides run their 4 steps.
Peak RSS, first: a fresh process per side loads it and makes one image (the whole process's high-water mark; an
OpenVINO side converts its models there unless --workdir kept them converted in OpenVINO's cache).

The PSNR of TAESD's decode against the VAE's needs TAESD's real weights, trained for SD's VAE: random weights say
nothing of it, and madebyollin's files are not reachable from here.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_txt2img import PROMPT, UNetTimer, cpu_flags, hwm_gib, save_model  # noqa: E402
from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline  # noqa: E402

import ldm  # noqa: E402
from conftest import ROOT, randomize_  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.decode import fit_rgb_projection  # noqa: E402
from ldm.model import StableDiffusion  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402
from ldm.samplers import make_scheduler  # noqa: E402
from ldm.taesd import load_taesd  # noqa: E402
from ldm.vae import AutoencoderKL  # noqa: E402


def table(times: dict[str, list[float]], base: str, unit: str, rss: dict[str, float] | None = None) -> None:
    """Medians, their ratio to `base`'s, the spread of each side's runs and its peak RSS (GiB) where measured."""
    print(f"| side | {unit} (median) | ratio to {base} | runs | peak RSS |")
    print("|---|---:|---:|---|---:|")
    for side, runs in times.items():
        median = statistics.median(runs)
        spread = ", ".join(f"{t:.3g}" for t in runs)
        memory = f"{rss[side]:.2f} GiB" if rss and side in rss else "-"
        print(f"| {side} | {median:.4g} | {median / statistics.median(times[base]):.3g}x | {spread} | {memory} |")


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
            print(f"  repeat {r + 1}, {side}: {times[side][-1]:.3g} s", flush=True)
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


SIDES = (
    "diffusers DDIM-20",
    "ldm DeepCache DDIM-20",
    "diffusers LCM-4 + AutoencoderTiny",
    "ldm LCM-4 + TAESD",
    "ldm OpenVINO LCM-4 + TAESD",
)


def build(side: str, folder: Path, cfg, size: int, ours=None) -> tuple:
    """A side's image call and the UNet module timed for its extrapolation (None: LCM's 4 steps all run). The ldm
    torch sides share one loaded model (`ours`, loaded if not given); the OpenVINO side loads its own (the backend
    may free the torch weights it converted)."""
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    if side.startswith("diffusers"):
        lcm = "LCM" in side
        tiny = {"vae": AutoencoderTiny.from_pretrained(folder / "taesd")} if lcm else {}
        pipe = StableDiffusionPipeline.from_pretrained(folder / "diffusers", safety_checker=None, **tiny)
        pipe.set_progress_bar_config(disable=True)
        if lcm:
            pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
            return lambda steps: pipe(
                PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size, generator=seed()
            ), None
        pipe.scheduler = make_scheduler("ddim", cfg)
        return lambda steps: pipe(
            PROMPT, num_inference_steps=steps, height=size, width=size, generator=seed()
        ), pipe.unet
    if "OpenVINO" in side:
        pipe = ldm.load_pipeline(folder / "model.safetensors", backend="openvino", taesd=folder / "taesd")
    else:
        model = (ours or ldm.load_pipeline(folder / "model.safetensors")).model
        pipe = Pipeline(model, taesd=None if "DDIM" in side else load_taesd(folder / "taesd"))
    if "DDIM" in side:
        return lambda steps: pipe.txt2img(
            PROMPT, sampler="ddim", steps=steps, deepcache=3, height=size, width=size, seed=0, progress=False
        ), pipe.unet
    return lambda steps: pipe.txt2img(
        PROMPT, sampler="lcm", steps=steps, scale=1.0, height=size, width=size, seed=0, progress=False
    ), None


def peak_rss(side: str, args, folder: Path) -> float:
    """The whole-process peak RSS (GiB) of a fresh process that loads the side and makes one image."""
    command = [sys.executable, __file__, "--rss-of", side, str(folder), "--size", str(args.size)]
    command += ["--measured-steps", str(args.measured_steps), "--config", str(args.config)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def pipeline_part(args, folder: Path) -> None:
    cfg = load_config(args.config)
    if not (folder / "model.safetensors").exists():
        save_model(cfg, folder)
        randomize_(AutoencoderTiny()).eval().save_pretrained(folder / "taesd")
    if args.rss_of:
        call, _ = build(args.rss_of, folder, cfg, args.size)
        with torch.inference_mode():
            call(args.measured_steps if "DDIM" in args.rss_of else 4)
        print(hwm_gib())
        return
    rss = {} if args.no_rss else {side: peak_rss(side, args, folder) for side in args.sides}
    ours = ldm.load_pipeline(folder / "model.safetensors")
    built = {side: build(side, folder, cfg, args.size, ours) for side in args.sides}
    timers = {side: UNetTimer(unet) for side, (_, unet) in built.items() if unet is not None}
    unet_time = {side: [] for side in timers}

    def side_call(side):
        call, _ = built[side]
        if side not in timers:
            return lambda: call(4)

        def measured():
            timers[side].total = 0.0
            call(args.measured_steps)
            unet_time[side].append(timers[side].total)

        return measured

    times = interleaved({side: side_call(side) for side in args.sides}, args.repeats)
    for side in timers:  # DDIM-20 = the whole call + (20 - measured) x UNet seconds per step (bench_txt2img.py)
        per_step = [t / args.measured_steps for t in unet_time[side][1:]]  # [0]: the warm-up
        times[side] = [whole + (20 - args.measured_steps) * step for whole, step in zip(times[side], per_step)]
    print(
        f"txt2img {args.size}x{args.size}, fp32, {torch.get_num_threads()} threads "
        f"(DDIM-20 from {args.measured_steps} steps)"
    )
    table(times, args.sides[0], "s per image", rss)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("decode", "pipeline"), default="decode")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sd-v1.yaml")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latent", type=int, default=64, help="--part decode: the latent's side (64: a 512x512 image)")
    p.add_argument("--size", type=int, default=512, help="--part pipeline: the image side")
    p.add_argument("--measured-steps", type=int, default=3, help="--part pipeline: DDIM steps run, 20 extrapolated")
    p.add_argument(
        "--sides", nargs="+", choices=SIDES, default=list(SIDES), help="--part pipeline: the first is the base"
    )
    p.add_argument("--no-rss", action="store_true", help="--part pipeline: skip the peak-RSS subprocesses")
    p.add_argument("--workdir", type=Path, help="--part pipeline: keep the random model here for the next run")
    p.add_argument("--rss-of", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_of:
        args.rss_of, folder = args.rss_of[0], Path(args.rss_of[1])
        return pipeline_part(args, folder)
    print(f"host: {cpu_flags()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (decode_part if args.part == "decode" else pipeline_part)(args, folder)


if __name__ == "__main__":
    main()
