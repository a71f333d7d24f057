"""Samplers: diffusers' schedulers behind one thin adapter (their update rules are not re-derived here).

A sampler name picks a scheduler class and the options that make it that sampler; a schedule (A1111's "Schedule
type") picks where its steps fall, by the options diffusers documents for it ("Noise schedules and schedule types"
in its scheduler overview): karras `use_karras_sigmas`, exponential `use_exponential_sigmas` on `linspace` spacing,
sgm_uniform `trailing` spacing. The noise schedule and what the UNet predicts (eps, v or x0) come from the model's
config, written as the scheduler config SD v1 ships (scaled-linear betas 0.00085..0.012 over 1000 steps,
steps_offset 1).

Random draws come from one CPU generator per image. DPM++ SDE draws its noise from a Brownian tree (torchsde)
instead: one tree per image, seeded with the image's seed (its generator's initial seed), as AUTOMATIC1111 seeds
it, so image k of a batch still gets the noise it gets alone.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from ldm.config import ModelConfig
from ldm.diffusion import scheduler_config

DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
# name: (scheduler class, options, the name AUTOMATIC1111 writes in its PNG parameters). The A1111 <-> diffusers
# pairs are diffusers' scheduler overview's; "DPM++ 2S a" has no exact twin there ("very similar to
# DPMSolverSinglestepScheduler"): its stochastic SDE variant, which diffusers added for it (diffusers#4167, #8269).
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
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, SDE, "DPM++ 2M SDE"),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}, "DPM++ SDE"),
    "dpmpp_2s_a": (DPMSolverSinglestepScheduler, SDE, "DPM++ 2S a"),
    "dpm2": (KDPM2DiscreteScheduler, {}, "DPM2"),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}, "DPM2 a"),
    "lms": (LMSDiscreteScheduler, {}, "LMS"),
    "lcm": (LCMScheduler, {}, "LCM"),  # its own defaults: original_inference_steps 50, timestep_scaling 10
}

# schedule: (the options that make it, the label AUTOMATIC1111 shows and writes as "Schedule type")
SCHEDULE_OPTIONS = {
    "default": ({}, "Automatic"),  # the sampler's own
    "karras": ({"use_karras_sigmas": True}, "Karras"),
    "exponential": ({"use_exponential_sigmas": True, "timestep_spacing": "linspace"}, "Exponential"),
    "sgm_uniform": ({"timestep_spacing": "trailing"}, "SGM Uniform"),
}
SCHEDULES = {name: label for name, (_, label) in SCHEDULE_OPTIONS.items()}
# the samplers whose step cannot take an x0 prediction (diffusers raises "prediction_type not implemented yet")
EPS_OR_V_ONLY = (DPMSolverSDEScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler)


def schedules_of(name: str) -> list[str]:
    """The schedules sampler `name` takes: default, and each whose first option its scheduler reads (LCM takes a
    timestep_spacing but its steps are its own grid's); an alias that fixes one (dpmpp_2m_karras) takes that one."""
    cls, options, _ = SAMPLERS[name]
    fixed = [s for s, (o, _) in SCHEDULE_OPTIONS.items() if o and o.items() <= options.items()]
    if fixed:
        return ["default", *fixed]
    reads = set(inspect.signature(cls.__init__).parameters) - ({"timestep_spacing"} if cls is LCMScheduler else set())
    return [s for s, (o, _) in SCHEDULE_OPTIONS.items() if not o or next(iter(o)) in reads]


def make_scheduler(name: str, cfg: ModelConfig, schedule: str = "default"):
    """The diffusers scheduler that is sampler `name` on `schedule` for a model of this config."""
    cls, options, _ = SAMPLERS[name]
    config = scheduler_config(cfg) | options | SCHEDULE_OPTIONS[schedule][0]
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
    """Raise error(one line naming `label`) unless sampler `name` exists and can follow the model's noise schedule
    and parameterization."""
    if name not in SAMPLERS:
        raise error(f"unknown {label} '{name}' (known: {', '.join(SAMPLERS)})")
    if cfg.rescale_betas_zero_snr and name not in ZERO_SNR_SAMPLERS:
        raise error(
            f"{label} '{name}' cannot sample this model: its scheduler cannot follow a zero-terminal-SNR "
            f"schedule (use {', '.join(ZERO_SNR_SAMPLERS)})"
        )
    if cfg.parameterization == "x0" and issubclass(SAMPLERS[name][0], EPS_OR_V_ONLY):
        raise error(f"{label} '{name}' cannot sample this model: its scheduler takes eps or v predictions, not x0")


def check_schedule(name: str, schedule: str, error: type[Exception] = ValueError, label: str = "schedule") -> None:
    """Raise error(one line naming `label`) unless sampler `name` takes `schedule`."""
    if schedule not in SCHEDULE_OPTIONS:
        raise error(f"unknown {label} '{schedule}' (known: {', '.join(SCHEDULE_OPTIONS)})")
    if schedule not in schedules_of(name):
        raise error(f"{label} {schedule}: the {name} sampler takes {', '.join(schedules_of(name))}")


def grid_steps(name: str) -> int | None:
    """The most steps sampler `name` takes when it steps on a grid of its own (LCM: original_inference_steps of the
    training timesteps, its steps picked among them), else None."""
    cls, options, _ = SAMPLERS[name]
    parameter = inspect.signature(cls.__init__).parameters.get("original_inference_steps")
    return None if parameter is None else options.get("original_inference_steps", parameter.default)


class Sampler:
    """One sampling run: the timesteps to visit and the scheduler calls a denoising loop makes.

    strength < 1 starts part-way (img2img): the first (1 - strength) of the steps are skipped, as in
    diffusers' img2img pipelines. Random draws (ancestral / stochastic steps) come from one CPU generator
    per image (DPM++ SDE's from one Brownian tree per image, seeded with its generator's seed), so image k
    of a batch gets the same noise as when it is made alone.
    """

    def __init__(
        self,
        name: str,
        cfg: ModelConfig,
        steps: int,
        strength: float = 1.0,
        eta: float = 0.0,
        device="cpu",
        schedule: str = "default",
    ):
        self.scheduler = make_scheduler(name, cfg, schedule)
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
        if isinstance(self.scheduler, DPMSolverSDEScheduler):  # read when it makes its trees, at the first step
            self.scheduler.noise_sampler_seed = [g.initial_seed() for g in generators]
        kwargs = self.step_kwargs | ({"generator": generators} if self.takes_generator else {})
        return self.scheduler.step(model_output, t, x, **kwargs, return_dict=False)[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0): x0 noised to timestep t with the given noise."""
        return self.scheduler.add_noise(x0, noise, t.reshape(1))
