"""txt2img, img2img and inpainting on the three models of a checkpoint, returning PIL images.

The loop every SD v1 sampler shares (Ho et al. 2020; Song et al. 2021), the update being diffusers' scheduler's:

    z_T = sigma_T * noise                        txt2img (img2img: z_t ~ q(z_t | z_0 = E(image)) at the strength's t)
    for t in timesteps:
        e_u, e_c = UNet([z_t, z_t], t, [c_neg, c])     cond and uncond in one batched call
        e = e_u + s * (e_c - e_u)                       classifier-free guidance (Ho & Salimans 2022, eq. 6)
        z_t = scheduler.step(e, t, z_t)
    image = D(z_0 / scale_factor)

Image i of a call has its own CPU generator seeded seed + i, and everything random about it is drawn from that
generator in diffusers' order (image posterior sample, initial noise, masked-image posterior sample, step noise):
image k of a batch can be made alone, and the same weights, seed and sampler give diffusers' image.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ldm.embeddings import add_embedding_
from ldm.lora import merge_lora_, unmerge_loras_
from ldm.model import StableDiffusion
from ldm.samplers import SAMPLERS, ZERO_SNR_SAMPLERS, Sampler

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the --dtype choices of txt2img.py and ldm.eval
QUANTIZE = ("int8",)
EMBEDDING_CACHE = 32  # prompts whose text-encoder states a Pipeline keeps


class InputError(ValueError):
    """Bad generation input (image, mask, size, strength, sampler...); the message says which and why."""


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """An image file as a PIL image in `mode`, EXIF rotation applied; InputError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert(mode)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image file") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (1, C, H, W) float32 in [0, 1]."""
    array = np.array(image, dtype=np.float32) / 255
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding to 8 bits as diffusers does."""
    array = (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def quantize_int8_(unet: nn.Module) -> None:
    """PyTorch's dynamic int8 quantization of the UNet's Linear layers, in place (CPU, fp32, inference only): int8
    weights with one scale per tensor, activations quantized at each call from their own range. Conv2d stays fp32:
    torch.ao's dynamic conv is off by ~50% on the post-SiLU (non-negative) inputs of the ResBlock convs
    (pytorch/pytorch#70480; left out of its default mapping for that reason)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that eager-mode quantization moves to torchao
        quantize_dynamic(unet, {nn.Linear}, dtype=torch.qint8, inplace=True)


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Offsets of tiles of `tile` that cover [0, size), `stride` apart, the last one flush with the end."""
    return sorted(set(range(0, max(size - tile, 0), stride)) | {max(size - tile, 0)})


def ramp(size: int, width: int) -> torch.Tensor:
    """Blending weight along one tile side: rises linearly over `width` pixels from each edge, 1 inside."""
    i = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.minimum(i, size - i).div(width).clamp(max=1)


class Pipeline(nn.Module):
    """txt2img / img2img / inpaint for a StableDiffusion model (`.unet .vae .text_encoder .tokenizer .cfg` are its).

    Memory: VAE decoding runs one image at a time, and in overlapping tiles of `vae_tile` latents a side,
    blended over `vae_tile_overlap` latents, when a latent side is larger than `vae_tile`; attention is
    torch's SDPA (ldm.attention), which never materialises the full attention matrix where it has a kernel.

    Speed: quantize="int8" turns the model's UNet into a dynamic-int8 one (in place; CPU, fp32, inference only;
    activation ranges are taken per call, so image k of a batch then depends slightly on the rest of the batch);
    compile=True runs the UNet's forward through torch.compile (the first call compiles). The text encoder is
    frozen, so the embeddings of the last EMBEDDING_CACHE prompts are kept (`pipe.embeddings.clear()` after
    loading other text-encoder weights into the model).
    """

    def __init__(self, model: StableDiffusion, vae_tile: int = 64, vae_tile_overlap: int = 16, quantize: str | None = None, compile: bool = False):
        super().__init__()
        self.model = model
        self.vae_tile, self.vae_tile_overlap = vae_tile, vae_tile_overlap
        self.embeddings: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.loras: list[dict] = []  # the LoRA files merged into the weights: file, weight
        self.lora_originals: dict[str, torch.Tensor] = {}  # the weights they changed, as they were
        self.textual_inversions: list[dict] = []  # the embedding files loaded: file, tokens
        if quantize is not None:
            if quantize not in QUANTIZE:
                raise InputError(f"unknown quantization '{quantize}' (known: {', '.join(QUANTIZE)})")
            if self.device.type != "cpu" or self.dtype != torch.float32:
                raise InputError(f"quantize={quantize} is PyTorch's dynamic quantization: CPU and fp32 only, not {self.device.type} {self.dtype}")
            quantize_int8_(self.unet)
        if compile:
            self.unet.forward = torch.compile(self.unet.forward)  # on the forward, so the module, its hooks and names stay

    unet = property(lambda self: self.model.unet)
    vae = property(lambda self: self.model.vae)
    text_encoder = property(lambda self: self.model.text_encoder)
    tokenizer = property(lambda self: self.model.tokenizer)
    cfg = property(lambda self: self.model.cfg)
    device = property(lambda self: next(self.model.parameters()).device)
    dtype = property(lambda self: next(self.model.parameters()).dtype)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent, along a side (8 for SD v1): image sides must be multiples of it."""
        return 2 ** (len(self.cfg.vae.ch_mult) - 1)

    @property
    def is_inpainting_model(self) -> bool:
        """A 9-channel UNet (SD 1.5-inpainting): noisy latent + mask + masked-image latent."""
        return self.cfg.unet.in_channels == 2 * self.cfg.vae.embed_dim + 1

    def txt2img(self, prompts: str | list[str], **options) -> list[Image.Image]:
        """Images from text; options as in `generate`."""
        return self.generate(prompts, **options)

    def img2img(self, prompts: str | list[str], init_image: Image.Image, strength: float = 0.75, **options) -> list[Image.Image]:
        """`init_image` noised to the strength's timestep, then denoised towards the prompt; options as in `generate`."""
        return self.generate(prompts, init_image=init_image, strength=strength, **options)

    def inpaint(
        self, prompts: str | list[str], init_image: Image.Image, mask: Image.Image, strength: float = 1.0, **options
    ) -> list[Image.Image]:
        """Repaint where `mask` is white (grey: partly); options as in `generate`."""
        return self.generate(prompts, init_image=init_image, mask=mask, strength=strength, **options)

    @torch.inference_mode()
    def generate(
        self,
        prompts: str | list[str],
        *,
        init_image: Image.Image | None = None,
        mask: Image.Image | None = None,
        strength: float = 1.0,
        negative_prompt: str = "",
        steps: int = 50,
        scale: float = 7.5,
        sampler: str = "ddim",
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        n_samples: int = 1,
        guidance_rescale: float = 0.0,
        progress: bool = True,
        trajectory: list[torch.Tensor] | None = None,
    ) -> list[Image.Image]:
        """n_samples images per prompt (prompt-major order); image i uses a CPU generator seeded seed + i.

        init_image: img2img, or inpainting with `mask` (white = repaint, grey = partly; the size of init_image).
        strength in (0, 1]: the fraction of the steps run from init_image (1: start from pure noise).
        scale: classifier-free guidance scale (1: no guidance, the negative prompt is then unused).
        guidance_rescale: phi of Lin et al. 2024 (0: off). eta: DDIM's stochasticity (ddim only).
        height, width: default the model's image_size (img2img: the init image's size, rounded down to vae_factor).
        trajectory: a list that receives z_t (the UNet's input latents) of every step, then z_0.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.check_options(prompts, sampler, steps, strength, eta, n_samples, guidance_rescale, init_image, mask)
        pixels, mask_px, height, width = self.prepare_images(init_image, mask, height, width)
        n = len(prompts) * n_samples
        generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        guided = scale != 1
        context = self.encode_prompts(prompts, n_samples, negative_prompt, guided)
        run = Sampler(sampler, self.cfg, steps, strength, eta, self.device)
        latent_shape = (self.cfg.vae.embed_dim, height // self.vae_factor, width // self.vae_factor)

        # the random draws of image i, in diffusers' order: the image's posterior sample, then the initial noise
        nine = self.is_inpainting_model
        image_latents = None
        if pixels is not None and (mask is None or strength < 1 or not nine):
            image_latents = self.encode_images(2 * pixels - 1, generators)
        noise = torch.cat([torch.randn((1, *latent_shape), generator=g, dtype=self.dtype) for g in generators]).to(self.device)
        if image_latents is None or (mask is not None and strength == 1):
            latents = noise * run.init_noise_sigma
        else:  # z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) noise at the first timestep run (DDPM eq. 4)
            latents = run.add_noise(image_latents, noise, run.timesteps[0])
        extra_input = None  # the 9-channel UNet's mask and masked-image latent
        if mask is not None:
            mask_latent = F.interpolate(mask_px, size=latent_shape[1:]).to(self.device, self.dtype).expand(n, -1, -1, -1)
            if nine:
                masked = self.encode_images((2 * pixels - 1) * (1 - mask_px), generators)
                extra_input = torch.cat([mask_latent, masked], dim=1)

        desc = f"seed {seed}" if n == 1 else f"seeds {seed}-{seed + n - 1}"
        for i, t in enumerate(tqdm(run.timesteps, desc=desc, disable=not progress)):
            x = run.scale_input(latents, t)
            if trajectory is not None:
                trajectory.append(x)
            if extra_input is not None:
                x = torch.cat([x, extra_input], dim=1)
            latents = run.step(self.predict(x, t, context, scale, guidance_rescale), t, latents, generators)
            if mask is not None and not nine:
                # latent blending: z_{t-1} = (1 - m) q(z_{t-1} | z_0 of the init image) + m z_{t-1}, with the same noise
                known = image_latents if i == len(run.timesteps) - 1 else run.add_noise(image_latents, noise, run.timesteps[i + 1])
                latents = (1 - mask_latent) * known + mask_latent * latents
        if trajectory is not None:
            trajectory.append(latents)
        images = self.decode(latents)
        if mask is not None:  # composite in pixel space: unmasked pixels stay exactly the init image's
            images = mask_px * images + (1 - mask_px) * pixels
        return to_pil(images)

    def check_options(self, prompts, sampler, steps, strength, eta, n_samples, guidance_rescale, init_image, mask) -> None:
        if not prompts or n_samples < 1:
            raise InputError("nothing to generate: give at least one prompt and n_samples >= 1")
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler '{sampler}' (known: {', '.join(SAMPLERS)})")
        if self.cfg.rescale_betas_zero_snr and sampler not in ZERO_SNR_SAMPLERS:
            raise InputError(f"sampler '{sampler}' cannot follow this model's zero-terminal-SNR schedule (use {', '.join(ZERO_SNR_SAMPLERS)})")
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if not 0 < strength <= 1:
            raise InputError(f"strength must be in (0, 1], got {strength}")
        if int(steps * strength) < 1:
            raise InputError(f"strength {strength} with {steps} steps leaves no denoising step (raise strength or steps)")
        if eta and sampler != "ddim" or eta < 0:
            raise InputError(f"eta applies to the ddim sampler only and must be >= 0, got {eta} with {sampler}")
        if not 0 <= guidance_rescale <= 1:
            raise InputError(f"guidance rescale must be in [0, 1], got {guidance_rescale}")
        if mask is not None and init_image is None:
            raise InputError("a mask needs an init image to inpaint")
        if self.is_inpainting_model and mask is None:
            raise InputError("this is an inpainting model (9-channel UNet): give an init image and a mask")

    def prepare_images(self, init_image, mask, height, width) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
        """The init image (1, 3, H, W) and mask (1, 1, H, W) in [0, 1], resized to (width, height) when given,
        else down to multiples of vae_factor (with a warning saying so); and the output size."""
        m = self.vae_factor
        if init_image is None:
            height, width = height or self.cfg.image_size * self.vae_factor, width or self.cfg.image_size * self.vae_factor
        else:
            if mask is not None and mask.size != init_image.size:
                raise InputError(f"the mask is {mask.width}x{mask.height} but the image is {init_image.width}x{init_image.height}")
            width, height = width or init_image.width - init_image.width % m, height or init_image.height - init_image.height % m
        if height <= 0 or width <= 0 or height % m or width % m:
            raise InputError(f"height and width must be positive multiples of {m} for this model, got {width}x{height}")
        if init_image is None:
            return None, None, height, width
        if init_image.size != (width, height):
            warnings.warn(f"init image resized from {init_image.width}x{init_image.height} to {width}x{height} (sides are multiples of {m})")
        pixels = to_tensor(init_image.convert("RGB").resize((width, height), Image.LANCZOS))
        mask_px = None if mask is None else to_tensor(mask.convert("L").resize((width, height), Image.LANCZOS))
        return pixels, mask_px, height, width

    def encode_prompts(self, prompts: list[str], n_samples: int, negative_prompt: str, guided: bool) -> torch.Tensor:
        """Text context for the UNet: (n, 77, d), with the negative prompt's stacked in front when guided."""
        cond = self.embed(prompts).repeat_interleave(n_samples, dim=0)
        if not guided:
            return cond
        return torch.cat([self.embed([negative_prompt]).expand_as(cond), cond])

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's (len(prompts), 77, d) states, the prompts not in the cache encoded as one batch."""
        keys = [(p, self.device, self.dtype) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.embeddings))
        if missing:
            self.embeddings.update(zip(missing, self.text_encoder.encode([k[0] for k in missing])))
        for k in keys:
            self.embeddings.move_to_end(k)
        states = torch.stack([self.embeddings[k] for k in keys])
        while len(self.embeddings) > EMBEDDING_CACHE:
            self.embeddings.popitem(last=False)
        return states

    def encode_images(self, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """z_0 = scale_factor * a posterior sample of E(x), one per generator; x (1, 3, H, W) in [-1, 1]."""
        posterior = self.vae.encode(x.to(self.device, self.dtype))
        return torch.cat([posterior.sample(g) for g in generators]) * self.cfg.scale_factor

    def predict(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
        """The guided UNet prediction; cond and uncond go through the UNet as one batch."""
        if len(context) == len(x):
            return self.unet(x, t, context)
        e_uncond, e_cond = self.unet(torch.cat([x, x]), t, context).chunk(2)
        variance = None
        if self.cfg.learn_sigma:  # guide the prediction; the variance is the conditional branch's (as DiT samples)
            (e_uncond, _), (e_cond, variance) = e_uncond.chunk(2, dim=1), e_cond.chunk(2, dim=1)
        e = e_uncond + scale * (e_cond - e_uncond)
        if rescale:
            # guidance rescale (Lin et al. 2024, eq. 15-16): e_r = e * std(e_cond) / std(e); e = phi e_r + (1 - phi) e
            e_rescaled = e * (e_cond.std(dim=(1, 2, 3), keepdim=True) / e.std(dim=(1, 2, 3), keepdim=True))
            e = rescale * e_rescaled + (1 - rescale) * e
        return e if variance is None else torch.cat([e, variance], dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> CPU images (B, 3, H, W) in [0, 1], decoded one at a time, in tiles beyond vae_tile latents a side.

        An image whose half-precision decode (fp16 / bf16 weights, or autocast) overflows to inf / NaN, as SD's VAE
        does in fp16 (the black images), is decoded again with the VAE in fp32, saying so once."""
        z = latents / self.cfg.scale_factor
        decode = self.decode_tiled if max(z.shape[-2:]) > self.vae_tile else self.vae.decode
        images = [decode(z[i : i + 1]) for i in range(len(z))]
        dtype = next(self.vae.parameters()).dtype
        half = dtype != torch.float32 or torch.is_autocast_enabled(z.device.type)
        overflowed = [i for i, image in enumerate(images) if half and not image.isfinite().all()]
        if overflowed:
            warnings.warn("the VAE's half-precision decode overflowed (inf / NaN: a black image); decoding again in float32")
            self.vae.float()
            try:
                with torch.autocast(z.device.type, enabled=False):
                    for i in overflowed:
                        images[i] = decode(z[i : i + 1].float())
            finally:
                self.vae.to(dtype)
        return (torch.cat([image.float() for image in images]).cpu() / 2 + 0.5).clamp(0, 1)

    def decode_tiled(self, z: torch.Tensor) -> torch.Tensor:
        """Decode (1, C, h, w) in vae_tile-sized tiles overlapping by vae_tile_overlap, as the weighted mean of
        the tiles covering each pixel (weights ramp up linearly over the overlap, so seams fade out). GroupNorm
        statistics and the mid-block attention become per tile: close to the plain decode, not equal."""
        f, tile = self.vae_factor, self.vae_tile
        stride = tile - self.vae_tile_overlap
        h, w = z.shape[-2:]
        out = torch.zeros(1, self.cfg.vae.out_ch, h * f, w * f)
        weight = torch.zeros(1, 1, h * f, w * f)
        for y in tile_starts(h, tile, stride):
            for x in tile_starts(w, tile, stride):
                piece = self.vae.decode(z[..., y : y + tile, x : x + tile]).float().cpu()
                ph, pw = piece.shape[-2:]
                wgt = ramp(ph, self.vae_tile_overlap * f)[:, None] * ramp(pw, self.vae_tile_overlap * f)[None, :]
                out[..., y * f : y * f + ph, x * f : x * f + pw] += piece * wgt
                weight[..., y * f : y * f + ph, x * f : x * f + pw] += wgt
        return (out / weight).to(z.device)

    def trajectory_strips(self, trajectory: list[torch.Tensor], frames: int = 8) -> list[Image.Image]:
        """One strip per image: z_t decoded at `frames` evenly spaced steps, from noise (left) to the result."""
        picks = sorted(set(np.linspace(0, len(trajectory) - 1, frames).round().astype(int).tolist()))
        decoded = [self.decode(trajectory[k]) for k in picks]
        return to_pil(torch.cat(decoded, dim=-1))

    def load_lora(self, path: str | Path, weight: float = 1.0) -> None:
        """Merge a LoRA file into the weights (ldm.lora: kohya / AUTOMATIC1111 with diffusers or CompVis names,
        diffusers / PEFT): W += weight * alpha / rank * up @ down. LoRAs stack; a bad file changes nothing."""
        merge_lora_(self.model, path, weight, self.lora_originals)
        self.loras.append({"file": str(path), "weight": weight})
        self.embeddings.clear()  # the text encoder's weights may have changed

    def unload_loras(self) -> None:
        """The weights as they were before the first load_lora, bit for bit."""
        unmerge_loras_(self.model, self.lora_originals)
        self.loras.clear()
        self.embeddings.clear()

    def load_embedding(self, path: str | Path, token: str | None = None) -> list[str]:
        """A textual-inversion embedding (ldm.embeddings) as new words of the text encoder; returns its tokens (the
        trigger word: `token`, else the file's, else its stem). The text model's vocabulary grows by its vectors."""
        tokens = add_embedding_(self.text_encoder, path, token)
        self.textual_inversions.append({"file": str(path), "tokens": tokens})
        self.embeddings.clear()
        return tokens
