"""The modes of the sampling loop (ldm.pipeline): how the start latents are made, what the UNet sees, what happens
after each step and to the decoded images. txt2img, img2img, inpainting with a 9-channel UNet (Inpaint) or a plain
one (BlendedInpaint); outpainting is inpainting on a bigger canvas (ldm.images.outpaint_canvas).

Everything random about image i is drawn from its own CPU generator in diffusers' order (image posterior sample,
initial noise, masked-image posterior sample, step noise), so image k of a batch can be made alone and the same
weights, seed and sampler give diffusers' image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.images import outpaint_canvas, resized, to_tensor
from ldm.model import StableDiffusion
from ldm.request import Request
from ldm.samplers import Sampler
from ldm.taesd import TAESD


def randn(generators: list[torch.Generator], shape: tuple[int, ...], model: StableDiffusion) -> torch.Tensor:
    """One (1, *shape) standard normal draw per generator (CPU generators, as diffusers), on the model's device."""
    weight = next(model.parameters())
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=weight.dtype) for g in generators]).to(weight.device)


def encode_images(
    model: StableDiffusion, x: torch.Tensor, generators: list[torch.Generator], taesd: TAESD | None = None
) -> torch.Tensor:
    """z_0 = scale_factor * a posterior sample of E(x), one per generator; x (1, 3, H, W) in [-1, 1]. With `taesd`:
    its encoder's z_0, the same for every generator (no posterior; none drawn, as diffusers' AutoencoderTiny)."""
    if taesd is not None:
        return taesd.encode((x + 1) / 2).expand(len(generators), -1, -1, -1)
    weight = next(model.parameters())
    posterior = model.vae.encode(x.to(weight.device, weight.dtype))
    return model.get_first_stage_encoding(torch.cat([posterior.sample(g) for g in generators]))


def image_tensor(image: Image.Image, height: int, width: int, factor: int, what: str = "") -> torch.Tensor:
    """An image as (1, C, height, width) in [0, 1], resized (ldm.images.resized) when its size differs; `what`: the
    warning's name of it (none without)."""
    return to_tensor(resized(image, width, height, what, f"sides are multiples of {factor}"))


def mode_images(request: Request, factor: int) -> dict[str, torch.Tensor]:
    """{"pixels": the init image (1, 3, H, W), "mask": the mask (1, 1, H, W)}, in [0, 1] at the output size, of a
    resolved request (outpainting: the canvas and its mask); empty without an init image."""
    image, mask, h, w = request.init_image, request.mask, request.height, request.width
    if image is None:
        return {}
    if request.outpaint is not None:
        image, mask, _ = outpaint_canvas(image, request.outpaint, factor, request.mask_blur)
    images = {"pixels": image_tensor(image.convert("RGB"), h, w, factor, "init image")}
    if mask is not None:
        images["mask"] = image_tensor(mask.convert("L"), h, w, factor)
    return images


class Txt2Img:
    """A mode of the sampling loop for one sub-batch: constructing it makes the images' random draws (in diffusers'
    order) and `start`, z_T (step 1 of the loop in ldm.pipeline); `unet_input` is what the UNet sees for z_t (step 2),
    `after_step` what happens to z_{t-1} (step 6), `finish` what happens to the decoded images (step 7).
    txt2img: z_T = sigma_T * noise, and nothing else."""

    def __init__(self, model: StableDiffusion, run: Sampler, generators: list[torch.Generator], shape: tuple, **images):
        self.start = randn(generators, shape, model) * run.init_noise_sigma

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_step(self, latents: torch.Tensor, i: int) -> torch.Tensor:
        return latents

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        return images


class Img2Img(Txt2Img):
    """The init image's latent noised to the first timestep run: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t)
    noise (DDPM eq. 4), its posterior sample drawn before the noise; or z_0 given as `latents` (the hires fix's
    upscaled latents, as diffusers' img2img takes 4-channel latents for its image), the noise the first draw."""

    def __init__(self, model, run, generators, shape, pixels=None, latents=None, taesd=None, **images):
        z0 = encode_images(model, 2 * pixels - 1, generators, taesd) if latents is None else latents
        self.start = run.add_noise(z0, randn(generators, shape, model), run.timesteps[0])


class BlendedInpaint(Txt2Img):
    """Inpainting with a plain (4-channel) UNet: after each step the unmasked part of z_{t-1} is replaced by the init
    image's latent noised to t-1 with the same noise (latent blending); strength 1 starts from pure noise, less as
    img2img; the unmasked pixels of the decoded image are the init image's, exactly."""

    def __init__(self, model, run, generators, shape, pixels, mask, strength, taesd=None):
        self.run, self.pixels, self.mask = run, pixels, mask
        self.z0 = encode_images(model, 2 * pixels - 1, generators, taesd)
        self.noise = randn(generators, shape, model)
        start = run.add_noise(self.z0, self.noise, run.timesteps[0]) if strength < 1 else None
        self.start = self.noise * run.init_noise_sigma if start is None else start
        self.mask_latent = F.interpolate(mask, size=shape[1:]).to(self.start)

    def after_step(self, latents, i):
        # z_{t-1} = (1 - m) q(z_{t-1} | z_0 of the init image) + m z_{t-1}, with the same noise
        timesteps = self.run.timesteps
        known = self.z0 if i == len(timesteps) - 1 else self.run.add_noise(self.z0, self.noise, timesteps[i + 1])
        return (1 - self.mask_latent) * known + self.mask_latent * latents

    def finish(self, images):
        return self.mask * images + (1 - self.mask) * self.pixels


class Inpaint(BlendedInpaint):
    """Inpainting with a 9-channel UNet (SD 1.5-inpainting): the UNet sees z_t, the mask and the masked image's latent
    (drawn after the noise); strength 1 starts from pure noise, less as img2img; no blending between steps."""

    def __init__(self, model, run, generators, shape, pixels, mask, strength, taesd=None):
        self.pixels, self.mask = pixels, mask
        z0 = encode_images(model, 2 * pixels - 1, generators, taesd) if strength < 1 else None
        noise = randn(generators, shape, model)
        self.start = noise * run.init_noise_sigma if z0 is None else run.add_noise(z0, noise, run.timesteps[0])
        mask_latent = F.interpolate(mask, size=shape[1:]).to(self.start)
        masked = encode_images(model, (2 * pixels - 1) * (1 - mask), generators, taesd)
        self.extra = torch.cat([mask_latent.expand(len(generators), -1, -1, -1), masked], dim=1)

    def unet_input(self, x):
        return torch.cat([x, self.extra], dim=1)

    def after_step(self, latents, i):
        return latents


def mode_of(request: Request, inpainting_model: bool) -> type[Txt2Img]:
    """The mode class of a request: inpainting and outpainting use Inpaint with a 9-channel UNet, else blending."""
    if request.mode in ("inpaint", "outpaint"):
        return Inpaint if inpainting_model else BlendedInpaint
    return Img2Img if request.mode == "img2img" else Txt2Img
