"""ControlNet for SD v1 (Zhang et al. 2023): a trainable copy of the UNet's encoder that reads a control map (edges,
depth, pose...) and adds its outputs to the UNet's skip connections and middle block, through zero-initialised convs.

Attribute names are those of lllyasviel's `cldm.ControlNet`, so a `control_model.*` file loads with strict=True:
time_embed, input_blocks, middle_block (the UNet's own blocks, built by ldm.unet.UNetEncoder from the base model's
UNet config), zero_convs.{i}.0 (a 1x1 conv per input block), input_hint_block.{0,2,...} (the control map, from pixels
down to the latent grid: 3x3 convs with SiLU between them, one stride-2 conv per halving), middle_block_out.0.

    residuals = ControlNet(x_t, hint, t, context)        one per input block, then the middle block's
    UNet: skip_k += scale * residual_k,  middle += scale * residual_mid       (diffusers' conditioning_scale)

Sampling follows diffusers' StableDiffusionControlNetPipeline: the control map in [0, 1] at the output size, a
ControlNet applied at step i of N only while start <= i / N and (i + 1) / N <= end, and guess mode running the
ControlNets on the conditional half of the batch alone with their residuals scaled by logspace(-1, 0, n) (0.1 .. 1,
shallow to deep), the unconditional half getting none.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from ldm.config import ModelConfig
from ldm.diffusers_names import SCHEDULE_KEYS, TEXT, UNET, VAE, rename, unet_key_map
from ldm.errors import CheckpointError
from ldm.images import canny, resized
from ldm.io import atomic_save, load_state_strict, read_state_dict
from ldm.request import Control
from ldm.unet import UNetEncoder

PREFIX = "control_model."
HINT_CHANNELS = (16, 32, 96, 256)  # input_hint_block's widths: after its first conv and after each halving


class ControlNet(UNetEncoder):
    """A ControlNet for the UNet of `cfg` (SD v1: 320 wide, a 3-channel control map downscaled 8x)."""

    def __init__(self, cfg: ModelConfig, hint_channels: int = 3):
        super().__init__(cfg.unet, cfg.vae.embed_dim)
        halvings = int(math.log2(cfg.vae.factor))
        widths = HINT_CHANNELS[: halvings + 1]
        if len(widths) != halvings + 1:
            raise CheckpointError(
                f"a ControlNet's hint block downscales at most 8x; this VAE's factor is {cfg.vae.factor}"
            )
        layers = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
        self.input_hint_block = nn.Sequential(*layers, nn.Conv2d(widths[-1], cfg.unet.model_channels, 3, padding=1))
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in self.skip_channels)
        self.middle_block_out = nn.Sequential(nn.Conv2d(self.skip_channels[-1], self.skip_channels[-1], 1))

    @classmethod
    def from_unet(cls, unet: nn.Module, cfg: ModelConfig) -> ControlNet:
        """The ControlNet paper's start for training: the encoder and middle block copied from the UNet (their names
        are shared: UNetEncoder), zero convs and middle_block_out zero, so the residuals are zero and the UNet's
        output is unchanged at first; the hint block random."""
        net = cls(cfg)
        encoder = net.state_dict().keys()
        net.load_state_dict({k: v for k, v in unet.state_dict().items() if k in encoder}, strict=False)
        for conv in [*(z[0] for z in net.zero_convs), net.middle_block_out[0]]:
            nn.init.zeros_(conv.weight), nn.init.zeros_(conv.bias)
        return net

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps, context: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 4, h, w) latents as the UNet sees them, hint: (B, 3, H, W) control map in [0, 1] at the image's
        size, context: (B, 77, d). The residuals: one per input block, then the middle block's."""
        emb = self.time_embedding(timesteps, x)
        outs, h = [], x
        for k, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if k == 0:  # the control map enters after the first conv: (B, model_channels, h, w)
                h = h + self.input_hint_block(hint)
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        return outs + [self.middle_block_out(h)]


