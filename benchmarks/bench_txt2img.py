r"""Whole txt2img on CPU: ours (fp32) against diffusers' StableDiffusionPipeline (fp32), and our faster modes (int8:
--quantize int8; bf16: --dtype bf16; compile: --compile; deepcache: DeepCache N=3; ov-fp32 / ov-bf16 / ov-int8: the
OpenVINO backend; ov-alone: OpenVINO with its default precision), on the same random SD v1 weights, in one run.

    python benchmarks/bench_txt2img.py [--against diffusers|int8|bf16|compile|deepcache|ov-... ...] [--size 512] \
        [--steps 20] [--measured-steps 3] [--repeats 2]
    # ours' peak memory at 1024x1024
    python benchmarks/bench_txt2img.py --rss-only --size 1024 --measured-steps 1 --against

A random model (configs/sd-v1.yaml; --config tiny.yaml checks the script quickly) is saved once as our single file
and as a diffusers folder (ldm.checkpoint.save_diffusers_folder); --workdir keeps them for the next run. Each
repeat makes one DDIM image per side (guidance 7.5, empty negative prompt, seed 0), in turn, with only
--measured-steps denoising steps, and extrapolates to --steps:

    time(steps) = time of the whole call + (steps - measured) x UNet time per step   (forward hooks on the UNet)

(the scheduler's own per-step work, milliseconds, is counted for the measured steps only). FLOPs are counted by
torch.utils.flop_counter in one call of ours and extrapolated the same way; a GEMM rate is measured before each
repeat. Peak RSS, first: a fresh subprocess per side loads its own files (an OpenVINO side: ours' and the converted
models), then makes one image; printed are the high-water mark of the generation (reset after loading) and that of
the loading. The PSNR of each other side's image against ours (same seed, measured steps) is printed: ~inf-high for
diffusers (same arithmetic), the quality cost of the others.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_models import gemm_rate  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

import ldm  # noqa: E402
from conftest import ROOT, randomize_  # noqa: E402
from ldm.checkpoint import save_diffusers_folder, save_single_file  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.model import StableDiffusion  # noqa: E402
from ldm.openvino import OpenVINO  # noqa: E402
from ldm.samplers import make_scheduler  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def save_model(cfg, folder: Path) -> None:
    model = randomize_(StableDiffusion(cfg)).eval()
    save_single_file(model, folder / "model.safetensors")
    save_diffusers_folder(model, folder / "diffusers")


OPENVINO = {"ov-fp32": "fp32", "ov-bf16": "bf16", "ov-int8": "int8", "ov-alone": "default"}
SIDES = ["diffusers", "int8", "bf16", "compile", "deepcache", *OPENVINO]


def build(side: str, folder: Path, cfg, ours: tuple | None = None) -> tuple:
    """(pipeline, its UNet module, OpenVINO backend or None): diffusers' from its folder, ours (fp32, int8, bf16,
    compiled) from our file. DeepCache N=3 and the OpenVINO sides run on ours' pipeline (`ours`, built if not
    given), so the weights are in memory once: an OpenVINO side is its own ldm.openvino.OpenVINO object, made the
    pipeline's backend for its turn (generate); its UNet "module" is a wrapper of that backend's UNet call."""
    if side == "deepcache" or side in OPENVINO:
        pipe = (ours or build("ours", folder, cfg))[0]
        if side == "deepcache":
            return pipe, pipe.unet, None
        backend = OpenVINO(OPENVINO[side])
        backend.unet = Timed(backend.unet)
        return pipe, backend.unet, backend
    if side == "diffusers":
        pipe = StableDiffusionPipeline.from_pretrained(folder / "diffusers", safety_checker=None)
        pipe.scheduler = make_scheduler("ddim", cfg)
        pipe.set_progress_bar_config(disable=True)
        return pipe, pipe.unet, None
    dtype = torch.bfloat16 if side == "bf16" else torch.float32
    pipe = ldm.load_pipeline(
        folder / "model.safetensors",
        dtype=dtype,
        quantize="int8" if side == "int8" else None,
        compile=side == "compile",
    )
    return pipe, pipe.unet, None


def generate(side: str, pipe, size: int, steps: int, backend=None) -> np.ndarray:
    """One image of `steps` steps; `backend`: an OpenVINO side's backend (None: the torch UNet and decoder)."""
    if side == "diffusers":
        image = pipe(
            PROMPT, num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(0)
        ).images[0]
    else:
        extra = {"deepcache": 3} if side == "deepcache" else {}
        pipe.openvino = backend
        image = pipe.txt2img(
            PROMPT, steps=steps, sampler="ddim", height=size, width=size, seed=0, progress=False, **extra
        )
        image = image[0]
    return np.asarray(image, dtype=np.float64)


