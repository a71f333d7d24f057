"""ldm: a readable Stable Diffusion v1 (latent diffusion) you can train from scratch and load real weights into.

`import ldm` is light: the names below that need torch, diffusers or transformers load on first use (`__getattr__`),
so the command lines answer --help and argument errors before paying seconds of imports.
"""

import importlib
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "LdmError",
    "ModelConfig",
    "Pipeline",
    "StableDiffusion",
    "load_config",
    "load_model",
    "load_pipeline",
]

# The embedded model: 32x32 emoji from text, trained by this project's scripts (its card: README.md beside it).
DEFAULT_MODEL = Path(__file__).parent / "assets" / "emoji" / "model.safetensors"

_LAZY = {
    "CheckpointError": "ldm.checkpoint",
    "load_model": "ldm.checkpoint",
    "ModelConfig": "ldm.config",
    "load_config": "ldm.config",
    "StableDiffusion": "ldm.model",
    "Pipeline": "ldm.pipeline",
}


class LdmError(ValueError):
    """Bad input, not a bug: a config, checkpoint, image, dataset or argument that cannot be used. The message says
    what to fix; each module raises its own subclass (ConfigError, CheckpointError, InputError, DataError, EvalError),
    and the command lines print it as one line (ldm.cli.run)."""


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")


def load_pipeline(
    path: str | Path | None = None,
    device: str = "cpu",
    dtype=None,
    config=None,
    quantize: str | None = None,
    compile: bool = False,
    backend: str = "torch",
    backend_precision: str = "fp32",
):
    """A checkpoint's models in eval mode, with txt2img / img2img / inpaint: `.unet .vae .text_encoder .tokenizer .cfg`.

    path: an original SD v1 single file (.safetensors, or .ckpt read without running code), one of our
    checkpoints, or a diffusers folder; None: the embedded emoji model (DEFAULT_MODEL). dtype: a torch dtype
    (default float32). config: the architecture (a ModelConfig), when a single file does not carry it.
    quantize="int8": a dynamic-int8 UNet (CPU, fp32); compile: torch.compile the UNet; backend="openvino": the UNet
    and VAE decoder run converted to OpenVINO in backend_precision (fp32, bf16, int8, default; see Pipeline).
    An in-memory StableDiffusion model becomes a pipeline with `Pipeline(model)`.
    """
    import torch

    from ldm.checkpoint import load_model
    from ldm.pipeline import Pipeline

    model = load_model(DEFAULT_MODEL if path is None else path, config)
    model = model.to(device=device, dtype=torch.float32 if dtype is None else dtype).eval()
    return Pipeline(
        model, quantize=quantize, compile=compile, backend=backend, backend_precision=backend_precision
    ).eval()
