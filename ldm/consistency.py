"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"): the loss that teaches a UNet to
jump from any point of the guided probability-flow ODE to its end in one call, so that the `lcm` sampler draws an image
in 1-4 steps. Three networks meet in it, in one of two forms (one solver, boundary condition and loss for both):

    LoRAForm (diffusers' train_lcm_distill_lora_sd_wds.py): the student is the UNet with its LoRAs, the teacher the
        same UNet with them off, the target the student's own prediction, without a gradient;
    FullForm (their train_lcm_distill_sd_wds.py): the student is the whole UNet given the guidance w through its
        w-embedding (ldm.unet.UNetModel.time_cond_proj, zero at first), the teacher a frozen copy of the UNet it
        started from, the target a network that follows the student as an exponential moving average (LCM's
        "target LCM", decay lcm.target_decay). Their script leaves the new cond_proj at nn.Linear's random start; here
        it starts at zero, so the student starts as its teacher.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from ldm.config import ConfigError, LCMTrainConfig
from ldm.diffusion import Diffusion
from ldm.ema import lerp_towards
from ldm.unet import UNetModel

SIGMA_DATA = 0.5  # of the boundary conditions, as in consistency models (Song et al. 2023)


@contextlib.contextmanager
def loras_off(loras: nn.ModuleDict):
    """A block in which the LoRAs of ldm.lora.add_lora add nothing: the frozen base model, the teacher."""
    scales = [lora.scale for lora in loras.values()]
    for lora in loras.values():
        lora.scale = 0.0
    try:
        yield
    finally:
        for lora, scale in zip(loras.values(), scales):
            lora.scale = scale


class LoRAForm:
    """The networks of the LoRA form, from a ldm.training.LoRATrainable; w goes to the teacher alone."""

    def __init__(self, trainable):
        self.trainable, self.unet = trainable, trainable.model.unet

    def student(self, x, t, context, w):
        return self.trainable.predict(x, t, context, None)

    def teacher(self, x, t, context):
        with loras_off(self.trainable.module):
            return self.unet(x, t, context)

    def target(self, x, t, context, w):
        return self.unet(x, t, context)


class FullForm:
    """The networks of the full form, from a ldm.training.UNetTrainable of a UNet with the w-embedding and the frozen
    `teacher` UNet (the student's start, without it), on `device`. The target network starts as the student;
    update() after each optimizer step moves it: theta^- <- mu theta^- + (1 - mu) theta (LCM, Algorithm 1), mu =
    `decay`."""

    def __init__(self, trainable, teacher: UNetModel, decay: float, device: torch.device):
        self.trainable, self.decay = trainable, decay
        self.teacher_unet = teacher.requires_grad_(False).eval().to(device)
        self.target_unet = copy.deepcopy(trainable.module).requires_grad_(False).eval().to(device)

    def student(self, x, t, context, w):
        return self.trainable.ddp[0](x, t, context, guidance=w.flatten())

    def teacher(self, x, t, context):
        return self.teacher_unet(x, t, context)

    def target(self, x, t, context, w):
        return self.target_unet(x, t, context, guidance=w.flatten())

    def update(self) -> None:
        lerp_towards(list(self.target_unet.parameters()), list(self.trainable.module.parameters()), self.decay)


class LatentConsistency:
    """The skipping-step DDIM solver's grid, the boundary conditions and the distillation loss of one model."""

    def __init__(self, diffusion: Diffusion, cfg: LCMTrainConfig):
        if diffusion.learn_sigma:
            raise ConfigError("latent consistency distillation (--lcm) distills a model without learn_sigma")
        self.diffusion, self.cfg = diffusion, cfg
        self.k = diffusion.timesteps // cfg.solver_steps  # the skip: 1000 // 50 = 20
        self.grid = torch.arange(1, cfg.solver_steps + 1) * self.k - 1  # t_{n+k} in 19, 39, ..., 999

    def draw(self, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, from its own generator: t_{n+k}, a point of the solver's grid, and the guidance
        w ~ U[w_min, w_max]. -> (t, w), shapes (B,) and (B, 1, 1, 1)."""
        t = torch.stack([self.grid[torch.randint(0, len(self.grid), (), generator=g)] for g in generators])
        u = torch.stack([torch.rand((), generator=g) for g in generators])
        return t, (self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * u).reshape(-1, 1, 1, 1)

    def boundary(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out(t) = s t / sqrt((s t)^2 + sigma_data^2), with the
        timestep scaling s (10): c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x (LCM sec. 3, the consistency function's
        boundary condition). Shaped (B, 1, 1, 1) in x's dtype and device."""
        st = self.cfg.timestep_scaling * t.double()
        c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
        c_out = st / (st**2 + SIGMA_DATA**2).sqrt()
        return tuple(c.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1) for c in (c_skip, c_out))

    def consistency(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, c, t) = c_skip(t) x + c_out(t) x0^(x, t), x0^ the UNet's prediction of x_0 (LCM sec. 4.1)."""
        c_skip, c_out = self.boundary(t, x)
        return c_skip * x + c_out * self.diffusion.predict_x0(out, x, t)

    def eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction: eps^ = (x_t - sqrt(abar_t) x0^) / sqrt(1 - abar_t), as its own output for an
        eps model."""
        if self.diffusion.parameterization == "eps":
            return out
        ab = self.diffusion._at(self.diffusion.alphas_cumprod, t, x)
        return (x - ab.sqrt() * self.diffusion.predict_x0(out, x, t)) / (1.0 - ab).sqrt()

    def loss(self, nets: LoRAForm | FullForm, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, context, uncond):
        """One step of latent consistency distillation at x = z_{t_{n+k}} ~ q(z_t | z_0) on the solver's grid
        (`uncond`: the empty prompt's states for every sample). -> the mean pseudo-Huber distance between the
        student's f(z_{t_{n+k}}, w, t_{n+k}) and the target's f(z^_{t_n}, w, t_n)."""
        diffusion = self.diffusion
        student = self.consistency(nets.student(x, t, context, w), x, t)
        t_n = (t - self.k).clamp(min=0)
        with torch.no_grad():
            cond, free = nets.teacher(x, t, context), nets.teacher(x, t, uncond)
            # the guided teacher (LCM sec. 4.2) in the recipe's form e~ = e(c) + w (e(c) - e(0)), for x0^ and eps^ alike
            x0_c, x0_u = diffusion.predict_x0(cond, x, t), diffusion.predict_x0(free, x, t)
            eps_c, eps_u = self.eps(cond, x, t), self.eps(free, x, t)
            x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
            # one DDIM step back k timesteps (LCM sec. 4.3; Song et al. 2021 eq. 12 with sigma = 0):
            # z^_{t_n} = sqrt(abar_{t_n}) x0^ + sqrt(1 - abar_{t_n}) eps^
            ab = diffusion._at(diffusion.alphas_cumprod, t_n, x)
            x_n = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
            target = self.consistency(nets.target(x_n, t_n, context, w), x_n, t_n)
        # d(a, b) = sqrt((a - b)^2 + c^2) - c, the pseudo-Huber metric (Song & Dhariwal 2023), averaged
        c = self.cfg.huber_c
        return (((student.float() - target.float()) ** 2 + c**2).sqrt() - c).mean()
