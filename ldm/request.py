"""A generation request: every setting of one call, as the frozen `Request` that txt2img.py, the web page and the
coming REST API build and `Pipeline.generate` takes; beside it the `OutputSpec` of a run's PNGs (ldm.outputs).

    request = Request("a red apple", seed=3, cfg_end=0.8)
    request.check(names)            # the rules that need no model: before any heavy import (a CLI answers at once)
    request = request.resolved(cfg) # images read, the model's rules, its defaults filled (sampler, steps, size...)

Every rule of a request lives here, once; a front end passes `names`, how it calls each setting ("--init-image"
on the command line, "Image" on the web page), so the same rule speaks each front end's words. Settings left None
are decided by the model (cfg.sampling, its image size) or by the mode (strength), in `resolved` alone.

This module imports no torch (nor diffusers, transformers): `resolved` imports the model-side helpers it needs
(ldm.images, ldm.samplers, ldm.unet) when called, after the command line's fast checks.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm.config import CONTROL_PREPROCESS_NAMES
from ldm.errors import LdmError

if TYPE_CHECKING:  # PIL costs ~20 ms of a command line's start; the request only names its type
    from PIL import Image

SEEDS = (-(2**63), 2**64)  # the range of torch.Generator.manual_seed
MASK_BLUR = 4  # outpainting's default feathered border, pixels
IMG2IMG_STRENGTH = 0.75  # the default strength with an init image and no mask (inpainting, outpainting: 1)
HIRES_DENOISE = 0.7  # the hires fix's default denoising strength (AUTOMATIC1111's)
# the hires fix's upscalers, AUTOMATIC1111's names: its latent modes (torch's F.interpolate mode, antialias), and
# "Lanczos", which decodes, resizes the pixels (PIL's Lanczos) and encodes again
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
HIRES_UPSCALERS = (*LATENT_UPSCALERS, "Lanczos")

# how the library's messages call the settings; a front end passes its own words for those it names otherwise
NAMES = {
    "steps": "steps",
    "schedule": "schedule",
    "scale": "scale",
    "eta": "eta",
    "guidance_rescale": "guidance rescale",
    "cfg_end": "cfg end",
    "strength": "strength",
    "height": "height",
    "width": "width",
    "seed": "seed",
    "init_image": "init image",
    "mask": "mask",
    "outpaint": "outpainting",
    "mask_blur": "mask blur",
    "controlnet": "ControlNet",
    "control_preprocess": "control preprocessing",
    "deepcache": "deepcache",
    "deepcache_branch": "deepcache branch",
    "hires_scale": "hires scale",
    "hires_size": "hires size",
    "hires_steps": "hires steps",
    "hires_denoise": "hires denoise",
    "hires_upscaler": "hires upscaler",
    "hires_prompt": "hires prompt",
    "hires_sampler": "hires sampler",
}
HIRES = ("hires_steps", "hires_denoise", "hires_upscaler", "hires_prompt", "hires_sampler")  # the hires pass's options


class InputError(LdmError):
    """Bad generation input (image, mask, size, strength, sampler...); the message says which and why."""


@dataclass(frozen=True)
class Control:
    """One ControlNet of a request: the net (a file or diffusers folder, or a loaded ldm.controlnet.ControlNet), its
    control image (a PIL image or a file; `preprocess` "none": the image is the map, "canny": its edges), the
    residuals' scale and the part of the steps [start, end] (fractions) it acts on."""

    net: Any
    image: Image.Image | str | Path
    preprocess: str = "none"
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA merged for a request: W += weight * alpha / rank * up @ down (the text encoder's layers at te_weight
    when given)."""

    file: str | Path
    weight: float = 1.0
    te_weight: float | None = None


@dataclass(frozen=True)
class EmbeddingSpec:
    """A textual-inversion embedding for a request, its trigger word `token` (None: the file's, else its stem)."""

    file: str | Path
    token: str | None = None


@dataclass(frozen=True)
class Request:
    """n_samples images per prompt (prompt-major order); image i uses a CPU generator seeded seed + i.

    init_image: img2img, or inpainting with `mask` (white = repaint, grey = partly; the size of init_image), or
    outpainting with `outpaint` = (left, top, right, bottom) pixels, the new area's mask feathered over mask_blur
    pixels. strength in (0, 1]: the fraction of the steps run from init_image (1: start from pure noise).
    sampler, steps, scale: None, the model's (cfg.sampling). scale: classifier-free guidance scale (1: none).
    schedule: where the sampler's steps fall (ldm.samplers.SCHEDULES: default, the sampler's own; karras;
    exponential; sgm_uniform), for the samplers whose scheduler takes it.
    guidance_rescale: phi of Lin et al. 2024 (0: off). cfg_end: guidance on steps 0 .. int(N * cfg_end) of the N
    steps run, none after (1: on every step). eta: DDIM's stochasticity (ddim only).
    height, width: None, the model's image size (img2img: the init image's, rounded down to the VAE factor).
    prompt_syntax: "a1111" (weights, BREAK) or "plain"; clip_skip: the text encoder's layer, from the end.
    controls: ControlNets, their residuals summed; guess_mode: they see the conditional half only, scaled 0.1..1.
    loras, embeddings: the LoRAs and textual inversions the weights carry for this request (None: those they carry,
    Pipeline.load_lora's and load_embedding's).
    deepcache N: the whole UNet every N-th call only (ldm.unet.DeepCache), the shallow branch deepcache_branch
    between.
    hires fix (txt2img; on with hires_scale or hires_size, as AUTOMATIC1111's): the images drawn at height x width,
    upscaled by hires_scale (or to hires_size = (width, height), the same aspect ratio) with hires_upscaler, then
    img2img at hires_denoise with hires_sampler (None: the sampler), hires_prompt (None: each image's prompt) for
    hires_steps steps (0: steps), the last ones of int(hires_steps / min(hires_denoise, 0.999)) (A1111's count).
    """

    prompts: tuple[str, ...]
    negative_prompt: str = ""
    n_samples: int = 1
    seed: int = 0
    sampler: str | None = None
    schedule: str = "default"
    steps: int | None = None
    scale: float | None = None
    height: int | None = None
    width: int | None = None
    eta: float = 0.0
    guidance_rescale: float = 0.0
    cfg_end: float = 1.0
    prompt_syntax: str = "a1111"
    clip_skip: int = 1
    init_image: Image.Image | str | Path | None = None
    mask: Image.Image | str | Path | None = None
    strength: float | None = None
    outpaint: tuple[int, int, int, int] | None = None
    mask_blur: int | None = None
    controls: tuple[Control, ...] = ()
    guess_mode: bool = False
    loras: tuple[LoraSpec, ...] | None = None
    embeddings: tuple[EmbeddingSpec, ...] | None = None
    deepcache: int | None = None
    deepcache_branch: int = 0
    hires_scale: float | None = None
    hires_size: tuple[int, int] | None = None
    hires_steps: int | None = None
    hires_denoise: float | None = None
    hires_upscaler: str | None = None
    hires_prompt: str | None = None
    hires_sampler: str | None = None

    def __post_init__(self):
        prompts = (self.prompts,) if isinstance(self.prompts, str) else self.prompts
        for name, value in (("prompts", prompts), ("controls", self.controls)):
            object.__setattr__(self, name, tuple(value))
        for name in ("loras", "embeddings", "outpaint", "hires_size"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def mode(self) -> str:
        """txt2img, img2img, inpaint or outpaint."""
        if self.init_image is None:
            return "txt2img"
        return "outpaint" if self.outpaint is not None else "img2img" if self.mask is None else "inpaint"

    @property
    def hires(self) -> bool:
        """The hires fix is on (hires_scale or hires_size given)."""
        return self.hires_scale is not None or self.hires_size is not None

    def output_size(self, factor: int) -> tuple[int, int]:
        """(width, height) of the images of a resolved request for a VAE of `factor`: width x height, or the hires
        fix's: hires_size, or int(side * hires_scale) rounded down to the factor (AUTOMATIC1111's latent size)."""
        if self.hires_scale is None:
            return self.hires_size or (self.width, self.height)
        return int(self.width * self.hires_scale) // factor * factor, int(
            self.height * self.hires_scale
        ) // factor * factor

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on (scale != 1; the model's scale when None)."""
        return self.scale != 1

    def check(self, names: dict[str, str] | None = None) -> None:
        """The rules that need no model and read no file: InputError in the front end's words (names)."""
        n = NAMES | (names or {})
        if not self.prompts or self.n_samples < 1:
            raise InputError("nothing to generate: give at least one prompt and n_samples >= 1")
        for key in ("scale", "eta", "guidance_rescale", "cfg_end", "strength"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise InputError(f"{n[key]} must be a finite number, got {value}")
        for key in ("height", "width"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise InputError(f"{n[key]} must be a positive number of pixels, got {getattr(self, key)}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"{n['steps']} must be at least 1, got {self.steps}")
        last = self.seed + len(self.prompts) * self.n_samples - 1
        if not SEEDS[0] <= self.seed <= last < SEEDS[1]:
            seeds = "the seeds of the images must lie in [-2**63, 2**64)"
            raise InputError(f"{n['seed']} {self.seed}: {seeds}, the last would be {last}")
        if not 0 <= self.guidance_rescale <= 1:
            raise InputError(f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        if not 0 <= self.cfg_end <= 1:
            raise InputError(f"{n['cfg_end']} must be in [0, 1] (the fraction of the steps guided), got {self.cfg_end}")
        if self.deepcache is not None and self.deepcache < 1:
            raise InputError(
                f"{n['deepcache']} (a full UNet call every N calls) must be at least 1, got {self.deepcache}"
            )
        self.check_images(n)
        self.check_hires(n)
        for control in self.controls:
            check_control(control, n)

    def check_images(self, n: dict[str, str]) -> None:
        """The rules of the init image, mask, strength and outpainting that need no file read."""
        if self.strength is not None and self.init_image is None:
            raise InputError(f"{n['strength']} needs {n['init_image']}")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise InputError(f"{n['strength']} must be in (0, 1], got {self.strength}")
        if self.mask is not None and self.init_image is None and self.outpaint is None:
            raise InputError(f"{n['mask']} needs {n['init_image']} to inpaint")
        if self.mask_blur is not None and self.outpaint is None:
            raise InputError(f"{n['mask_blur']} applies to {n['outpaint']} only")
        if self.outpaint is None:
            return
        if self.init_image is None or self.mask is not None:
            raise InputError(f"{n['outpaint']} needs {n['init_image']} (the picture to extend) and no {n['mask']}")
        padding = self.outpaint
        if len(padding) != 4 or any(not isinstance(p, int) or p < 0 for p in padding) or not any(padding):
            raise InputError(f"outpainting needs 4 non-negative whole numbers of pixels, not all 0, got {padding}")
        if self.mask_blur is not None and self.mask_blur < 0:
            raise InputError(f"mask blur must be >= 0 pixels, got {self.mask_blur}")

    def check_hires(self, n: dict[str, str]) -> None:
        """The rules of the hires fix that need no model."""
        if not self.hires:
            given = [n[key] for key in HIRES if getattr(self, key) is not None]
            if given:
                raise InputError(f"{given[0]} needs {n['hires_scale']} or {n['hires_size']} (the hires fix)")
            return
        if self.hires_scale is not None and self.hires_size is not None:
            raise InputError(f"give one of {n['hires_scale']} and {n['hires_size']}, not both")
        if self.mode != "txt2img" or self.controls:
            raise InputError(f"the hires fix is for txt2img: no {n['init_image']} and no {n['controlnet']} with it")
        if self.hires_scale is not None and not (math.isfinite(self.hires_scale) and self.hires_scale >= 1):
            raise InputError(f"{n['hires_scale']} must be a number >= 1, got {self.hires_scale}")
        size = self.hires_size
        if size is not None and (len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size)):
            raise InputError(f"{n['hires_size']} must be WIDTHxHEIGHT in positive whole pixels, got {size}")
        if self.hires_steps is not None and self.hires_steps < 0:
            raise InputError(f"{n['hires_steps']} must be >= 0 (0: the same as the steps), got {self.hires_steps}")
        denoise = self.hires_denoise
        if denoise is not None and not (math.isfinite(denoise) and 0 < denoise <= 1):
            raise InputError(f"{n['hires_denoise']} must be in (0, 1], got {denoise}")
        if self.hires_upscaler is not None and self.hires_upscaler not in HIRES_UPSCALERS:
            known = ", ".join(HIRES_UPSCALERS)
            raise InputError(f"unknown {n['hires_upscaler']} '{self.hires_upscaler}' (known: {known})")

    def resolved_hires(self, cfg, sampler: str, steps: int, width: int, height: int, n: dict[str, str]) -> dict:
        """The hires fields filled for a request drawn at width x height with `steps` of `sampler` (none when off)."""
        from ldm.samplers import check_sampler, check_schedule, grid_steps

        if not self.hires:
            return {}
        hires_sampler = self.hires_sampler or sampler
        check_sampler(hires_sampler, cfg, InputError, n["hires_sampler"])
        check_schedule(hires_sampler, self.schedule, InputError, n["schedule"])  # A1111: the same schedule
        f, size = cfg.vae.factor, self.hires_size
        if size is not None and (size[0] % f or size[1] % f or size[0] * height != size[1] * width):
            ratio = f"multiples of {f} in the aspect ratio of {width}x{height}"
            raise InputError(f"{n['hires_size']} {size[0]}x{size[1]}: the sides must be {ratio}")
        hires_steps = self.hires_steps or steps
        denoise = HIRES_DENOISE if self.hires_denoise is None else self.hires_denoise
        total = hires_schedule(hires_steps, denoise)[0]
        if total > cfg.timesteps:
            raise InputError(
                f"{n['hires_steps']} {hires_steps} at {n['hires_denoise']} {denoise}: a schedule of {total} steps, "
                f"more than this model's {cfg.timesteps} timesteps"
            )
        grid = grid_steps(hires_sampler)
        if grid is not None and total > grid:
            raise InputError(
                f"{n['hires_steps']} {hires_steps} at {n['hires_denoise']} {denoise}: a schedule of {total} steps, "
                f"more than the {hires_sampler} sampler's {grid} original_inference_steps"
            )
        return {
            "hires_steps": hires_steps,
            "hires_denoise": denoise,
            "hires_upscaler": self.hires_upscaler or HIRES_UPSCALERS[0],
            "hires_sampler": hires_sampler,
        }

    def resolved(self, cfg, names: dict[str, str] | None = None) -> Request:
        """This request for the model of `cfg` (a ModelConfig), checked: image files read (PIL images), the model's
        rules, and every default filled (sampler, steps, scale, strength, mask blur, size, the hires fix's steps,
        denoise, upscaler and sampler; outpainting's padding rounded to the VAE factor). Resolving a resolved request
        changes nothing."""
        from ldm.images import load_image, outpaint_padding
        from ldm.samplers import check_sampler, check_schedule, grid_steps
        from ldm.unet import skip_branches

        self.check(names)
        n = NAMES | (names or {})
        sampler, steps, scale = cfg.sampling.fill(self.sampler, self.steps, self.scale)
        check_sampler(sampler, cfg, InputError)
        check_schedule(sampler, self.schedule, InputError, n["schedule"])
        if steps > cfg.timesteps:
            limit = f"this model has {cfg.timesteps} diffusion timesteps, so at most that many steps"
            raise InputError(f"{n['steps']} {steps}: {limit}")
        grid = grid_steps(sampler)
        if grid is not None and steps > grid:
            limit = f"the {sampler} sampler picks its steps among its {grid} original_inference_steps"
            raise InputError(f"{n['steps']} {steps}: {limit}")
        if self.eta < 0 or self.eta and sampler != "ddim":
            raise InputError(
                f"{n['eta']} applies to the ddim sampler only and must be >= 0, got {self.eta} with {sampler}"
            )
        strength = self.strength
        if strength is None:
            strength = IMG2IMG_STRENGTH if self.mode == "img2img" else 1.0
        if int(steps * strength) < 1:
            raise InputError(
                f"strength {strength} with {steps} steps leaves no denoising step (raise strength or steps)"
            )
        if not 0 <= self.deepcache_branch < skip_branches(cfg.unet):
            last = skip_branches(cfg.unet) - 1
            raise InputError(
                f"{n['deepcache_branch']} must be from 0 to {last} (this UNet's skips), got {self.deepcache_branch}"
            )
        init_image = self.init_image if self.init_image is None else image_of(self.init_image, "RGB", load_image)
        mask = self.mask if self.mask is None else image_of(self.mask, "L", load_image)
        if mask is not None and mask.size != init_image.size:
            image = init_image
            raise InputError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")
        if cfg.unet.in_channels == 2 * cfg.vae.embed_dim + 1 and mask is None and self.outpaint is None:
            raise InputError("this is an inpainting model (9-channel UNet): give an init image and a mask")
        f, padding = cfg.vae.factor, self.outpaint
        size = None if init_image is None else init_image.size  # img2img's, or outpainting's canvas's
        if padding is not None:
            padding = outpaint_padding(size, padding, f)
            size = (size[0] + padding[0] + padding[2], size[1] + padding[1] + padding[3])
        if size is None:
            height, width = self.height or cfg.image_size * f, self.width or cfg.image_size * f
        else:
            width, height = self.width or size[0] // f * f, self.height or size[1] // f * f
        if height <= 0 or width <= 0 or height % f or width % f:
            raise InputError(
                f"{n['height']} and {n['width']} must be positive multiples of {f} for this model, got {width}x{height}"
            )
        controls = tuple(replace(c, image=image_of(c.image, "RGB", load_image)) for c in self.controls)
        return replace(
            self,
            sampler=sampler,
            steps=steps,
            scale=scale,
            strength=strength if self.init_image is not None else None,
            height=height,
            width=width,
            init_image=init_image,
            mask=mask,
            outpaint=padding,
            mask_blur=MASK_BLUR if padding is not None and self.mask_blur is None else self.mask_blur,
            controls=controls,
            **self.resolved_hires(cfg, sampler, steps, width, height, n),
        )


def hires_schedule(steps: int, denoise: float) -> tuple[int, float]:
    """The hires pass's (schedule length, strength) for ldm.samplers.Sampler: it runs the last `steps` steps of a
    schedule of int(steps / min(denoise, 0.999)) steps, as AUTOMATIC1111's setup_img2img_steps (the Sampler runs
    int(total * strength) of them: strength (steps + 0.5) / total makes that steps whatever the rounding)."""
    total = int(steps / min(denoise, 0.999))
    return total, min(1.0, (steps + 0.5) / total)


def image_of(image: Image.Image | str | Path, mode: str, load_image) -> Image.Image:
    """A request's image as a PIL image in `mode`: a file read by load_image, or the PIL image converted."""
    return load_image(image, mode) if isinstance(image, (str, Path)) else image.convert(mode)


def check_control(control: Control, n: dict[str, str]) -> None:
    """The rules of one ControlNet unit: its preprocessing (and OpenCV for canny), scale, start and end, its file."""
    if control.preprocess not in CONTROL_PREPROCESS_NAMES:
        known = ", ".join(CONTROL_PREPROCESS_NAMES)
        raise InputError(f"unknown control preprocessing '{control.preprocess}' (known: {known})")
    if control.preprocess == "canny" and importlib.util.find_spec("cv2") is None:
        raise InputError(f"{n['control_preprocess']} canny needs OpenCV: pip install 'ldm[controlnet]'")
    if not math.isfinite(control.scale):
        raise InputError(f"a control scale must be a finite number, got {control.scale}")
    if not 0 <= control.start < control.end <= 1:
        raise InputError(
            f"control start and end must satisfy 0 <= start < end <= 1, got {control.start}, {control.end}"
        )
    if isinstance(control.net, (str, Path)) and not Path(control.net).exists():
        raise InputError(f"{n['controlnet']} {control.net}: no such file or folder")


@dataclass(frozen=True)
class OutputSpec:
    """Where and how a run's images are written: n_iter requests per prompt (the seed going on), a grid of them
    (one row per request) when there is more than one image, the parameters in each PNG (metadata), a strip of each
    image's denoising trajectory (intermediates) and the control maps used (control_maps)."""

    outdir: Path
    n_iter: int = 1
    grid: bool = True
    metadata: bool = True
    intermediates: bool = False
    control_maps: bool = False

    def check(self, request: Request, names: dict[str, str] | None = None) -> None:
        """InputError (in the front end's words, names) unless the run's requests, all n_iter of them, can run."""
        if self.n_iter < 1:
            raise InputError(f"{(names or {}).get('n_iter', 'n_iter')} must be at least 1, got {self.n_iter}")
        replace(request, n_samples=request.n_samples * self.n_iter).check(names)  # the seeds of every batch
