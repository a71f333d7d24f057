"""txt2img, img2img, inpainting and outpainting on the three models of a checkpoint: `generate(request)` (a
ldm.request.Request), returning PIL images.

The loop every SD v1 sampler shares (Ho et al. 2020; Song et al. 2021), the update being diffusers' scheduler's;
the mode (ldm.modes) says what happens at steps 1, 6 and 7, the denoiser (ldm.denoiser) at steps 2-4:

    1  z_T = mode.start                             txt2img: sigma_T * noise; img2img: z_t ~ q(z_t | z_0 = E(image))
                                                    at the strength's t; inpainting: either, by strength
       for i, t in enumerate(timesteps):
    2      x = mode.unet_input(z_t)                 9-channel inpainting: z_t, mask, E(masked image) stacked
    3      e_u, e_c = UNet([x, x], t, [c_neg, c])   cond and uncond in one batched call (ControlNet residuals added)
    4      e = e_u + s * (e_c - e_u)                classifier-free guidance (Ho & Salimans 2022, eq. 6)
    5      z_t = scheduler.step(e, t, z_t)
    6      z_t = mode.after_step(z_t)               blended inpainting: the unmasked part is the init image's, re-noised
    7  image = mode.finish(D(z_0 / scale_factor))   inpainting: the unmasked pixels pasted back (ldm.decode)

The hires fix (txt2img) runs the loop twice, as AUTOMATIC1111's: z_0 of the first pass is upscaled (F.interpolate
in a latent mode, or decoded, resized with Lanczos and encoded), then img2img from it (ldm.modes.Img2Img, z_0 given)
at the hires denoising strength, its generators seeded again with the images' seeds (A1111's second ImageRNG).

Image i of a request has its own CPU generator seeded seed + i (ldm.modes: diffusers' order of draws), so the same
weights, seed and sampler give diffusers' image. A request runs in sub-batches of the size where throughput stops
growing (SUB_BATCH_LATENTS) whose estimated memory (`estimate_memory`) fits the machine, each yielded as it is made
(`sub_batches`); a request whose single image does not fit is refused before anything is allocated
(ldm.memory.check_memory, which needs only the model's config).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ldm import DEFAULT_MODEL
from ldm.checkpoint import load_model
from ldm.conditioning import Conditioner
from ldm.controlnet import ControlNet, control_map, load_controlnet
from ldm.decode import Decoder
from ldm.denoiser import Denoiser, embeds_guidance, runs_unconditional
from ldm.images import resized, to_pil, to_tensor
from ldm.memory import VAE_TILE, check_memory, estimate_memory, machine_memory
from ldm.model import StableDiffusion
from ldm.modes import Img2Img, Txt2Img, encode_images, mode_images, mode_of
from ldm.openvino import OpenVINO
from ldm.patcher import Patcher
from ldm.request import LATENT_UPSCALERS, EmbeddingSpec, InputError, LoraSpec, Request, hires_schedule
from ldm.runtime import BACKENDS, check_quantize
from ldm.samplers import Sampler
from ldm.taesd import TAESD, load_taesd

OBSERVERS = ("progress", "callback", "trajectory", "control_maps")  # generate's keyword options
# Latent pixels a sub-batch holds at most: the throughput knee (benchmarks/sub_batch_knee.py, BENCHMARKS.md). The
# embedded model (8x8 latents) on a 2-core CPU, 5 steps: 4.8 images/s alone, 8.7 at 4, 10.5 at 16 images a call, and
# flat from there to 256 (0.94-1.00 of the best) while the first PNG waits 1.5 s at 16, 12.5 s at 128: 16 such images.
# SD v1's 64x64 latents: one image (a CPU is busy with one already).
SUB_BATCH_LATENTS = 16 * 8 * 8


class Pipeline(nn.Module):
    """txt2img / img2img / inpaint / outpaint for a StableDiffusion model (`.unet .vae .text_encoder .tokenizer .cfg`
    are its).

    Memory: a request runs in sub-batches of images at the throughput knee (SUB_BATCH_LATENTS), fewer where their
    estimate_memory does not fit `batch_memory` bytes (default: a quarter of the machine's memory, so the sub-batches,
    hence the images, are the same from run to run on one machine); sub_batches yields each as it is made. VAE
    decoding runs one image at a time, and in overlapping tiles of `vae_tile` latents a side, blended over
    `vae_tile_overlap` latents, when a latent side is larger than `vae_tile` (ldm.decode); attention is torch's SDPA
    (ldm.attention), which never materialises the full attention matrix where it has a kernel.

    Speed: quantize="int8" turns the model's UNet into a dynamic-int8 one (in place; CPU, fp32, inference only;
    activation ranges are taken per call, so image k of a batch then depends slightly on the rest of the batch);
    compile=True runs the UNet's forward through torch.compile (the first call compiles); backend="openvino" runs
    the UNet and VAE decoder converted to OpenVINO in `backend_precision` (ldm.openvino; converted at the first call
    after the LoRAs change, cached on disk). LoRAs and embeddings: `patcher` (ldm.patcher), which also keeps the
    int8 UNet's float weights for LoRAs to merge into. The text encoder is frozen, so the contexts of recent prompts
    are kept (ldm.conditioning), keyed on `version`, which changes with the LoRAs and embeddings the weights carry.
    taesd (ldm.taesd): decode with it instead of the VAE and, with taesd_encode, encode with it (init images, the hires
    fix's Lanczos round trip).
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
        taesd: TAESD | None = None,
        taesd_encode: bool = False,
    ):
        super().__init__()
        self.model = model
        self.batch_memory = batch_memory if batch_memory is not None else machine_memory(self.device)[0] // 4
        self.conditioner = Conditioner(model.text_encoder)
        self.patcher = Patcher(model)
        self.controlnets: dict[str, ControlNet] = {}  # the ControlNet files loaded, by path
        check_quantize(quantize, self.device, self.dtype)
        if quantize is not None:
            self.patcher.quantize_int8()
        if backend not in BACKENDS:
            raise InputError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
        self.openvino = OpenVINO(backend_precision) if backend == "openvino" else None
        if taesd_encode and taesd is None:
            raise InputError("--taesd-encode encodes with the TAESD of --taesd, and none was given")
        if taesd is not None:
            taesd.check(self.cfg.vae, taesd_encode)
        self.taesd, self.taesd_encoder = taesd, taesd if taesd_encode else None
        self.decode = Decoder(model, vae_tile, vae_tile_overlap, self.openvino, taesd)
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
    def version(self) -> int:
        """The patcher's version: it changes exactly when the LoRAs and embeddings the weights carry do."""
        return self.patcher.version

    @property
    def vae_factor(self) -> int:
        """Pixels per latent, along a side (8 for SD v1): image sides must be multiples of it."""
        return self.cfg.vae.factor

    @property
    def is_inpainting_model(self) -> bool:
        """A 9-channel UNet (SD 1.5-inpainting): noisy latent + mask + masked-image latent."""
        return self.cfg.unet.in_channels == 2 * self.cfg.vae.embed_dim + 1

    def txt2img(self, prompts: str | list[str], **options) -> list[Image.Image]:
        """Images from text; options: a Request's fields and generate's keyword options (OBSERVERS)."""
        observers = {k: options.pop(k) for k in OBSERVERS if k in options}
        return self.generate(Request(prompts, **options), **observers)

    def img2img(
        self, prompts: str | list[str], init_image: Image.Image, strength: float = 0.75, **options
    ) -> list[Image.Image]:
        """`init_image` noised to the strength's timestep, then denoised towards the prompt; options as txt2img's."""
        return self.txt2img(prompts, init_image=init_image, strength=strength, **options)

    def inpaint(
        self, prompts: str | list[str], init_image: Image.Image, mask: Image.Image, strength: float = 1.0, **options
    ) -> list[Image.Image]:
        """Repaint where `mask` is white (grey: partly); options as txt2img's."""
        return self.txt2img(prompts, init_image=init_image, mask=mask, strength=strength, **options)

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
        image on a bigger canvas (ldm.images.outpaint_canvas: the new area pre-filled, a mask feathered over mask_blur
        pixels), inpainted with the prompt; the original's pixels come back exactly. Options as txt2img's."""
        options |= {"outpaint": padding, "mask_blur": mask_blur, "strength": strength}
        return self.txt2img(prompts, init_image=init_image, **options)

    def generate(self, request: Request, **watch) -> list[Image.Image]:
        """The images of `request` (ldm.request.Request: every setting); `watch`: sub_batches' keyword options, which
        watch the run and change no image."""
        return [image for batch in self.sub_batches(request, **watch) for image in batch]

    @torch.inference_mode()
    def sub_batches(
        self,
        request: Request,
        *,
        progress: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        trajectory: list[torch.Tensor] | None = None,
        control_maps: list[Image.Image] | None = None,
    ) -> Iterator[list[Image.Image]]:
        """The images of `request`, a sub-batch at a time as each is made (a front end writes them as they come).
        The keyword options watch the run and change no image: progress, a bar per sub-batch; callback(i, steps,
        z_t), called after step i (from 0) of each sub-batch's `steps` with its latents (a progress bar, previews; an
        exception it raises stops the run there; with the hires fix, both passes call it); trajectory, a list that
        receives z_t (the UNet's input latents) of every step (with the hires fix: of its second pass), then z_0, once
        the last sub-batch is made; control_maps, a list that receives the control maps used, one per control (at the
        output size)."""
        r = request.resolved(self.cfg)
        check_memory(r, self.cfg, self.device, self.dtype)
        embedded = embeds_guidance(self.cfg)  # its OpenVINO graph would take no guidance input
        if self.openvino is not None and (r.deepcache or r.controls or embedded):
            what = "deepcache" if r.deepcache else "ControlNet" if r.controls else "a model that embeds the guidance"
            raise InputError(f"{what} runs on the torch UNet, not with the OpenVINO backend")
        self.patch(r)
        if self.openvino is not None:
            self.openvino.prepare(self.model, self.version, self.taesd)  # converts only when the LoRAs changed
        images = mode_images(r, self.vae_factor)
        controls = tuple(replace(c, net=self.controlnet(c.net)) for c in r.controls)
        maps = [control_map(c, r.height, r.width) for c in controls]
        hints = [to_tensor(m).to(self.device, self.dtype) for m in maps]
        if control_maps is not None:
            control_maps += maps
        mode = mode_of(r, self.is_inpainting_model)
        unet = self.unet if self.openvino is None else self.openvino.unet
        per_image = [p for p in r.prompts for _ in range(r.n_samples)]
        rows = 1 if embedded else r.unet_rows  # a UNet that embeds the guidance runs on the prompts' rows alone
        batch = self.batch_size(len(per_image), *reversed(r.output_size(self.vae_factor)), rows)
        strength = 1.0 if r.strength is None else r.strength
        trajectories = []
        for first in range(0, len(per_image), batch):
            seeds = range(r.seed + first, r.seed + min(first + batch, len(per_image)))
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            run = Sampler(r.sampler, self.cfg, r.steps, strength, r.eta, self.device, r.schedule)
            prompts = per_image[first : first + batch]
            calls = r.steps * run.scheduler.order  # the prompt schedule's steps: A1111's total_steps (2N, Heun)
            conditioning = self.conditioner(
                prompts,
                r.negative_prompt,
                runs_unconditional(r, self.cfg),
                r.prompt_syntax,
                r.clip_skip,
                self.version,
                steps=calls,
            )
            # 1. the start latents and the mode's other random draws
            shape = self.cfg.vae.latent_shape(r.height, r.width)
            sub = mode(self.model, run, generators, shape, **images, strength=strength, taesd=self.taesd_encoder)
            denoiser = Denoiser(
                unet,
                conditioning,
                r,
                len(run.timesteps),
                sub.unet_input,
                controls,
                hints,
                self.cfg.learn_sigma,
                embedded,
            )
            trajectories.append([] if trajectory is not None else None)
            desc = None if not progress else f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
            watched = None if r.hires else trajectories[-1]
            latents = self.sample(sub, run, generators, denoiser, desc, watched, callback)
            if r.hires:
                latents = self.hires_pass(r, latents, seeds, prompts, unet, desc, trajectories[-1], callback, calls)
            yield to_pil(sub.finish(self.decode(latents)))  # 7.
        if trajectory is not None:
            trajectory += [torch.cat(step) for step in zip(*trajectories)]

    def sample(self, mode: Txt2Img, run: Sampler, generators, denoiser: Denoiser, desc, trajectory, callback):
        """Steps 2-6 of the loop in the module docstring for one sub-batch: its final latents z_0; desc: the progress
        bar's (None: no bar); trajectory, callback: generate's."""
        latents = mode.start
        for i, t in enumerate(tqdm(run.timesteps, desc=desc, disable=desc is None)):
            x = run.scale_input(latents, t)
            if trajectory is not None:
                trajectory.append(x)
            e = denoiser(x, t, i)  # 2. - 4.
            latents = run.step(e, t, latents, generators)  # 5.
            latents = mode.after_step(latents, i)  # 6.
            if callback is not None:
                callback(i, len(run.timesteps), latents)
        if trajectory is not None:
            trajectory.append(latents)
        return latents

    def hires_pass(
        self, r: Request, latents, seeds, prompts, unet, desc, trajectory, callback, first_pass: int
    ) -> torch.Tensor:
        """The hires fix's second pass on a sub-batch's first-pass latents (the images of `seeds` and `prompts`): its
        final latents. Upscaled in a latent mode, or decoded, resized (Lanczos) and encoded (a posterior sample drawn
        first from each image's generator, as diffusers' img2img); then img2img at hires_denoise, the last hires_steps
        steps of a longer schedule (ldm.request.hires_schedule). first_pass: the first pass's prompt-schedule steps
        (A1111 counts a prompt edit's step numbers from the first pass's start, its fractions from 1)."""
        width, height = r.output_size(self.vae_factor)
        shape = self.cfg.vae.latent_shape(height, width)
        generators = [torch.Generator().manual_seed(s) for s in seeds]  # A1111: the second pass's noise from the seeds
        if r.hires_upscaler in LATENT_UPSCALERS:
            how, antialias = LATENT_UPSCALERS[r.hires_upscaler]
            latents = F.interpolate(latents, size=shape[1:], mode=how, antialias=antialias)
        else:
            small = to_pil(self.decode(latents))
            pixels = [to_tensor(resized(image, width, height)) for image in small]
            latents = torch.cat(
                [encode_images(self.model, 2 * x - 1, [g], self.taesd_encoder) for x, g in zip(pixels, generators)]
            )
        schedule = hires_schedule(r.hires_steps, r.hires_denoise)
        run = Sampler(r.hires_sampler, self.cfg, *schedule, r.eta, self.device, r.schedule)  # A1111: the same schedule
        sub = Img2Img(self.model, run, generators, shape, latents=latents)
        hires_prompts = [r.hires_prompt] * len(prompts) if r.hires_prompt else prompts
        steps = (r.hires_steps or r.steps) * run.scheduler.order
        conditioning = self.conditioner(
            hires_prompts,
            r.negative_prompt,
            runs_unconditional(r, self.cfg),
            r.prompt_syntax,
            r.clip_skip,
            self.version,
            steps=steps,
            first_pass=first_pass,
        )
        denoiser = Denoiser(
            unet,
            conditioning,
            r,
            len(run.timesteps),
            sub.unet_input,
            learn_sigma=self.cfg.learn_sigma,
            guidance_input=embeds_guidance(self.cfg),
        )
        return self.sample(sub, run, generators, denoiser, desc and f"{desc}, hires", trajectory, callback)

    def batch_size(self, n: int, height: int, width: int, rows: int) -> int:
        """The images (at most n, at least 1) of one sub-batch: as many as the throughput knee (SUB_BATCH_LATENTS)
        allows, and at most what fits in batch_memory (estimate_memory of `rows` UNet rows per image)."""
        latents = (height // self.vae_factor) * (width // self.vae_factor)
        low, high = 1, min(n, max(1, SUB_BATCH_LATENTS // latents))
        fused = self.device.type == "cpu"  # SDPA's fused kernels: measured on CPU only
        tile = self.decode.tile
        while low < high:  # binary search for the largest b that fits
            mid = (low + high + 1) // 2
            need = estimate_memory(self.cfg, mid, height, width, rows, self.dtype.itemsize, tile, fused)
            fits = need <= self.batch_memory
            low, high = (mid, high) if fits else (low, mid - 1)
        return low

    def trajectory_strips(self, trajectory: list[torch.Tensor], frames: int = 8) -> list[Image.Image]:
        """One strip per image: z_t decoded at `frames` evenly spaced steps, from noise (left) to the result."""
        picks = sorted(set(np.linspace(0, len(trajectory) - 1, frames).round().astype(int).tolist()))
        decoded = [self.decode(trajectory[k]) for k in picks]
        return to_pil(torch.cat(decoded, dim=-1))

    def patch(self, request: Request) -> None:
        """The weights carry exactly the request's LoRAs and embeddings (ldm.patcher: from backups, each file read
        once; nothing happens when the set is the one applied); None keeps the set applied."""
        p = self.patcher
        p.apply(
            p.loras if request.loras is None else request.loras,
            p.embeddings if request.embeddings is None else request.embeddings,
        )

    def embedding_tokens(self, file: str | Path) -> list[str]:
        """The tokens of an embedding the weights carry (its trigger word first, then word_1, word_2...)."""
        applied = dict(zip((e.file for e in self.patcher.embeddings), self.patcher.tokens))
        return applied[Path(file).absolute()]

    def load_lora(self, path: str | Path, weight: float = 1.0, te_weight: float | None = None) -> None:
        """Merge a LoRA file into the weights beside those merged (ldm.lora: kohya / AUTOMATIC1111 with diffusers or
        CompVis names, diffusers / PEFT): W += weight * alpha / rank * up @ down, the text encoder's layers at
        te_weight when given. A bad file changes nothing."""
        self.patcher.apply([*self.patcher.loras, LoraSpec(path, weight, te_weight)], self.patcher.embeddings)

    def unload_loras(self) -> None:
        """The weights as they were before the first LoRA, bit for bit."""
        self.patcher.apply((), self.patcher.embeddings)

    def controlnet(self, net: ControlNet | str | Path) -> ControlNet:
        """A request's ControlNet: itself when loaded, else its file loaded (load_controlnet), once per path."""
        if not isinstance(net, (str, Path)):
            return net
        if str(net) not in self.controlnets:
            self.controlnets[str(net)] = self.load_controlnet(net)
        return self.controlnets[str(net)]

    def load_controlnet(self, path: str | Path) -> ControlNet:
        """A ControlNet file or diffusers folder (ldm.controlnet.load_controlnet) for this pipeline's model, on its
        device and in its dtype; use it in a request's controls: `Control(net, image, ...)` (ldm.request)."""
        return load_controlnet(path, self.cfg).to(self.device, self.dtype)

    def load_embedding(self, path: str | Path, token: str | None = None) -> list[str]:
        """A textual-inversion embedding (ldm.embeddings) as new words of the text encoder; returns its tokens (the
        trigger word: `token`, else the file's, else its stem)."""
        self.patcher.apply(self.patcher.loras, [*self.patcher.embeddings, EmbeddingSpec(path, token)])
        return self.embedding_tokens(path)


