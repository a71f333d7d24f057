"""txt2img, img2img and inpainting on the three models of a checkpoint, returning PIL images.

The loop every SD v1 sampler shares (Ho et al. 2020; Song et al. 2021), the update being diffusers' scheduler's;
the mode (Txt2Img, Img2Img, Inpaint, BlendedInpaint) says what happens at steps 1, 2, 6 and 7:

    1  z_T = mode.start                             txt2img: sigma_T * noise; img2img: z_t ~ q(z_t | z_0 = E(image))
                                                    at the strength's t; inpainting: either, by strength
       for t in timesteps:
    2      x = mode.unet_input(z_t)                 9-channel inpainting: z_t, mask, E(masked image) stacked
    3      e_u, e_c = UNet([x, x], t, [c_neg, c])   cond and uncond in one batched call
    4      e = e_u + s * (e_c - e_u)                classifier-free guidance (Ho & Salimans 2022, eq. 6)
    5      z_t = scheduler.step(e, t, z_t)
    6      z_t = mode.after_step(z_t)               blended inpainting: the unmasked part is the init image's, re-noised
    7  image = mode.finish(D(z_0 / scale_factor))   inpainting: the unmasked pixels pasted back

Image i of a call has its own CPU generator seeded seed + i, and everything random about it is drawn from that
generator in diffusers' order (image posterior sample, initial noise, masked-image posterior sample, step noise):
image k of a batch can be made alone, and the same weights, seed and sampler give diffusers' image. A call runs in
sub-batches whose estimated memory (`estimate_memory`) fits the machine; a request whose single image does not fit
is refused before anything is allocated (`check_request`, which needs only the model's config).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ldm import DEFAULT_MODEL
from ldm.checkpoint import load_model
from ldm.config import ModelConfig
from ldm.controlnet import Control, ControlNet, control_residuals, load_controlnet
from ldm.embeddings import add_embedding_
from ldm.errors import LdmError
from ldm.lora import merge_lora_, unmerge_loras_
from ldm.memory import VAE_TILE, estimate_memory, machine_memory
from ldm.model import StableDiffusion
from ldm.openvino import OpenVINO
from ldm.prompts import SYNTAX_NAMES, prompt_contexts
from ldm.samplers import Sampler, check_sampler
from ldm.unet import DeepCache, skip_branches

# the --dtype choices of txt2img.py and ldm.eval (and "auto": auto_dtype)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPUINFO = Path("/proc/cpuinfo")  # where auto_dtype reads the CPU's feature flags
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
QUANTIZE = ("int8",)
EMBEDDING_CACHE = 32  # prompts whose text-encoder states a Pipeline keeps


class InputError(LdmError):
    """Bad generation input (image, mask, size, strength, sampler...); the message says which and why."""


def auto_dtype(device: str | torch.device) -> tuple[str, str]:
    """--dtype auto: (the DTYPES name to use, why). On a CPU, bf16 where it has AMX or AVX512-BF16 (oneDNN's bf16
    kernels: a whole SD image 2.4-4x faster than fp32 on such a host, PSNR ~54 dB after one step) and fp32 elsewhere
    (bf16 without them is ~5x slower than fp32; BENCHMARKS.md); on CUDA fp16, as diffusers' GPU examples."""
    if torch.device(device).type == "cuda":
        return "fp16", "a CUDA device"
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        lines = []
    flags = {flag for line in lines if line.startswith("flags") for flag in line.partition(":")[2].split()}
    found = [flag for flag in BF16_FLAGS if flag in flags]
    if found:
        return "bf16", f"this CPU has {', '.join(found)}"
    return "fp32", f"this CPU has neither {' nor '.join(BF16_FLAGS)}"


def engine(backend: str, dtype: str, quantize: str | None, device: torch.device, compile: bool = False):
    """The --backend / --dtype / --quantize flags -> load_pipeline's (dtype, quantize, backend_precision). OpenVINO
    runs on the CPU, in fp32 or bf16 or with int8 weights; the torch parts beside it (text encoder) stay fp32."""
    if backend != "openvino":
        return DTYPES[dtype], quantize, "fp32"
    if device.type != "cpu" or dtype == "fp16" or compile:
        raise InputError("--backend openvino runs on the CPU in --dtype fp32 or bf16, without --compile")
    return torch.float32, None, quantize or dtype


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


