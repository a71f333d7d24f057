"""TAESD, madebyollin's tiny autoencoder of SD's latent space (github.com/madebyollin/taesd): a 1.2M-parameter decoder
(SD's VAE decoder: 49M) that turns latents into images at a fraction of the cost, and an encoder, for `--taesd` and
`--taesd-encode` and the web page's live previews.

Its latents are the UNet's (SD's VAE latents already x scale_factor), its images in [0, 1]. The networks are plain
stacks of 3x3 convolutions, built here as madebyollin's nn.Sequential so that his files load by their indices:

    Block(x)  = ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)                       every conv 3x3, 64 channels
    decoder   = tanh(z / 3) * 3, conv 4->64, ReLU, n x [3 Blocks, Upsample x2, conv], Block, conv 64->3
    encoder   = conv 3->64, Block, n x [stride-2 conv, 3 Blocks], conv 64->4

n = log2 of the VAE's downsampling factor: madebyollin's SD TAESD is n = 3 (8x); the embedded emoji model's 4x VAE
takes n = 2 (diffusers' AutoencoderTiny with block_out_channels of n + 1 entries, its blocks (1, 3, .., 3) and
(3, .., 3, 1)). A file says its n: the convs after each Upsample and the stride-2 ones are the only ones without bias.

Files: madebyollin's `taesd_decoder.pth` / `.safetensors` (keys `<index>.<param>`, index 0 the clamp) with its
`taesd_encoder` beside it, or a diffusers AutoencoderTiny folder (`decoder.layers.<index - 1>`,
`encoder.layers.<index>`: the correspondence of diffusers' scripts/convert_tiny_autoencoder_to_diffusers.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ldm.config import VAEConfig
from ldm.errors import CheckpointError
from ldm.io import load_state_strict, read_state_dict

WIDTH = 64  # every hidden layer's channels
SUFFIXES = (".safetensors", ".pth")


def conv(n_in: int, n_out: int, **options) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **options)


class Clamp(nn.Module):
    """z -> 3 tanh(z / 3): latents softly bounded to (-3, 3)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


