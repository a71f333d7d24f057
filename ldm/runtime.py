"""How a pipeline runs, decided once from the command line's or the page's words: the device, the dtype ("auto"
picks one for the machine), dynamic int8 quantization (ldm.patcher.Patcher.quantize_int8 applies it), torch.compile,
the backend (torch or OpenVINO) and the decoder (the model's VAE, or a TAESD file: ldm.taesd)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.request import InputError

# the --dtype choices of txt2img.py and ldm.eval (and "auto": auto_dtype)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPUINFO = Path("/proc/cpuinfo")  # where auto_dtype reads the CPU's feature flags
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
QUANTIZE = ("int8",)
BACKENDS = ("torch", "openvino")


def auto_dtype(device: str | torch.device) -> tuple[str, str]:
    """--dtype auto: (the DTYPES name to use, why). On a CPU, bf16 where it has AMX or AVX512-BF16 (oneDNN's bf16
    kernels: a whole SD image 2.4-4x faster than fp32 on such a host, PSNR ~54 dB after one step) and fp32 elsewhere
    (bf16 without them is ~5x slower than fp32; BENCHMARKS.md); on CUDA fp16, as diffusers' GPU examples."""
    if torch.device(device).type == "cuda":
        return "fp16", "a CUDA device"
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        lines = []
    flags = {flag for line in lines if line.startswith("flags") for flag in line.partition(":")[2].split()}
    found = [flag for flag in BF16_FLAGS if flag in flags]
    if found:
        return "bf16", f"this CPU has {', '.join(found)}"
    return "fp32", f"this CPU has neither {' nor '.join(BF16_FLAGS)}"


def check_quantize(quantize: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """InputError unless `quantize` is None or a QUANTIZE method that runs on this device and dtype."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise InputError(f"unknown quantization '{quantize}' (known: {', '.join(QUANTIZE)})")
    if device.type != "cpu" or dtype != torch.float32:
        raise InputError(
            f"quantize={quantize} is PyTorch's dynamic quantization: CPU and fp32 only, not {device.type} {dtype}"
        )


@dataclass(frozen=True)
class Runtime:
    """Where and how the models run: `load_pipeline(path, config=..., **runtime.options())`. dtype: a DTYPES name
    (never "auto"); OpenVINO runs on the CPU, in fp32 or bf16 or with int8 weights (`precision`), the torch parts
    beside it (text encoder) in fp32. taesd: a TAESD that decodes instead of the VAE (and encodes, taesd_encode)."""

    device: torch.device
    dtype: str = "fp32"
    quantize: str | None = None
    backend: str = "torch"
    compile: bool = False
    taesd: Path | None = None
    taesd_encode: bool = False

    @property
    def precision(self) -> str:
        """The OpenVINO backend's precision (fp32, bf16 or int8); "fp32" for the torch backend."""
        return self.quantize or self.dtype if self.backend == "openvino" else "fp32"

    def options(self) -> dict:
        """load_pipeline's keyword arguments."""
        openvino = self.backend == "openvino"
        return {
            "device": self.device,
            "dtype": torch.float32 if openvino else DTYPES[self.dtype],
            "quantize": None if openvino else self.quantize,
            "compile": self.compile,
            "backend": self.backend,
            "backend_precision": self.precision,
            "taesd": self.taesd,
            "taesd_encode": self.taesd_encode,
        }


def runtime(
    device: str | None = None,
    dtype: str = "fp32",
    quantize: str | None = None,
    backend: str = "torch",
    compile: bool = False,
    taesd: Path | None = None,
    taesd_encode: bool = False,
) -> Runtime:
    """The Runtime of these settings (device None: cuda when there is one, else cpu; dtype "auto": auto_dtype, said
    once on stderr), or InputError naming the setting that cannot run here."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise InputError(f"unknown --device '{device}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but no CUDA device is available")
    if dtype == "auto":
        dtype, why = auto_dtype(device)
        print(f"note: --dtype auto: {dtype} ({why})", file=sys.stderr)
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}' (known: {', '.join(DTYPES)}, auto)")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "openvino" and (device.type != "cpu" or dtype == "fp16" or compile):
        raise InputError("--backend openvino runs on the CPU in --dtype fp32 or bf16, without --compile")
    if backend == "torch":
        check_quantize(quantize, device, DTYPES[dtype])
    return Runtime(device, dtype, quantize, backend, compile, taesd, taesd_encode)
