"""The three networks of Stable Diffusion in one module, named as CompVis's `LatentDiffusion`.

`StableDiffusion(cfg).state_dict()` has the keys of an original SD v1 file: `model.diffusion_model.*`
(UNet), `first_stage_model.*` (VAE) and `cond_stage_model.transformer.*` (text model; SD files add a
`text_model.` level there, which ldm.checkpoint handles). The text model is CLIP's, or any local Hugging Face
text encoder named by `text_encoder.pretrained`; the UNet's context_dim must equal its hidden size.

The model owns its latent space, as CompVis's does: the UNet works on z_0 = scale_factor * z, z ~ q(z | x) a VAE
posterior sample (`get_first_stage_encoding`), and images come back as D(z_0 / scale_factor) (`decode_first_stage`);
a latent is cfg.vae.factor times smaller than its image along a side.
"""

import contextlib

import torch
import torch.nn as nn
from accelerate import init_empty_weights

from ldm.config import ConfigError, ModelConfig
from ldm.text_encoder import FrozenTextEncoder, build_text_encoder
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig, empty: bool = False):
        """empty: parameters on the meta device (no memory, no random init; buffers stay real), for a loader to give
        them a file's tensors with load_state_dict(assign=True). A pretrained text encoder is loaded as usual."""
        super().__init__()
        self.cfg = cfg
        with init_empty_weights() if empty and not cfg.text_encoder.pretrained else contextlib.nullcontext():
            text_encoder = build_text_encoder(cfg.text_encoder)
        if text_encoder.hidden_size != cfg.unet.context_dim:
            name = cfg.text_encoder.pretrained or "CLIP"
            raise ConfigError(
                f"unet.context_dim is {cfg.unet.context_dim} but the text encoder ({name}) "
                f"gives {text_encoder.hidden_size}-d "
                f"token states: set unet.context_dim to {text_encoder.hidden_size}"
            )
        with init_empty_weights() if empty else contextlib.nullcontext():
            self.model = DiffusionWrapper(UNetModel(cfg.unet))
            self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = text_encoder

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> FrozenTextEncoder:
        return self.cond_stage_model

    @property
    def tokenizer(self):
        return self.cond_stage_model.tokenizer

    def get_first_stage_encoding(self, z: torch.Tensor) -> torch.Tensor:
        """The UNet's latent z_0 = scale_factor * z of a VAE posterior sample z: about unit variance."""
        return z * self.cfg.scale_factor

    def decode_first_stage(self, z0: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from the UNet's latents: D(z_0 / scale_factor)."""
        return self.vae.decode(z0 / self.cfg.scale_factor)