def controlnet_key_map(net: ControlNet) -> dict[str, str]:
    """Module-path prefixes, ControlNet -> diffusers ControlNetModel: the UNet's encoder names (unet_key_map), the
    zero convs, and the hint block's convs (conv_in, blocks.0..., conv_out)."""
    convs = [i for i, layer in enumerate(net.input_hint_block) if isinstance(layer, nn.Conv2d)]
    m = unet_key_map(net.cfg) | {"middle_block_out.0": "controlnet_mid_block"}
    m |= {f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(len(net.zero_convs))}
    m |= {f"input_hint_block.{convs[0]}": "controlnet_cond_embedding.conv_in"}
    m |= {f"input_hint_block.{c}": f"controlnet_cond_embedding.blocks.{k}" for k, c in enumerate(convs[1:-1])}
    return m | {f"input_hint_block.{convs[-1]}": "controlnet_cond_embedding.conv_out"}


def read_controlnet_state(path: Path, net: ControlNet) -> dict[str, torch.Tensor]:
    """The ControlNet tensors of a file or diffusers folder, under our names (no prefix)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not (path / "config.json").is_file() or not files:
            raise CheckpointError(f"{path} is a folder but not a diffusers ControlNetModel (config.json and weights)")
        config = json.loads((path / "config.json").read_text())
        if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{path} holds a {config['_class_name']}, not a ControlNetModel")
        state = {}
        for f in files:
            state |= read_state_dict(f)[0]
        return rename(state, {b: a for a, b in controlnet_key_map(net).items()})
    state, _ = read_state_dict(path)
    if not any(k.startswith(PREFIX) for k in state):
        return state
    # a whole ControlNet training model (lllyasviel's v1.0 files): the SD weights beside it are not the ControlNet's
    sd = [k for k in state if not k.startswith(PREFIX) and not k.startswith((UNET, VAE, TEXT, "model_ema."))]
    extra = [k for k in sd if k not in SCHEDULE_KEYS]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor '{extra[0]}' beside the {PREFIX}* ones ({len(extra)} in all)")
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


def load_controlnet(path: str | Path, cfg: ModelConfig) -> ControlNet:
    """A ControlNet for the base model of `cfg`: lllyasviel's .pth (read with weights_only) or .safetensors, with or
    without the `control_model.` prefix, fp16 or fp32, or a diffusers ControlNetModel folder; loaded strictly, so a
    ControlNet for another base model fails naming a tensor."""
    path = Path(path)
    net = ControlNet(cfg)
    state = read_controlnet_state(path, net)
    load_state_strict(net, state, f"ControlNet {path}")
    return net.eval()


def save_controlnet(net: ControlNet, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """lllyasviel's layout (`control_model.*`) as safetensors: diffusers' ControlNetModel.from_single_file reads it."""
    state = {PREFIX + k: v if dtype is None else v.to(dtype) for k, v in net.state_dict().items()}
    atomic_save(state, path, {"format": "pt"})


def control_map(control: Control, height: int, width: int) -> Image.Image:
    """The map a ControlNet sees: its control image resized to the output size (Lanczos, as diffusers; with a warning
    when the size changes), then preprocessed."""
    image = resized(control.image.convert("RGB"), width, height, "control image", "the output size")
    return canny(image) if control.preprocess == "canny" else image


def control_residuals(
    controls: list[Control],
    hints: list[torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    i: int,
    steps: int,
    context: torch.Tensor,
    guess_mode: bool,
) -> list[torch.Tensor] | None:
    """The summed, scaled residuals of the ControlNets acting at step i of `steps` for the UNet's batch (x, twice
    when the context holds the unconditional half too); None when none acts. hints: (1, 3, H, W) in [0, 1]."""
    guided = len(context) == 2 * len(x)
    total = None
    for control, hint in zip(controls, hints):
        if i / steps < control.start or (i + 1) / steps > control.end:
            continue
        if guess_mode and guided:  # the conditional half only
            inputs, cond = x, context[len(x) :]
        else:
            inputs, cond = (torch.cat([x, x]) if guided else x), context
        out = control.net(inputs, hint.expand(len(inputs), -1, -1, -1), t, cond)
        if guess_mode:
            scales = torch.logspace(-1, 0, len(out), device=x.device) * control.scale
            out = [r * s for r, s in zip(out, scales)]
        else:
            out = [r * control.scale for r in out]
        total = out if total is None else [a + b for a, b in zip(total, out)]
    if total is not None and guess_mode and guided:
        total = [torch.cat([torch.zeros_like(r), r]) for r in total]
    return total
