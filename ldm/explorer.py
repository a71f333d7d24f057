"""The diffusion explorer's pictures (python -m ldm.webui shows them): the forward process q(x_t | x_0) on an image,
in latent and in pixel space, and the reverse process of a generation, step by step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.diffusion import Diffusion
from ldm.images import load_image, to_pil
from ldm.modes import encode_images, image_tensor
from ldm.pipeline import Pipeline
from ldm.request import InputError


def latent_view(z: torch.Tensor, size: int) -> torch.Tensor:
    """Latents (B, C, h, w) as pictures (B, 3, size, size) in [0, 1]: their first three channels, min-max scaled
    together, enlarged without smoothing."""
    rgb = z[:, :3].float().cpu()
    rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min()).clamp(min=1e-8)
    return F.interpolate(rgb, size=(size, size), mode="nearest")


def grid(rows: list[torch.Tensor]) -> Image.Image:
    """Rows of pictures (B, 3, H, W) in [0, 1] as one image, B pictures a row."""
    return to_pil(torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)[None])[0]


def size(pipe: Pipeline) -> int:
    return pipe.cfg.image_size * pipe.vae_factor


@torch.inference_mode()
def forward_process(pipe: Pipeline, path: str | None, timesteps: str, seed: int) -> Image.Image:
    """q(x_t | x_0) at the chosen t, a column each, with one noise draw for every t (Ho et al. eq. 4:
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps). Rows: the latent z_t of the image's z_0 = E(x_0) (first three
    channels), its decoding D(z_t), and the same forward process run on the pixels x_0 themselves."""
    if not path:
        raise InputError("upload an image to noise")
    try:
        t = torch.tensor([int(word) for word in timesteps.replace(",", " ").split()])
    except ValueError:
        raise InputError(f"timesteps must be whole numbers, got '{timesteps}'") from None
    if not len(t) or t.min() < 0 or t.max() >= pipe.cfg.timesteps:
        raise InputError(f"timesteps must be from 0 to {pipe.cfg.timesteps - 1}, got '{timesteps}'")
    x0 = 2 * image_tensor(load_image(path), size(pipe), size(pipe), pipe.vae_factor, "image") - 1
    g = torch.Generator().manual_seed(int(seed))
    z0 = encode_images(pipe.model, x0, [g])
    diffusion, n = Diffusion(pipe.cfg), len(t)
    z_t = diffusion.q_sample(
        z0.expand(n, -1, -1, -1), t, torch.randn(z0.shape, generator=g).to(z0).expand(n, -1, -1, -1)
    )
    x_t = diffusion.q_sample(x0.expand(n, -1, -1, -1), t, torch.randn(x0.shape, generator=g).expand(n, -1, -1, -1))
    return grid([latent_view(z_t, size(pipe)), pipe.decode(z_t), (x_t / 2 + 0.5).clamp(0, 1)])


def reverse_process(pipe: Pipeline, prompt: str, seed: int, steps: int, sampler: str) -> tuple[list, Image.Image]:
    """A generation's latents z_T ... z_0 (the UNet's inputs, then the result) and an overview: eight of them, a
    column each, as latents (first three channels) and decoded."""
    trajectory = []
    pipe.txt2img(prompt, seed=int(seed), steps=int(steps), sampler=sampler, trajectory=trajectory, progress=False)
    picks = torch.linspace(0, len(trajectory) - 1, min(8, len(trajectory))).round().long().tolist()
    z = torch.cat([trajectory[k] for k in picks])
    with torch.inference_mode():
        return trajectory, grid([latent_view(z, size(pipe)), pipe.decode(z)])


@torch.inference_mode()
def step_view(pipe: Pipeline, trajectory: list, k: int) -> Image.Image | None:
    """Step k of a trajectory: the latent z_t and its decoding D(z_t), side by side."""
    if not trajectory:
        return None
    z = trajectory[int(k)]
    return grid([torch.cat([latent_view(z, size(pipe)), pipe.decode(z)])])
