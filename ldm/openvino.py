"""The OpenVINO backend (`Pipeline(backend="openvino")`, txt2img.py --backend openvino; `pip install ldm[openvino]`).

The loaded model's UNet and VAE decoder (or the TAESD decoder that replaces it, ldm.taesd), weights as they are
(LoRAs merged), are converted once with
openvino.convert_model and cached on disk, keyed by a hash of their weights (one f32 graph, and one with int8 weights
for "int8": the other precisions are a compile-time hint on the f32 graph). The weights are hashed only when the model
or its patch version (ldm.patcher) differs from the last call's, not at each call. The pipeline then calls the compiled
graphs where it would call the torch modules, so samplers, guidance, masks and metadata stay ldm's. The precision is
explicit: "fp32" runs f32 (OpenVINO would run bf16 by default on a CPU with bf16 kernels), "bf16" runs bf16, "int8"
compresses the weights to int8 (nncf.compress_weights) and runs f32; "default" leaves OpenVINO's own choice (the
"OpenVINO alone" row of benchmarks/bench_txt2img.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ldm import LdmError
from ldm.taesd import TAESD

PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "default": None}  # -> INFERENCE_PRECISION_HINT
CACHE = Path(os.environ.get("LDM_OPENVINO_CACHE", Path.home() / ".cache" / "ldm" / "openvino"))


class BackendError(LdmError):
    """The OpenVINO backend cannot run as asked (not installed, an unknown precision...)."""


def weights_hash(module: nn.Module) -> str:
    """SHA-256 of a module's parameter names, shapes, dtypes and bytes: the converted files' cache key."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class UNetCall(nn.Module):
    """The UNet as traced: timesteps as a (B,) tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, context):
        return self.unet(x, timesteps, context)


class DecodeCall(nn.Module):
    """Latents -> images, as StableDiffusion.decode_first_stage: D(z_0 / scale_factor)."""

    def __init__(self, vae, scale_factor: float):
        super().__init__()
        self.vae, self.scale_factor = vae, scale_factor

    def forward(self, z):
        return self.vae.decode(z / self.scale_factor)


class OpenVINO:
    """The converted UNet and VAE decoder of a StableDiffusion model, on OpenVINO's CPU device."""

    def __init__(self, precision: str = "fp32", cache: Path | None = None):
        try:
            import openvino
        except ImportError:
            raise BackendError("the OpenVINO backend needs openvino: pip install 'ldm[openvino]'") from None
        if precision not in PRECISIONS:
            raise BackendError(f"unknown OpenVINO precision '{precision}' (known: {', '.join(PRECISIONS)})")
        self.ov, self.core, self.precision = openvino, openvino.Core(), precision
        self.cache = Path(cache or CACHE)
        self.parts: dict[str, tuple[str, object]] = {}  # part -> (weights hash, compiled model)
        self.prepared: tuple[object, int] | None = None  # (model, patch version) the parts were compiled for
        self.conversion_seconds = 0.0

    def prepare(self, model, version: int, taesd: TAESD | None = None) -> None:
        """Convert (or load from the cache) and compile the UNet of `model` as its weights are now, and its VAE
        decoder or, when given, `taesd`'s decoder (the one that decodes), unless they were compiled for this model,
        patch version (ldm.patcher's) and TAESD already. Before compiling, the torch weights of the parts are spilled
        to disk (spill) and the model's other tensors copied (own_copies): they never sit in memory beside the
        graphs."""
        if self.prepared == (model, version, taesd):
            return
        cfg = model.cfg
        h, w, d = cfg.image_size, cfg.image_size, cfg.unet.context_dim
        unet_example = (torch.randn(2, cfg.unet.in_channels, h, w), torch.tensor([500, 500]), torch.randn(2, 77, d))
        latents = (torch.randn(1, cfg.vae.embed_dim, h, w),)
        parts = {"unet": (model.unet, UNetCall(model.unet), unet_example)}  # part -> (weights, traced call, example)
        if taesd is None:
            decoder = nn.ModuleList([model.vae.post_quant_conv, model.vae.decoder])
            parts["decoder"] = (decoder, DecodeCall(model.vae, cfg.scale_factor), latents)
        else:
            parts["taesd"] = (taesd.decoder, taesd.decoder, latents)
        keys = {part: weights_hash(weights) for part, (weights, _, _) in parts.items()}
        for part in [part for part, (key, _) in self.parts.items() if keys.get(part) != key]:
            del self.parts[part]  # graphs of other weights: freed before the next are made
        for part, (weights, call, example) in parts.items():
            self.convert(part, keys[part], call, example)
            spill(weights, self.cache / f"{part}-{keys[part]}.pt")
        own_copies(model, [weights for weights, _, _ in parts.values()])
        for part, key in keys.items():
            if part not in self.parts:
                hint = PRECISIONS[self.precision]
                config = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
                self.parts[part] = (
                    key,
                    self.core.compile_model(self.core.read_model(self.graph(part, key)), "CPU", config),
                )
        self.prepared = (model, version, taesd)

    def graph(self, part: str, key: str) -> Path:
        """The converted graph's file: f32 for every precision but int8 (the others are a compile-time hint)."""
        return self.cache / f"{part}-{key}-{'int8' if self.precision == 'int8' else 'f32'}.xml"

    def convert(self, part: str, key: str, call: nn.Module, example: tuple) -> None:
        """The part converted to OpenVINO (its traced `call` on `example`, every dimension dynamic but the channels)
        and saved in the cache, unless it is there."""
        path = self.graph(part, key)
        if path.exists():
            return
        start = time.perf_counter()
        print(f"note: converting the {part} to OpenVINO ({self.precision}), once for these weights...", file=sys.stderr)
        shapes = [
            self.ov.PartialShape([-1 if i != 1 or t.ndim < 3 else t.shape[1] for i in range(t.ndim)]) for t in example
        ]
        with torch.no_grad():
            ov_model = self.ov.convert_model(call.float().eval(), example_input=example, input=shapes)
        if self.precision == "int8":
            ov_model = compress_int8(ov_model)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ov.save_model(ov_model, path, compress_to_fp16=False)
        self.conversion_seconds += time.perf_counter() - start

    def run(self, part: str, *inputs: torch.Tensor) -> torch.Tensor:
        compiled = self.parts[part][1]
        out = compiled([t.detach().float().cpu().numpy() for t in inputs])[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet call the samplers make (DeepCache and ControlNet are refused before: Pipeline.generate)."""
        timesteps = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).to(torch.int64)
        return self.run("unet", x, timesteps, context).to(x.device, x.dtype)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.run("decoder", z).to(z.device, z.dtype)

    def taesd_decode(self, z: torch.Tensor) -> torch.Tensor:
        """TAESD.decode's images in [0, 1] from the converted TAESD decoder."""
        return self.run("taesd", z).clamp(0, 1)


def spill(module: nn.Module, path: Path) -> None:
    """The module's tensors moved out of memory into a private mapping of a copy in `path` (written once per weights
    hash): the torch weights stay valid (a LoRA merges into them, copy-on-write; the torch backend runs them), but
    take memory only for the pages read, and none while OpenVINO runs the converted graph. Called again after reading
    every weight (hashing, converting), it maps the file afresh, so the pages read are dropped."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), path.with_suffix(".part"))
        path.with_suffix(".part").rename(path)
    with torch.inference_mode(False):  # plain tensors, which a LoRA may change in place outside inference mode
        mapped = torch.load(path, mmap=True, weights_only=True)
        for name, tensor in module.state_dict(keep_vars=True).items():
            tensor.data = mapped[name]
    release_freed_memory()


def own_copies(model: nn.Module, spilled: list[nn.Module]) -> None:
    """The model's tensors that were not spilled get copies of their own (the text encoder, the VAE encoder: 0.6 GiB
    for SD v1), so that no tensor is left viewing the file the model was loaded from (safetensors maps the whole
    file: one tensor keeps every page of it that was read in memory), which the system then unmaps."""
    kept = {id(t) for module in spilled for t in module.state_dict(keep_vars=True).values()}
    with torch.inference_mode(False):
        for tensor in model.state_dict(keep_vars=True).values():
            if id(tensor) not in kept:
                tensor.data = tensor.data.clone()
    release_freed_memory()


def release_freed_memory() -> None:
    """glibc keeps freed heap memory for later allocations: give it back to the system (malloc_trim), so that the
    weights spilled leave the process's memory."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None
    if trim is not None:
        trim(0)


def compress_int8(ov_model):
    """int8 weights, one scale per output channel (nncf.compress_weights, INT8_ASYM); activations stay f32."""
    import nncf

    return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
