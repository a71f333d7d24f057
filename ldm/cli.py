"""What the seven command lines share: a one-line argument error, and one way to end on bad input or Ctrl-C.

    def main(argv=None) -> int:
        args = parse_args(argv)          # an ArgumentParser: a bad flag is one line, exit 2
        return run(lambda: work(args))   # ldm.LdmError -> `error: <message>`, exit 2; Ctrl-C -> `interrupted`, 130

Any other exception is a bug and keeps its traceback. The trainers turn SIGINT into "save a checkpoint, then stop"
themselves; `run` only sees a KeyboardInterrupt that reaches main. This module imports nothing heavy: each command
parses its arguments before importing torch (seconds), so --help and a mistyped flag answer at once.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

from ldm.errors import LdmError

__all__ = [
    "CONTROL_PREPROCESS_NAMES",
    "DTYPE_NAMES",
    "HIRES_UPSCALER_NAMES",
    "QUANTIZE_NAMES",
    "SAMPLER_NAMES",
    "SCHEDULE_NAMES",
    "SYNTAX_NAMES",
    "ArgumentParser",
    "add_speed_arguments",
    "run",
]

# Choices known before torch loads, for the flags. Their owners import torch (ldm.samplers.SAMPLERS and SCHEDULES,
# ldm.runtime.DTYPES / QUANTIZE) or take milliseconds to tens of them to import (ldm.prompts.SYNTAX_NAMES: its regular
# expressions; ldm.config.CONTROL_PREPROCESS_NAMES: yaml and the dataclasses, which ldm.request.HIRES_UPSCALERS imports
# too), so the command line holds their names and the tests check that they agree (tests/test_txt2img.py,
# tests/test_samplers.py, tests/test_config.py, tests/test_hires.py); the library never imports them from here.
SAMPLER_NAMES = (
    "ddim",
    "plms",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
    "ddpm",
    "dpmpp_2m_sde",
    "dpmpp_sde",
    "dpmpp_2s_a",
    "dpm2",
    "dpm2_a",
    "lms",
    "lcm",
)
SCHEDULE_NAMES = ("default", "karras", "exponential", "sgm_uniform")
DTYPE_NAMES = ("fp32", "fp16", "bf16", "auto")  # auto: ldm.runtime.auto_dtype
QUANTIZE_NAMES = ("int8",)
CONTROL_PREPROCESS_NAMES = ("none", "canny")
SYNTAX_NAMES = ("a1111", "plain")
HIRES_UPSCALER_NAMES = (  # ldm.request.HIRES_UPSCALERS
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
    "Lanczos",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (its own print the whole usage first), exit code 2 as argparse's."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """How the UNet runs (txt2img.py and python -m ldm.eval): --dtype, --backend, --quantize, --deepcache(-branch)."""
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        help="fp32 (default), fp16, bf16, or auto: bf16 on CPUs with AMX / AVX512-BF16, fp32 on others, fp16 on CUDA",
    )
    p.add_argument(
        "--backend",
        choices=("torch", "openvino"),
        default="torch",
        help="openvino: the UNet and VAE decoder converted to OpenVINO (once per weights, cached), in --dtype fp32 or "
        "bf16, or with int8 weights (--quantize int8); pip install 'ldm[openvino]'",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_NAMES,
        help="int8: PyTorch's dynamic int8 UNet (CPU, fp32): faster, a slightly different image",
    )
    p.add_argument(
        "--deepcache",
        type=int,
        metavar="N",
        help="DeepCache: the whole UNet every N-th call, its deep features reused between (faster, close image)",
    )
    p.add_argument(
        "--deepcache-branch",
        type=int,
        default=0,
        help="DeepCache's skip branch: 0 (default) recomputes the least; higher stays closer to the full call",
    )


def file_spec(value: str, flag: str, weight: bool) -> tuple[Path, float | str | None]:
    """FILE[:SUFFIX] of --lora (a weight, default 1) or --embedding (a token, default None): a colon ends the file
    name only where the whole value is not an existing file."""
    path, _, suffix = value.rpartition(":")
    if Path(value).is_file() or not path:
        return Path(value), 1.0 if weight else None
    if not weight:
        return Path(path), suffix
    try:
        number = float(suffix)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise LdmError(f"{flag} {value}: the weight after the last ':' must be a finite number, got '{suffix}'")
    return Path(path), number


def run(work: Callable[[], int]) -> int:
    """work()'s exit code; bad input prints `error: <one line>` (exit 2), Ctrl-C prints `interrupted` (exit 130)."""
    try:
        return work()
    except LdmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