def load_pipeline(
    path: str | Path | None = None,
    device: str = "cpu",
    dtype=None,
    config=None,
    quantize: str | None = None,
    compile: bool = False,
    backend: str = "torch",
    backend_precision: str = "fp32",
    taesd: str | Path | None = None,
    taesd_encode: bool = False,
):
    """A checkpoint's models in eval mode, with txt2img / img2img / inpaint: `.unet .vae .text_encoder .tokenizer .cfg`.

    path: an original SD v1 single file (.safetensors, or .ckpt read without running code), one of our
    checkpoints, or a diffusers folder; None: the embedded emoji model (DEFAULT_MODEL). dtype: a torch dtype
    (default float32). config: the architecture (a ModelConfig), when a single file does not carry it.
    quantize="int8": a dynamic-int8 UNet (CPU, fp32); compile: torch.compile the UNet; backend="openvino": the UNet
    and VAE decoder run converted to OpenVINO in backend_precision (fp32, bf16, int8, default; see Pipeline).
    taesd: a TAESD file or folder (ldm.taesd) that decodes instead of the VAE, and encodes too with taesd_encode.
    An in-memory StableDiffusion model becomes a pipeline with `Pipeline(model)`.
    """
    model = load_model(DEFAULT_MODEL if path is None else path, config)
    model = model.to(device=device, dtype=torch.float32 if dtype is None else dtype).eval()
    tiny = None if taesd is None else load_taesd(taesd).to(device=device, dtype=next(model.parameters()).dtype)
    return Pipeline(
        model,
        quantize=quantize,
        compile=compile,
        backend=backend,
        backend_precision=backend_precision,
        taesd=tiny,
        taesd_encode=taesd_encode,
    ).eval()
