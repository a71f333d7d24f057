"""The denoiser: (x, t, step) -> the guided noise prediction the sampler steps with, for one sub-batch.

    residuals = sum over the ControlNets acting at this step      (ldm.controlnet.control_residuals)
    e_u, e_c  = UNet([x, x], t, [c_neg, c], residuals)            cond and uncond in one batched call (or OpenVINO)
    e         = e_u + s (e_c - e_u)                               classifier-free guidance (Ho & Salimans 2022, eq. 6)
    e         = phi e std(e_c) / std(e) + (1 - phi) e             guidance rescale (Lin et al. 2024, eq. 15-16)

AND (A1111's composable diffusion: Liu et al. 2022, "Compositional Visual Generation with Composable Diffusion
Models", the conjunction; A1111's combine_denoised adds the guidance scale s) runs one conditional row per sub-prompt
c_i of weight w_i, all in the one batched UNet call with the negative prompt's row:

    e_c       = e_u + sum_i w_i (e_c_i - e_u)                     so e = e_u + s sum_i w_i (e_c_i - e_u)

CFG truncation: guidance runs on steps 0 .. int(N * cfg_end) of the N steps, and after them the UNet sees the
conditional half alone (e = e_c), as diffusers' "dynamic classifier-free guidance" callback does (it keeps
prompt_embeds.chunk(2)[-1] and sets the guidance scale to 0 at the end of step int(N * cfg_end)). DeepCache
(ldm.unet.DeepCache) caches the UNet's deep features between its full calls; the guidance's end halves the batch,
so the cache starts again there.

A UNet that embeds the guidance scale (LCM distilled into the whole UNet, ModelConfig.unet.time_cond_proj_dim) runs
on the prompts alone at any scale, w = s - 1 given to it, as diffusers' pipelines run one (their
LatentConsistencyModelPipeline and StableDiffusionPipeline: no unconditional batch, no negative prompt):

    e         = UNet(x, t, c, w = s - 1)
"""

from __future__ import annotations

from typing import Callable

import torch

from ldm.conditioning import Conditioning
from ldm.config import ModelConfig
from ldm.controlnet import control_residuals
from ldm.request import Control, InputError, Request
from ldm.unet import DeepCache


def embeds_guidance(cfg: ModelConfig) -> bool:
    """The model's UNet takes the guidance scale as an input (LCM's w-embedding) instead of an unconditional batch."""
    return cfg.unet.time_cond_proj_dim is not None


def runs_unconditional(request: Request, cfg: ModelConfig) -> bool:
    """Classifier-free guidance's unconditional batch runs: the request is guided (scale != 1) and the model's UNet
    does not embed the scale."""
    return request.guided and not embeds_guidance(cfg)


class Denoiser:
    """unet(x, t, context, **extra): the torch UNet (extra: control residuals, a DeepCache) or a stand-in taking
    (x, t, context) only (the OpenVINO backend); conditioning: the sub-batch's contexts; request: a resolved
    ldm.request.Request (its scale, guidance_rescale, cfg_end, guess_mode, deepcache and deepcache_branch); steps: N,
    the steps of the run; unet_input: the mode's (the 9-channel inpainting UNet's input); controls: the request's with
    their nets loaded, hints their maps (1, 3, H, W) in [0, 1]; learn_sigma: the UNet also predicts a variance, which
    stays the conditional branch's (as DiT samples); guidance_input: the UNet embeds the guidance scale
    (embeds_guidance: the conditioning is then unguided)."""

    def __init__(
        self,
        unet: Callable,
        conditioning: Conditioning,
        request: Request,
        steps: int,
        unet_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
        controls: tuple[Control, ...] = (),
        hints: list[torch.Tensor] = (),
        learn_sigma: bool = False,
        guidance_input: bool = False,
    ):
        self.unet, self.conditioning, self.request, self.steps = unet, conditioning, request, steps
        self.unet_input, self.controls, self.hints = unet_input, controls, hints
        self.learn_sigma = learn_sigma
        self.w = torch.tensor([request.scale - 1.0]) if guidance_input else None  # LCM's form of the scale
        self.last_guided = int(steps * request.cfg_end) if conditioning.guided else -1
        self.cache = self.new_cache()
        self.rows = self.weights = None
        if conditioning.weights is not None:  # AND: the image of each row of the context, each sub-prompt's weight
            if guidance_input:
                raise InputError(
                    "AND needs the negative prompt's prediction: not with a model that embeds the guidance"
                )
            if self.last_guided < steps - 1 or request.guess_mode:
                raise InputError("AND needs the negative prompt's prediction on every step: cfg end 1, no guess mode")
            device = conditioning.context(0).device
            images = [i for i, weights in enumerate(conditioning.weights) for _ in weights]
            self.rows = torch.tensor([*range(len(conditioning.weights)), *images], device=device)
            self.weights = torch.tensor([w for weights in conditioning.weights for w in weights], device=device)

    def new_cache(self) -> DeepCache | None:
        """A DeepCache for the request's deepcache interval and branch (None without)."""
        r = self.request
        return DeepCache(r.deepcache, r.deepcache_branch) if r.deepcache else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """The noise prediction for latents x (the sampler's scaled input) at timestep t, step `step` (0-based)."""
        context = self.conditioning.context(step)
        guided = step <= self.last_guided
        if self.conditioning.guided and not guided:  # past cfg_end: the conditional half alone
            context = context.chunk(2)[1]
            if step == self.last_guided + 1:
                self.cache = self.new_cache()
        residuals = None
        if self.controls:  # AND: one row per context row, each with the residuals
            residuals = control_residuals(
                self.controls,
                self.hints,
                x if self.rows is None else x[self.rows],
                t,
                step,
                self.steps,
                context,
                self.request.guess_mode,
            )
        # only what is set, so that a UNet stand-in taking (x, t, context) still works
        extra = {k: v for k, v in (("control", residuals), ("cache", self.cache)) if v is not None}
        x = self.unet_input(x)
        if self.w is not None:  # never guided (embeds_guidance)
            extra["guidance"] = self.w.expand(len(x))
        if not guided:
            return self.unet(x, t, context, **extra)
        out = self.unet(torch.cat([x, x]) if self.rows is None else x[self.rows], t, context, **extra)
        e_uncond, e_cond = out[: len(x)], out[len(x) :]
        variance = None
        if self.learn_sigma:  # guide the prediction; the variance is the conditional branch's (as DiT samples)
            (e_uncond, _), (e_cond, variance) = e_uncond.chunk(2, dim=1), e_cond.chunk(2, dim=1)
        if self.rows is not None:  # AND: e_c = e_u + sum_i w_i (e_c_i - e_u); the variance the first sub-prompt's
            images = self.rows[len(x) :]
            weights = self.weights.to(e_cond.dtype).view(-1, 1, 1, 1)
            e_cond = e_uncond.index_add(0, images, weights * (e_cond - e_uncond[images]))
            if variance is not None:  # the row of each image's first sub-prompt (the rows go image by image)
                variance = variance[torch.searchsorted(images, torch.arange(len(x), device=images.device))]
        e = e_uncond + self.request.scale * (e_cond - e_uncond)
        phi = self.request.guidance_rescale
        if phi:
            # guidance rescale (Lin et al. 2024, eq. 15-16): e_r = e * std(e_cond) / std(e); e = phi e_r + (1 - phi) e
            e_rescaled = e * (e_cond.std(dim=(1, 2, 3), keepdim=True) / e.std(dim=(1, 2, 3), keepdim=True))
            e = phi * e_rescaled + (1 - phi) * e
        return e if variance is None else torch.cat([e, variance], dim=1)