def output_size(cfg: ModelConfig, init_image: Image.Image | None, height: int | None, width: int | None) -> tuple:
    """(height, width) of the images: as given, else the model's image_size (img2img: the init image's size, rounded
    down to multiples of the VAE factor); InputError unless both are positive multiples of it."""
    f = cfg.vae.factor
    if init_image is None:
        height, width = height or cfg.image_size * f, width or cfg.image_size * f
    else:
        width, height = width or init_image.width // f * f, height or init_image.height // f * f
    if height <= 0 or width <= 0 or height % f or width % f:
        raise InputError(f"height and width must be positive multiples of {f} for this model, got {width}x{height}")
    return height, width


def outpaint_canvas(
    image: Image.Image, padding: tuple[int, int, int, int], factor: int, mask_blur: int = 4
) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """The canvas, mask and padding of outpainting `image` by padding = (left, top, right, bottom) pixels.

    Left and top are rounded up to multiples of the VAE factor, right and bottom up so that the canvas sides are
    multiples too. The new area is pre-filled with the image's border colours carried outwards and blurred over about
    an eighth of the canvas (AUTOMATIC1111's "fill" masked content, applied to the new area only; not mk2's
    spectral noise): a plain start that the sampler repaints. The mask is 0 over the original, so its pixels come
    back exactly, and rises from 0 at its border to 1 at mask_blur pixels from it (the feathered border: the first
    pixels outside are mostly the fill, which is the original's edge, then more and more the generated picture)."""
    if len(padding) != 4 or any(not isinstance(p, int) or p < 0 for p in padding) or not any(padding):
        raise InputError(f"outpainting needs 4 non-negative whole numbers of pixels, not all 0, got {padding}")
    if mask_blur < 0:
        raise InputError(f"mask blur must be >= 0 pixels, got {mask_blur}")
    image = image.convert("RGB")
    left, top = (-(-padding[0] // factor) * factor, -(-padding[1] // factor) * factor)
    width = -(-(left + image.width + padding[2]) // factor) * factor
    height = -(-(top + image.height + padding[3]) // factor) * factor
    right, bottom = width - left - image.width, height - top - image.height
    array = np.asarray(image)
    filled = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    blurred = Image.fromarray(filled).filter(ImageFilter.GaussianBlur(max(width, height) / 8))
    canvas = np.asarray(blurred).copy()
    canvas[top : top + image.height, left : left + image.width] = array
    y, x = np.mgrid[:height, :width] + 0.5
    dx = np.maximum.reduce([left - x, np.zeros_like(x), x - left - image.width])
    dy = np.maximum.reduce([top - y, np.zeros_like(y), y - top - image.height])
    distance = np.hypot(dx, dy)  # from the original's rectangle, in pixels (0 inside it, >= 0.5 outside)
    mask = np.clip(distance / mask_blur, 0, 1) if mask_blur else (distance > 0).astype(np.float64)
    mask_image = Image.fromarray((mask * 255).round().astype(np.uint8))
    return Image.fromarray(canvas), mask_image, (left, top, right, bottom)


def check_request(
    cfg: ModelConfig,
    prompts: list[str],
    *,
    n_samples: int = 1,
    steps: int = 50,
    sampler: str = "ddim",
    strength: float = 1.0,
    eta: float = 0.0,
    guidance_rescale: float = 0.0,
    scale: float = 7.5,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    deepcache: int | None = None,
    deepcache_branch: int = 0,
) -> tuple[int, int]:
    """Every check of a generation request that needs only the model's config, not its weights (a CLI runs them
    before loading the model; `Pipeline.generate` runs them too): InputError naming the problem, else the size of
    the images (height, width). One image must fit in the memory available (estimate_memory) beside the 8-bit
    results; more run in sub-batches."""
    if not prompts or n_samples < 1:
        raise InputError("nothing to generate: give at least one prompt and n_samples >= 1")
    check_sampler(sampler, cfg, InputError)
    if steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    if steps > cfg.timesteps:
        limit = f"this model has {cfg.timesteps} diffusion timesteps, so at most that many steps"
        raise InputError(f"steps {steps}: {limit}")
    if not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    if int(steps * strength) < 1:
        raise InputError(f"strength {strength} with {steps} steps leaves no denoising step (raise strength or steps)")
    if eta and sampler != "ddim" or eta < 0:
        raise InputError(f"eta applies to the ddim sampler only and must be >= 0, got {eta} with {sampler}")
    if not 0 <= guidance_rescale <= 1:
        raise InputError(f"guidance rescale must be in [0, 1], got {guidance_rescale}")
    if deepcache is not None and deepcache < 1:
        raise InputError(f"deepcache (a full UNet call every N calls) must be at least 1, got {deepcache}")
    if not 0 <= deepcache_branch < skip_branches(cfg.unet):
        last = skip_branches(cfg.unet) - 1
        raise InputError(f"deepcache branch must be from 0 to {last} (this UNet's skips), got {deepcache_branch}")
    if mask is not None and init_image is None:
        raise InputError("a mask needs an init image to inpaint")
    if mask is not None and mask.size != init_image.size:
        image = init_image
        raise InputError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")
    if cfg.unet.in_channels == 2 * cfg.vae.embed_dim + 1 and mask is None:
        raise InputError("this is an inpainting model (9-channel UNet): give an init image and a mask")
    height, width = output_size(cfg, init_image, height, width)
    device = torch.device(device)
    need = estimate_memory(cfg, 1, height, width, scale != 1, dtype.itemsize, fused_attention=device.type == "cpu")
    need += (len(prompts) * n_samples - 1) * 3 * height * width  # the other images, as 8-bit RGB
    available = machine_memory(device)[1]
    if need > available:
        raise InputError(
            f"{len(prompts) * n_samples} image(s) of {width}x{height} need about {need / 2**30:.1f} GiB of memory "
            f"beside the weights, more than the {available / 2**30:.1f} GiB available ({device.type})"
        )
    return height, width


def randn(generators: list[torch.Generator], shape: tuple[int, ...], pipe: Pipeline) -> torch.Tensor:
    """One (1, *shape) standard normal draw per generator (CPU generators, as diffusers), on the pipeline's device."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=pipe.dtype) for g in generators]).to(pipe.device)


class Txt2Img:
    """A mode of the sampling loop for one sub-batch: constructing it makes the images' random draws (in diffusers'
    order) and `start`, z_T (step 1 of the loop in the module docstring); `unet_input` is what the UNet sees for z_t
    (step 2), `after_step` what happens to z_{t-1} (step 6), `finish` what happens to the decoded images (step 7).
    txt2img: z_T = sigma_T * noise, and nothing else."""

    def __init__(self, pipe: Pipeline, run: Sampler, generators: list[torch.Generator], shape: tuple, **images):
        self.start = randn(generators, shape, pipe) * run.init_noise_sigma

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_step(self, latents: torch.Tensor, i: int) -> torch.Tensor:
        return latents

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        return images


class Img2Img(Txt2Img):
    """The init image's latent noised to the first timestep run: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t)
    noise (DDPM eq. 4), its posterior sample drawn before the noise."""

    def __init__(self, pipe, run, generators, shape, pixels, **images):
        z0 = pipe.encode_images(2 * pixels - 1, generators)
        self.start = run.add_noise(z0, randn(generators, shape, pipe), run.timesteps[0])


class BlendedInpaint(Txt2Img):
    """Inpainting with a plain (4-channel) UNet: after each step the unmasked part of z_{t-1} is replaced by the init
    image's latent noised to t-1 with the same noise (latent blending); strength 1 starts from pure noise, less as
    img2img; the unmasked pixels of the decoded image are the init image's, exactly."""

    def __init__(self, pipe, run, generators, shape, pixels, mask, strength):
        self.run, self.pixels, self.mask = run, pixels, mask
        self.z0 = pipe.encode_images(2 * pixels - 1, generators)
        self.noise = randn(generators, shape, pipe)
        start = run.add_noise(self.z0, self.noise, run.timesteps[0]) if strength < 1 else None
        self.start = self.noise * run.init_noise_sigma if start is None else start
        self.mask_latent = F.interpolate(mask, size=shape[1:]).to(pipe.device, pipe.dtype)

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

    def __init__(self, pipe, run, generators, shape, pixels, mask, strength):
        self.pixels, self.mask = pixels, mask
        z0 = pipe.encode_images(2 * pixels - 1, generators) if strength < 1 else None
        noise = randn(generators, shape, pipe)
        self.start = noise * run.init_noise_sigma if z0 is None else run.add_noise(z0, noise, run.timesteps[0])
        mask_latent = F.interpolate(mask, size=shape[1:]).to(pipe.device, pipe.dtype)
        masked = pipe.encode_images((2 * pixels - 1) * (1 - mask), generators)
        self.extra = torch.cat([mask_latent.expand(len(generators), -1, -1, -1), masked], dim=1)

    def unet_input(self, x):
        return torch.cat([x, self.extra], dim=1)

    def after_step(self, latents, i):
        return latents


class Pipeline(nn.Module):
    """txt2img / img2img / inpaint for a StableDiffusion model (`.unet .vae .text_encoder .tokenizer .cfg` are its).

    Memory: a call runs in sub-batches of the most images whose estimate_memory fits `batch_memory` bytes (default:
    a quarter of the machine's memory, so the sub-batches, hence the images, are the same from run to run on one
    machine). VAE decoding runs one image at a time, and in overlapping tiles of `vae_tile` latents a side,
    blended over `vae_tile_overlap` latents, when a latent side is larger than `vae_tile`; attention is
    torch's SDPA (ldm.attention), which never materialises the full attention matrix where it has a kernel.

    Speed: quantize="int8" turns the model's UNet into a dynamic-int8 one (in place; CPU, fp32, inference only;
    activation ranges are taken per call, so image k of a batch then depends slightly on the rest of the batch);
    compile=True runs the UNet's forward through torch.compile (the first call compiles); backend="openvino" runs
    the UNet and VAE decoder converted to OpenVINO in `backend_precision` (ldm.openvino; converted at the first call
    after the weights change, cached on disk). The text encoder is
    frozen, so the embeddings of the last EMBEDDING_CACHE prompts are kept (`pipe.embeddings.clear()` after
    loading other text-encoder weights into the model).
    """

    def __init__(
        self,
        model: StableDiffusion,
        vae_tile: int = VAE_TILE,
        vae_tile_overlap: int = 16,
        quantize: str | None = None,
        compile: bool = False,
        batch_memory: int | None = None,
        backend: str = "torch",
        backend_precision: str = "fp32",
    ):
        super().__init__()
        self.model = model
        self.vae_tile, self.vae_tile_overlap = vae_tile, vae_tile_overlap
        self.batch_memory = batch_memory if batch_memory is not None else machine_memory(self.device)[0] // 4
        self.embeddings: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.loras: list[dict] = []  # the LoRA files merged into the weights: file, weight
        self.lora_originals: dict[str, torch.Tensor] = {}  # the weights they changed, as they were
        self.textual_inversions: list[dict] = []  # the embedding files loaded: file, tokens
        if quantize is not None:
            if quantize not in QUANTIZE:
                raise InputError(f"unknown quantization '{quantize}' (known: {', '.join(QUANTIZE)})")
            if self.device.type != "cpu" or self.dtype != torch.float32:
                raise InputError(
                    f"quantize={quantize} is PyTorch's dynamic quantization: "
                    f"CPU and fp32 only, not {self.device.type} {self.dtype}"
                )
            quantize_int8_(self.unet)
        if backend not in ("torch", "openvino"):
            raise InputError(f"unknown backend '{backend}' (known: torch, openvino)")
        self.openvino = OpenVINO(backend_precision) if backend == "openvino" else None
        if compile:
            # on the forward, so the module, its hooks and names stay
            self.unet.forward = torch.compile(self.unet.forward)

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
        return self.cfg.vae.factor

    @property
    def is_inpainting_model(self) -> bool:
        """A 9-channel UNet (SD 1.5-inpainting): noisy latent + mask + masked-image latent."""
        return self.cfg.unet.in_channels == 2 * self.cfg.vae.embed_dim + 1

    def txt2img(self, prompts: str | list[str], **options) -> list[Image.Image]:
        """Images from text; options as in `generate`."""
        return self.generate(prompts, **options)

    def img2img(
        self, prompts: str | list[str], init_image: Image.Image, strength: float = 0.75, **options
    ) -> list[Image.Image]:
        """`init_image` noised to the strength's timestep, then denoised towards the prompt; options as in
        `generate`."""
        return self.generate(prompts, init_image=init_image, strength=strength, **options)

    def inpaint(
        self, prompts: str | list[str], init_image: Image.Image, mask: Image.Image, strength: float = 1.0, **options
    ) -> list[Image.Image]:
        """Repaint where `mask` is white (grey: partly); options as in `generate`."""
        return self.generate(prompts, init_image=init_image, mask=mask, strength=strength, **options)

    def outpaint(
        self,
        prompts: str | list[str],
        init_image: Image.Image,
        padding: tuple[int, int, int, int],
        mask_blur: int = 4,
        strength: float = 1.0,
        **options,
    ) -> list[Image.Image]:
        """Extend `init_image` by padding = (left, top, right, bottom) pixels (rounded up to the VAE factor): the
        image on a bigger canvas (outpaint_canvas: the new area pre-filled, a mask feathered over mask_blur pixels),
        inpainted with the prompt; the original's pixels come back exactly. Options as in `generate`."""
        canvas, mask, _ = outpaint_canvas(init_image, padding, self.vae_factor, mask_blur)
        return self.generate(prompts, init_image=canvas, mask=mask, strength=strength, **options)

    @torch.inference_mode()
    def generate(
        self,
        prompts: str | list[str],
        *,
        init_image: Image.Image | None = None,
        mask: Image.Image | None = None,
        strength: float = 1.0,
        negative_prompt: str = "",
        steps: int | None = None,
        scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        n_samples: int = 1,
        guidance_rescale: float = 0.0,
        progress: bool = True,
        trajectory: list[torch.Tensor] | None = None,
        prompt_syntax: str = "a1111",
        clip_skip: int = 1,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        deepcache: int | None = None,
        deepcache_branch: int = 0,
        controls: list[Control] = (),
        guess_mode: bool = False,
        control_maps: list[Image.Image] | None = None,
    ) -> list[Image.Image]:
        """n_samples images per prompt (prompt-major order); image i uses a CPU generator seeded seed + i.

        init_image: img2img, or inpainting with `mask` (white = repaint, grey = partly; the size of init_image).
        strength in (0, 1]: the fraction of the steps run from init_image (1: start from pure noise).
        sampler, steps, scale: default the model's (cfg.sampling: SD v1's ddim, 50, 7.5 unless its config says).
        scale: classifier-free guidance scale (1: no guidance, the negative prompt is then unused).
        guidance_rescale: phi of Lin et al. 2024 (0: off). eta: DDIM's stochasticity (ddim only).
        height, width: default the model's image_size (img2img: the init image's size, rounded down to vae_factor).
        trajectory: a list that receives z_t (the UNet's input latents) of every step, then z_0.
        prompt_syntax: "a1111" reads AUTOMATIC1111's prompt syntax (weights, BREAK), "plain" takes every character
        literally; both take prompts of any length, in chunks of 75 tokens (ldm.prompts). clip_skip: the text
        encoder's hidden state that conditions, counted from the end (1: the last).
        callback(i, steps, z_t): called after step i (from 0) of each sub-batch's `steps` with its latents (a progress
        bar, previews); an exception it raises stops the run there (an interrupt).
        deepcache N: the whole UNet runs every N-th call only, the calls between reuse its deep features and run the
        shallow branch `deepcache_branch` (ldm.unet.DeepCache; None or 1: every call is whole). Faster, a slightly
        different image.
        controls: ControlNets with their control images (ldm.controlnet.Control), their residuals summed; guess_mode:
        they see the conditional half of the batch only, their residuals scaled 0.1 .. 1 from shallow to deep.
        control_maps: a list that receives the control maps used, one per control (at the output size).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sampler, steps, scale = self.cfg.sampling.fill(sampler, steps, scale)
        guided = scale != 1
        height, width = check_request(
            self.cfg,
            prompts,
            n_samples=n_samples,
            steps=steps,
            sampler=sampler,
            strength=strength,
            eta=eta,
            guidance_rescale=guidance_rescale,
            scale=scale,
            init_image=init_image,
            mask=mask,
            height=height,
            width=width,
            device=self.device,
            dtype=self.dtype,
            deepcache=deepcache,
            deepcache_branch=deepcache_branch,
        )
        if self.openvino is not None:
            if deepcache or controls:
                what = "deepcache" if deepcache else "ControlNet"
                raise InputError(f"{what} runs on the torch UNet, not with the OpenVINO backend")
            self.openvino.prepare(self.model)  # converts only when the weights changed (a LoRA, another model)
        images = self.prepare_images(init_image, mask, height, width)
        for control in controls:
            control.check()
        maps = [control.control_map(height, width) for control in controls]
        hints = [to_tensor(m).to(self.device, self.dtype) for m in maps]
        if control_maps is not None:
            control_maps += maps
        inpaint = Inpaint if self.is_inpainting_model else BlendedInpaint
        mode = Txt2Img if init_image is None else Img2Img if mask is None else inpaint
        per_image = [p for p in prompts for _ in range(n_samples)]
        batch = self.batch_size(len(per_image), height, width, guided)
        results, trajectories = [], []
        for first in range(0, len(per_image), batch):
            seeds = range(seed + first, seed + min(first + batch, len(per_image)))
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            run = Sampler(sampler, self.cfg, steps, strength, eta, self.device)
            context = self.encode_prompts(
                per_image[first : first + batch], negative_prompt, guided, prompt_syntax, clip_skip
            )
            # 1. the start latents and the mode's other random draws
            sub = mode(self, run, generators, self.cfg.vae.latent_shape(height, width), **images, strength=strength)
            trajectories.append([] if trajectory is not None else None)
            desc = None if not progress else f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
            cache = DeepCache(deepcache, deepcache_branch) if deepcache else None
            control = partial(control_residuals, controls, hints, context=context, guess_mode=guess_mode)
            batch_images = self.sample(
                sub,
                run,
                generators,
                context,
                scale,
                guidance_rescale,
                desc,
                trajectories[-1],
                callback,
                cache,
                control if controls else None,
            )
            results += to_pil(batch_images)
        if trajectory is not None:
            trajectory += [torch.cat(step) for step in zip(*trajectories)]
        return results

    def sample(
        self,
        mode: Txt2Img,
        run: Sampler,
        generators,
        context,
        scale,
        rescale,
        desc,
        trajectory,
        callback,
        cache,
        control,
    ):
        """Steps 2-7 of the loop in the module docstring for one sub-batch: its images, (B, 3, H, W) in [0, 1];
        desc: the progress bar's (None: no bar); callback: generate's; cache: the run's DeepCache, if any;
        control(x, t, i, steps): ControlNet residuals for the UNet, or None."""
        latents = mode.start
        for i, t in enumerate(tqdm(run.timesteps, desc=desc, disable=desc is None)):
            x = run.scale_input(latents, t)
            if trajectory is not None:
                trajectory.append(x)
            residuals = control(x, t, i, len(run.timesteps)) if control is not None else None
            e = self.predict(mode.unet_input(x), t, context, scale, rescale, residuals, cache)  # 2. - 4.
            latents = run.step(e, t, latents, generators)  # 5.
            latents = mode.after_step(latents, i)  # 6.
            if callback is not None:
                callback(i, len(run.timesteps), latents)
        if trajectory is not None:
            trajectory.append(latents)
        return mode.finish(self.decode(latents))  # 7.

    def batch_size(self, n: int, height: int, width: int, guided: bool) -> int:
        """The most images (at most n, at least 1) one sub-batch may hold: estimate_memory within batch_memory."""
        low, high, fused = 1, n, self.device.type == "cpu"  # SDPA's fused kernels: measured on CPU only
        while low < high:  # binary search for the largest b that fits
            mid = (low + high + 1) // 2
            need = estimate_memory(self.cfg, mid, height, width, guided, self.dtype.itemsize, self.vae_tile, fused)
            fits = need <= self.batch_memory
            low, high = (mid, high) if fits else (low, mid - 1)
        return low

    def prepare_images(self, init_image, mask, height, width) -> dict[str, torch.Tensor]:
        """{"pixels": the init image (1, 3, H, W), "mask": the mask (1, 1, H, W)}, in [0, 1], resized to (width, height)
        (with a warning when the size changes); empty without an init image."""
        if init_image is None:
            return {}
        if init_image.size != (width, height):
            size, m = f"{init_image.width}x{init_image.height}", self.vae_factor
            warnings.warn(f"init image resized from {size} to {width}x{height} (sides are multiples of {m})")
        images = {"pixels": to_tensor(init_image.convert("RGB").resize((width, height), Image.LANCZOS))}
        if mask is not None:
            images["mask"] = to_tensor(mask.convert("L").resize((width, height), Image.LANCZOS))
        return images

    def encode_prompts(
        self, prompts: list[str], negative_prompt: str, guided: bool, prompt_syntax: str = "a1111", clip_skip: int = 1
    ) -> torch.Tensor:
        """Text context for the UNet, a prompt per image: (n, 77 k, d); the negative prompt's in front when guided.
        Contexts of fewer chunks than the longest get the empty prompt's chunk appended (A1111's pad_cond_uncond), so
        guidance stays one batched UNet call."""
        if prompt_syntax not in SYNTAX_NAMES:
            raise InputError(f"unknown prompt syntax '{prompt_syntax}' (known: {', '.join(SYNTAX_NAMES)})")
        layers = self.text_encoder.num_layers
        if not 1 <= clip_skip <= layers:
            raise InputError(f"clip skip must be from 1 to {layers} (the text encoder's layers), got {clip_skip}")
        states = self.embed(prompts, prompt_syntax, clip_skip)
        states += self.embed([negative_prompt], prompt_syntax, clip_skip) if guided else []
        length = max(len(s) for s in states)
        if any(len(s) < length for s in states):
            empty = self.embed([""], prompt_syntax, clip_skip)[0]
            states = [torch.cat([s, empty.repeat((length - len(s)) // len(empty), 1)]) for s in states]
        cond = torch.stack(states[: len(prompts)])
        if not guided:
            return cond
        return torch.cat([states[-1].expand_as(cond), cond])

    def embed(self, prompts: list[str], prompt_syntax: str = "a1111", clip_skip: int = 1) -> list[torch.Tensor]:
        """Each prompt's context (77 k, d) by ldm.prompts.prompt_contexts; uncached ones are encoded as one batch."""
        keys = [(p, prompt_syntax, clip_skip, self.device, self.dtype) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.embeddings))
        if missing:
            contexts = prompt_contexts(self.text_encoder, [k[0] for k in missing], prompt_syntax, clip_skip)
            self.embeddings.update(zip(missing, contexts))
        for k in keys:
            self.embeddings.move_to_end(k)
        states = [self.embeddings[k] for k in keys]
        while len(self.embeddings) > EMBEDDING_CACHE:
            self.embeddings.popitem(last=False)
        return states

    def encode_images(self, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """z_0 = scale_factor * a posterior sample of E(x), one per generator; x (1, 3, H, W) in [-1, 1]."""
        posterior = self.vae.encode(x.to(self.device, self.dtype))
        return self.model.get_first_stage_encoding(torch.cat([posterior.sample(g) for g in generators]))

    def predict(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        scale: float,
        rescale: float,
        control=None,
        cache=None,
    ) -> torch.Tensor:
        """The guided UNet prediction; cond and uncond go through the UNet as one batch. control: ControlNet
        residuals for that batch (ldm.unet.UNetModel.forward); cache: a DeepCache (neither with the OpenVINO backend,
        refused before: generate)."""

        # only what is set, so that a UNet stand-in taking (x, t, context) still works
        extra = {k: v for k, v in (("control", control), ("cache", cache)) if v is not None}

        def unet(x):
            if self.openvino is not None:
                return self.openvino.unet(x, t, context)
            return self.unet(x, t, context, **extra)

        if len(context) == len(x):
            return unet(x)
        e_uncond, e_cond = unet(torch.cat([x, x])).chunk(2)
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
        z = latents
        decode = self.decode_tiled if max(z.shape[-2:]) > self.vae_tile else self.decode_first_stage
        images = [decode(z[i : i + 1]) for i in range(len(z))]
        dtype = next(self.vae.parameters()).dtype
        half = dtype != torch.float32 or torch.is_autocast_enabled(z.device.type)
        overflowed = [i for i, image in enumerate(images) if half and not image.isfinite().all()]
        if overflowed:
            warnings.warn(
                "the VAE's half-precision decode overflowed (inf / NaN: a black image); decoding again in float32"
            )
            self.vae.float()
            try:
                with torch.autocast(z.device.type, enabled=False):
                    for i in overflowed:
                        images[i] = decode(z[i : i + 1].float())
            finally:
                self.vae.to(dtype)
        return (torch.cat([image.float() for image in images]).cpu() / 2 + 0.5).clamp(0, 1)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """D(z_0 / scale_factor) by the torch VAE or the OpenVINO backend's decoder."""
        return self.model.decode_first_stage(z) if self.openvino is None else self.openvino.decode_first_stage(z)

    def decode_tiled(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents (1, C, h, w) in vae_tile-sized tiles overlapping by vae_tile_overlap, as the weighted mean of
        the tiles covering each pixel (weights ramp up linearly over the overlap, so seams fade out). GroupNorm
        statistics and the mid-block attention become per tile: close to the plain decode, not equal."""
        f, tile = self.vae_factor, self.vae_tile
        stride = tile - self.vae_tile_overlap
        h, w = z.shape[-2:]
        out = torch.zeros(1, self.cfg.vae.out_ch, h * f, w * f)
        weight = torch.zeros(1, 1, h * f, w * f)
        for y in tile_starts(h, tile, stride):
            for x in tile_starts(w, tile, stride):
                piece = self.decode_first_stage(z[..., y : y + tile, x : x + tile]).float().cpu()
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

    def load_lora(self, path: str | Path, weight: float = 1.0, te_weight: float | None = None) -> None:
        """Merge a LoRA file into the weights (ldm.lora: kohya / AUTOMATIC1111 with diffusers or CompVis names,
        diffusers / PEFT): W += weight * alpha / rank * up @ down, the text encoder's layers at te_weight when given.
        LoRAs stack; a bad file changes nothing."""
        merge_lora_(self.model, path, weight, self.lora_originals, te_weight)
        self.loras.append({"file": str(path), "weight": weight, "te_weight": te_weight})
        self.embeddings.clear()  # the text encoder's weights may have changed

    def unload_loras(self) -> None:
        """The weights as they were before the first load_lora, bit for bit."""
        unmerge_loras_(self.model, self.lora_originals)
        self.loras.clear()
        self.embeddings.clear()

    def load_controlnet(self, path: str | Path) -> ControlNet:
        """A ControlNet file or diffusers folder (ldm.controlnet.load_controlnet) for this pipeline's model, on its
        device and in its dtype; use it with `Control(net, image, ...)` in `controls=`."""
        return load_controlnet(path, self.cfg).to(self.device, self.dtype)

    def load_embedding(self, path: str | Path, token: str | None = None) -> list[str]:
        """A textual-inversion embedding (ldm.embeddings) as new words of the text encoder; returns its tokens (the
        trigger word: `token`, else the file's, else its stem). The text model's vocabulary grows by its vectors."""
        tokens = add_embedding_(self.text_encoder, path, token)
        self.textual_inversions.append({"file": str(path), "tokens": tokens})
        self.embeddings.clear()
        return tokens


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
    model = load_model(DEFAULT_MODEL if path is None else path, config)
    model = model.to(device=device, dtype=torch.float32 if dtype is None else dtype).eval()
    return Pipeline(
        model, quantize=quantize, compile=compile, backend=backend, backend_precision=backend_precision
    ).eval()
