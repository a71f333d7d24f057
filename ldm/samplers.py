"""Samplers: diffusers' schedulers behind one thin adapter (their update rules are not re-derived here).

A sampler name picks a scheduler class and the options that make it that sampler. The noise schedule
and what the UNet predicts (eps, v or x0) come from the model's config, written as the scheduler config
SD v1 ships (scaled-linear betas 0.00085..0.012 over 1000 steps, steps_offset 1).
"""

from __future__ import annotations

import inspect

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from ldm.config import ModelConfig
from ldm.diffusion import scheduler_config

DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# name: (scheduler class, options, the name AUTOMATIC1111 writes in its PNG parameters)
SAMPLERS = {
    "ddim": (DDIMScheduler, {}, "DDIM"),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}, "PLMS"),
    "euler": (EulerDiscreteScheduler, {}, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "heun": (HeunDiscreteScheduler, {}, "Heun"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, DPMPP_2M, "DPM++ 2M"),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, DPMPP_2M | {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC"),
    "ddpm": (DDPMScheduler, {}, "DDPM"),
}


def make_scheduler(name: str, cfg: ModelConfig):
    """The diffusers scheduler that is sampler `name` for a model of this config."""
    cls, options, _ = SAMPLERS[name]
    config = scheduler_config(cfg) | options
    if cls is PNDMScheduler and cfg.parameterization == "x0":
        config["prediction_type"] = "epsilon"  # PNDM takes eps or v: Sampler.step converts x0 to eps
    return cls.from_config(config)


# the samplers whose scheduler can follow a zero-terminal-SNR schedule (PNDM's and Heun's cannot)
ZERO_SNR_SAMPLERS = [
    name
    for name, (cls, _, _) in SAMPLERS.items()
    if "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters
]


def check_sampler(name: str, cfg: ModelConfig, error: type[Exception] = ValueError, label: str = "sampler") -> None:
    """Raise error(one line naming `label`) unless sampler `name` exists and can follow the model's noise schedule."""
    if name not in SAMPLERS:
        raise error(f"unknown {label} '{name}' (known: {', '.join(SAMPLERS)})")
    if cfg.rescale_betas_zero_snr and name not in ZERO_SNR_SAMPLERS:
        raise error(
            f"{label} '{name}' cannot sample this model: its scheduler cannot follow a zero-terminal-SNR "
            f"schedule (use {', '.join(ZERO_SNR_SAMPLERS)})"
        )


class Sampler:
    """One sampling run: the timesteps to visit and the scheduler calls a denoising loop makes.

    strength < 1 starts part-way (img2img): the first (1 - strength) of the steps are skipped, as in
    diffusers' img2img pipelines. Random draws (ancestral / stochastic steps) come from one CPU generator
    per image, so image k of a batch gets the same noise as when it is made alone.
    """

    def __init__(self, name: str, cfg: ModelConfig, steps: int, strength: float = 1.0, eta: float = 0.0, device="cpu"):
        self.scheduler = make_scheduler(name, cfg)
        self.scheduler.set_timesteps(steps, device=device)
        start = (steps - min(int(steps * strength), steps)) * self.scheduler.order
        self.timesteps = self.scheduler.timesteps[start:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        self.init_noise_sigma = self.scheduler.init_noise_sigma
        accepts = inspect.signature(self.scheduler.step).parameters
        self.step_kwargs = {"eta": eta} if "eta" in accepts else {}
        self.takes_generator = "generator" in accepts
        self.x0_to_eps = isinstance(self.scheduler, PNDMScheduler) and cfg.parameterization == "x0"
        # a learned variance: only DDPM samples with it
        self.drop_variance = cfg.learn_sigma and not isinstance(self.scheduler, DDPMScheduler)

    def scale_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's input for x_t (x_t / sqrt(sigma^2 + 1) for the sigma-based samplers, else x_t)."""
        return self.scheduler.scale_model_input(x, t)

    def step(
        self, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """x_t -> x_{t-1} (the next timestep's sample)."""
        if self.drop_variance:
            model_output = model_output[:, : x.shape[1]]
        if self.x0_to_eps:
            # eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t),
            # from x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
            alpha_bar = self.scheduler.alphas_cumprod.to(x.device)[t].to(x.dtype)
            model_output = (x - alpha_bar.sqrt() * model_output) / (1 - alpha_bar).sqrt()
        kwargs = self.step_kwargs | ({"generator": generators} if self.takes_generator else {})
        return self.scheduler.step(model_output, t, x, **kwargs, return_dict=False)[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0): x0 noised to timestep t with the given noise."""
        return self.scheduler.add_noise(x0, noise, t.reshape(1))
