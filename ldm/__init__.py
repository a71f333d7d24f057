"""ldm: a readable Stable Diffusion v1 (latent diffusion) you can train from scratch and load real weights into.

`import ldm` is light: the names below that need torch, diffusers or transformers load on first use (`__getattr__`),
so the command lines answer --help and argument errors before paying seconds of imports.
"""

import importlib
from pathlib import Path

from ldm.errors import CheckpointError, LdmError

__all__ = [
    "ASSETS",
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

# What ships in the package: the CLIP vocabulary, the embedded model and its add-ons, each a folder with its card
ASSETS = Path(__file__).parent / "assets"
# The embedded model: 32x32 emoji from text, trained by this project's scripts (its card: README.md beside it).
DEFAULT_MODEL = ASSETS / "emoji" / "model.safetensors"

_LAZY = {
    "load_model": "ldm.checkpoint",
    "ModelConfig": "ldm.config",
    "load_config": "ldm.config",
    "StableDiffusion": "ldm.model",
    "Pipeline": "ldm.pipeline",
    "load_pipeline": "ldm.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