class Block(nn.Module):
    """ReLU(three 3x3 convs with ReLUs between + x)."""

    def __init__(self, channels: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(
            conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(), conv(channels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


def tiny_decoder(latent_channels: int = 4, stages: int = 3) -> nn.Sequential:
    """Latents (B, C, h, w) -> images (B, 3, 2^stages h, 2^stages w), about [0, 1] (the caller clamps)."""
    up = [
        m
        for _ in range(stages)
        for m in (Block(), Block(), Block(), nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False))
    ]
    return nn.Sequential(Clamp(), conv(latent_channels, WIDTH), nn.ReLU(), *up, Block(), conv(WIDTH, 3))


def tiny_encoder(latent_channels: int = 4, stages: int = 3) -> nn.Sequential:
    """Images (B, 3, H, W) in [0, 1] -> latents (B, C, H / 2^stages, W / 2^stages) in the UNet's scale."""
    down = [m for _ in range(stages) for m in (conv(WIDTH, WIDTH, stride=2, bias=False), Block(), Block(), Block())]
    return nn.Sequential(conv(3, WIDTH), Block(), *down, conv(WIDTH, latent_channels))


class TAESD(nn.Module):
    """madebyollin's decoder and, when its file was given, encoder (None otherwise); `name`: what the PNG facts call
    it (the file's or folder's stem, as AUTOMATIC1111 names a VAE by its file)."""

    def __init__(self, decoder: nn.Sequential, encoder: nn.Sequential | None, name: str):
        super().__init__()
        self.decoder, self.encoder, self.name = decoder, encoder, name

    @property
    def factor(self) -> int:
        """How many image pixels a latent pixel spans, a side: 2 per Upsample of the decoder."""
        return 2 ** sum(isinstance(m, nn.Upsample) for m in self.decoder)

    def check(self, vae: VAEConfig, encode: bool) -> None:
        """CheckpointError unless it works in the latent space of a model with this VAE (the same factor and channels)
        and, to encode, has an encoder."""
        channels = self.decoder[1].in_channels
        if vae.factor != self.factor or vae.embed_dim != channels:
            raise CheckpointError(
                f"TAESD '{self.name}' decodes {channels}-channel latents of 1/{self.factor} the image side; this "
                f"model's VAE makes {vae.embed_dim}-channel latents of 1/{vae.factor}"
            )
        if encode and self.encoder is None:
            raise CheckpointError(f"TAESD '{self.name}' has no encoder (its taesd_encoder file beside the decoder)")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in the UNet's scale -> images in [0, 1]."""
        weight = self.decoder[1].weight
        return self.decoder(z.to(weight.device, weight.dtype)).clamp(0, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents in the UNet's scale (deterministic: no posterior to sample)."""
        weight = self.encoder[0].weight
        return self.encoder(x.to(weight.device, weight.dtype))


def stages(state: dict[str, torch.Tensor]) -> int:
    """A file's up/downsampling stages: its convs without bias (one after each Upsample, or stride 2)."""
    return sum(k.endswith(".weight") and k.removesuffix("weight") + "bias" not in state for k in state)


def channels(state: dict[str, torch.Tensor], key: str, axis: int) -> int:
    """The latent channels of a file: its tensor `key`'s size along `axis` (SD's 4 when the tensor is missing, which
    load_state_strict then names)."""
    return state[key].shape[axis] if key in state else 4


def with_weights(net: nn.Sequential, state: dict[str, torch.Tensor], source: str) -> nn.Sequential:
    load_state_strict(net, state, source)
    return net.eval()


def decoder_of(state: dict[str, torch.Tensor], source: str) -> nn.Sequential:
    return with_weights(tiny_decoder(channels(state, "1.weight", 1), stages(state)), state, source)


def encoder_of(state: dict[str, torch.Tensor], source: str) -> nn.Sequential:
    n = stages(state)  # the last conv, 64 -> latent channels, is at index 2 + 4n
    return with_weights(tiny_encoder(channels(state, f"{2 + 4 * n}.weight", 0), n), state, source)


def partner(path: Path) -> Path | None:
    """The encoder file beside a madebyollin decoder file (taesd_decoder.pth -> taesd_encoder.pth, either suffix)."""
    stem = path.stem.replace("decoder", "encoder")
    return next((p for p in (path.with_name(stem + s) for s in SUFFIXES) if stem != path.stem and p.is_file()), None)


def taesd_name(path: str | Path) -> str:
    """What the PNG facts call a TAESD (AUTOMATIC1111's VAE field names its file): a folder's name, a decoder file's
    stem without `_decoder` (taesd_decoder.pth: "taesd")."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem.removesuffix("_decoder")


def load_taesd(path: str | Path) -> TAESD:
    """A TAESD from madebyollin's decoder file (its encoder file beside it, when there is one) or a diffusers
    AutoencoderTiny folder; CheckpointError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        files = [path / f"diffusion_pytorch_model{s}" for s in (".safetensors", ".bin")]
        weights = next((f for f in files if f.is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"{path}: no diffusion_pytorch_model.safetensors (a diffusers AutoencoderTiny folder)"
            )
        state, _ = read_state_dict(weights)
        stray = next((k for k in state if not k.startswith(("decoder.layers.", "encoder.layers."))), None)
        if stray is not None:
            raise CheckpointError(f"{weights}: '{stray}' is not a tensor of diffusers' AutoencoderTiny")
        decoder = {  # diffusers' decoder has no clamp layer: its index i is madebyollin's i + 1
            f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in state.items() if k.startswith("decoder.")
        }
        encoder = {k.removeprefix("encoder.layers."): v for k, v in state.items() if k.startswith("encoder.")}
        return TAESD(decoder_of(decoder, str(weights)), encoder_of(encoder, str(weights)), taesd_name(path))
    state, _ = read_state_dict(path)
    if "0.weight" in state:
        raise CheckpointError(f"{path} is a TAESD encoder: --taesd takes the decoder file (its encoder beside it)")
    encoder = partner(path)
    return TAESD(
        decoder_of(state, str(path)),
        None if encoder is None else encoder_of(read_state_dict(encoder)[0], str(encoder)),
        taesd_name(path),
    )
