"""ldm: a readable Stable Diffusion v1 (latent diffusion) you can train from scratch and load real weights into."""
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, load_model
from ldm.config import ModelConfig, load_config
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline

__all__ = ["DEFAULT_MODEL", "CheckpointError", "ModelConfig", "Pipeline", "StableDiffusion", "load_config", "load_model", "load_pipeline"]

# The embedded model: 32x32 emoji from text, trained by this project's scripts (its card: README.md beside it).
DEFAULT_MODEL = Path(__file__).parent / "assets" / "emoji" / "model.safetensors"


def load_pipeline(
    path: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ModelConfig | None = None,
    quantize: str | None = None,
    compile: bool = False,
) -> Pipeline:
    """A checkpoint's models in eval mode, with txt2img / img2img / inpaint: `.unet .vae .text_encoder .tokenizer .cfg`.

    path: an original SD v1 single file (.safetensors, or .ckpt read without running code), one of our
    checkpoints, or a diffusers folder; None: the embedded emoji model (DEFAULT_MODEL). config: the architecture, when a single file does not carry it.
    quantize="int8": a dynamic-int8 UNet (CPU, fp32); compile: torch.compile the UNet (see Pipeline).
    An in-memory StableDiffusion model becomes a pipeline with `Pipeline(model)`.
    """
    model = load_model(DEFAULT_MODEL if path is None else path, config).to(device=device, dtype=dtype).eval()
    return Pipeline(model, quantize=quantize, compile=compile).eval()