class Timed(torch.nn.Module):
    """A plain function as a module, so that UNetTimer's hooks time it (the OpenVINO backend's UNet call)."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *args):
        return self.function(*args)


class UNetTimer:
    """Seconds spent inside a module's forward, summed over calls."""

    def __init__(self, module: torch.nn.Module):
        self.total, self.start = 0.0, 0.0
        module.register_forward_pre_hook(lambda *_: setattr(self, "start", time.perf_counter()))
        module.register_forward_hook(lambda *_: setattr(self, "total", self.total + time.perf_counter() - self.start))


def timed(side: str, built: tuple, timer: UNetTimer, args) -> tuple[float, float, np.ndarray]:
    """(whole call, UNet part) in seconds, and the image, for one image with the measured steps."""
    pipe, _, backend = built
    timer.total = 0.0
    t0 = time.perf_counter()
    image = generate(side, pipe, args.size, args.measured_steps, backend)
    return time.perf_counter() - t0, timer.total, image


def hwm_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2**20


def peak_rss(side: str, args, folder: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--rss-of",
        side,
        str(folder),
        "--size",
        str(args.size),
        "--measured-steps",
        str(args.measured_steps),
        "--config",
        str(args.config),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_flags() -> str:
    """lscpu's flags that decide the fast paths: AVX-512, bf16 (AVX512-BF16, AMX), VNNI (int8)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    keep = [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma")]
    return f"{model}: {' '.join(keep) or 'none of avx2/avx512/amx'}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main():
    p = argparse.ArgumentParser()
    p.add_argument(
        "--against",
        nargs="*",
        choices=SIDES,
        default=["diffusers"],
        help="the sides compared with ours (none: only ours, with --rss-only)",
    )
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="the step count reported (extrapolated)")
    p.add_argument("--measured-steps", type=int, default=2, help="the step count run (with deepcache: a multiple of 3)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sd-v1.yaml")
    p.add_argument(
        "--workdir", type=Path, help="keep the saved random model here and reuse it (default: a temporary folder)"
    )
    p.add_argument("--rss-only", action="store_true", help="only the peak RSS of ours and the --against sides")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--rss-of", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cfg = load_config(args.config)
    diffusers_logging.disable_progress_bar()
    if args.rss_of:
        side, folder = args.rss_of[0], Path(args.rss_of[1])
        pipe, _, backend = build(side, folder, cfg)
        loading = hwm_gib()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        with torch.inference_mode():
            generate(side, pipe, args.size, args.measured_steps, backend)
        print(json.dumps({"peak_rss_gib": hwm_gib(), "loading_peak_rss_gib": loading}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            save_model(cfg, folder)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, DDIM, "
            f"{args.config.name}"
        )
        if args.rss_only:
            for side in ["ours", *args.against]:
                rss = peak_rss(side, args, folder)
                print(
                    f"{side}, {args.size}x{args.size}, {args.measured_steps} step(s): "
                    f"peak RSS {rss['peak_rss_gib']:.2f} GiB "
                    f"(loading {rss['loading_peak_rss_gib']:.2f} GiB)",
                    flush=True,
                )
            return
        sides = ["ours", *args.against]
        # first, while this process holds no model: a fresh subprocess per side (one holding every side's pipeline
        # next to it would not fit in 24 GiB)
        rss = {} if args.no_rss else {side: peak_rss(side, args, folder) for side in sides}
        pipes = {"ours": build("ours", folder, cfg)}
        pipes |= {side: build(side, folder, cfg, pipes["ours"]) for side in args.against}
        timers = {side: UNetTimer(unet) for side, (_, unet, _) in pipes.items()}
        with FlopCounterMode(display=False) as counter:  # also ours' warm-up
            image = generate("ours", pipes["ours"][0], args.size, args.measured_steps)
        unet_flops = sum(counter.get_flop_counts()["UNetModel"].values()) / args.measured_steps
        flops = counter.get_total_flops() + (args.steps - args.measured_steps) * unet_flops
        first, quality = {}, {}
        for side in args.against:  # warm-up (compile: compiling)
            first[side], _, other = timed(side, pipes[side], timers[side], args)
            quality[side] = psnr(image, other)
            print(
                f"warm-up {side}: {first[side]:.1f} s, PSNR of its image against ours {quality[side]:.1f} dB",
                flush=True,
            )
        times = {side: [] for side in sides}
        per_step = {side: [] for side in sides}
        gemm = []
        for _ in range(args.repeats):  # interleaved, so a change of machine phase hits every side
            gemm.append(gemm_rate())
            print(f"repeat: GEMM {gemm[-1]:.0f} GFLOP/s", flush=True)
            for side in sides:
                total, unet, _ = timed(side, pipes[side], timers[side], args)
                per_step[side].append(unet / args.measured_steps)
                times[side].append(total + (args.steps - args.measured_steps) * per_step[side][-1])
                print(
                    f"  {side}: {times[side][-1]:.1f} s per image "
                    f"(measured {total:.1f} s, UNet {per_step[side][-1]:.2f} s/step)",
                    flush=True,
                )
        conversion = {side: pipes[side][2].conversion_seconds for side in sides if side in OPENVINO}
    rate = statistics.median(gemm)
    print(
        f"{args.steps} steps extrapolated from {args.measured_steps} measured; {flops / 1e12:.1f} TFLOP per image "
        f"({unet_flops / 1e12:.2f} per UNet step); GEMM {rate:.0f} GFLOP/s [{min(gemm):.0f}..{max(gemm):.0f}]"
    )
    for side in sides:
        t = statistics.median(times[side])
        memory = (
            f" | peak RSS {rss[side]['peak_rss_gib']:.2f} GiB (loading {rss[side]['loading_peak_rss_gib']:.2f})"
            if side in rss
            else ""
        )
        print(
            f"{side}: {t:.1f} s per image ({flops / t / 1e9:.0f} GFLOP/s, {flops / t / 1e9 / rate:.2f} of GEMM) | "
            f"UNet {statistics.median(per_step[side]):.2f} s/step{memory}"
        )
    base = "diffusers" if "diffusers" in sides else "ours"
    print(f"\nCPU flags (lscpu): {cpu_flags()}")
    print(f"| side | s per image | ratio to {base}, median [min..max] | PSNR to ldm fp32 | peak RSS | conversion |")
    print("|---|---|---|---|---|---|")
    for side in sides:
        ratios = [a / b for a, b in zip(times[side], times[base])]
        memory = f"{rss[side]['peak_rss_gib']:.2f} GiB" if side in rss else "-"
        print(
            f"| {'ldm fp32' if side == 'ours' else side} | {statistics.median(times[side]):.1f} | "
            f"{statistics.median(ratios):.3f} [{min(ratios):.3f}..{max(ratios):.3f}] | "
            f"{quality.get(side, float('inf')):.1f} dB | {memory} | "
            f"{f'{conversion[side]:.1f} s' if side in conversion else '-'} |"
        )
    if "compile" in args.against:
        saved = args.steps * (statistics.median(per_step["ours"]) - statistics.median(per_step["compile"]))
        print(
            f"compile: first call {first['compile']:.1f} s (compiling included); "
            f"saves {saved:.1f} s per {args.steps}-step image"
        )


if __name__ == "__main__":
    main()
