"""The three networks of Stable Diffusion in one module, named as CompVis's `LatentDiffusion`.

`StableDiffusion(cfg).state_dict()` has the keys of an original SD v1 file: `model.diffusion_model.*`
(UNet), `first_stage_model.*` (VAE) and `cond_stage_model.transformer.*` (text model; SD files add a
`text_model.` level there, which ldm.checkpoint handles).
"""
import torch.nn as nn

from ldm.config import ModelConfig
from ldm.text_encoder import FrozenCLIPEmbedder
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = FrozenCLIPEmbedder(cfg.text_encoder)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> FrozenCLIPEmbedder:
        return self.cond_stage_model

    @property
    def tokenizer(self):
        return self.cond_stage_model.tokenizer
