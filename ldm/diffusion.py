"""The diffusion process as training sees it: the noise schedule, q(x_t | x_0), the targets and the loss.

Notation of Ho et al. 2020 (DDPM): beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s <= t} alpha_s,
SNR(t) = abar_t / (1 - abar_t). The betas come from diffusers' DDPMScheduler built from the same ModelConfig fields
(`beta_schedule` is one of diffusers' names), so training and every diffusers sampler agree on the schedule to the
last bit.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from ldm.config import ModelConfig, check

PARAMETERIZATION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_SCHEDULES = (
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
)  # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal


def scheduler_config(cfg: ModelConfig) -> dict:
    """The model's noise schedule as one diffusers scheduler config: SD v1's PNDM/PLMS (its scheduler_config.json),
    plus a timestep spacing (SD-Turbo's trailing) and the options of a zero-terminal-SNR or learned-variance model.
    The training schedule (DDPM), every sampler and an exported diffusers folder are built from it: from_config
    drops what a scheduler class does not take."""
    config = {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": cfg.timesteps,
        "beta_start": cfg.linear_start,
        "beta_end": cfg.linear_end,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": PARAMETERIZATION_TO_DIFFUSERS[cfg.parameterization],
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    }
    if cfg.timestep_spacing:
        config["timestep_spacing"] = cfg.timestep_spacing
    if cfg.rescale_betas_zero_snr:  # Lin et al. 2023: the schedule ends in pure noise, sampling starts at its last step
        config |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    if cfg.learn_sigma:  # improved DDPM: the UNet's own variance, log s^2 = v log b_t + (1 - v) log b~_t (for DDPM)
        config["variance_type"] = "learned_range"
    return config


def noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """diffusers' DDPM scheduler of this model."""
    return DDPMScheduler.from_config(scheduler_config(cfg))


def check_model_config(cfg: ModelConfig) -> None:
    """The objective fields of a ModelConfig that training can use; raises ConfigError naming the field."""
    check(
        cfg.beta_schedule in BETA_SCHEDULES,
        f"model.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {cfg.beta_schedule!r}",
    )
    check(
        cfg.parameterization in PARAMETERIZATION_TO_DIFFUSERS,
        f"model.parameterization must be eps, v or x0, got {cfg.parameterization!r}",
    )
    check(cfg.timesteps >= 2, f"model.timesteps must be >= 2, got {cfg.timesteps}")
    check(
        not (cfg.rescale_betas_zero_snr and cfg.parameterization == "eps"),
        "model.rescale_betas_zero_snr needs parameterization v or x0: "
        "at zero terminal SNR an eps-model cannot recover x0",
    )
    out = 2 * cfg.vae.embed_dim if cfg.learn_sigma else cfg.vae.embed_dim
    check(
        cfg.unet.out_channels == out,
        f"model.unet.out_channels must be {out} (learn_sigma={cfg.learn_sigma}, vae.embed_dim={cfg.vae.embed_dim})",
    )


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x, mean, logvar):
    """-log N(x; mean, e^logvar), elementwise."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


class Diffusion:
    """Forward process, prediction targets and the training loss of one ModelConfig (computed in float64, used in
    the input's dtype)."""

    def __init__(self, cfg: ModelConfig):
        check_model_config(cfg)
        self.timesteps, self.parameterization, self.learn_sigma = cfg.timesteps, cfg.parameterization, cfg.learn_sigma
        self.betas = noise_scheduler(cfg).betas.double()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta~_t), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        # (Ho et al. eq. 6-7)
        variance = self.betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: use beta~_1 (improved DDPM)
        self.posterior_log_variance = torch.log(torch.cat([variance[1:2], variance[1:]]))
        self.posterior_mean_coef1 = self.betas * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - self.betas).sqrt() / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """values[t] shaped (B, 1, 1, 1) in x's dtype and device."""
        return values[t.cpu()].to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Ho et al. eq. 4)."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0  (Salimans & Ho 2022, sec. 4)."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * noise - (1.0 - ab).sqrt() * x0

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return {"eps": noise, "v": self.velocity(x0, t, noise), "x0": x0}[self.parameterization]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[t.cpu()]
        return (ab / (1.0 - ab)).float().to(t.device)

    def loss_weight(self, t: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) on the x0 error, expressed for each target.

        ||eps - eps^||^2 = SNR ||x0 - x0^||^2 and ||v - v^||^2 = (SNR + 1) ||x0 - x0^||^2, so the weight is
        min(SNR, gamma) / SNR for eps (= 1 at SNR 0), min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0.
        """
        if min_snr_gamma == 0:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        return {"eps": torch.clamp(min_snr_gamma / snr, max=1.0), "v": clipped / (snr + 1.0), "x0": clipped}[
            self.parameterization
        ]

    def predict_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self._at(self.alphas_cumprod, t, x_t)
        if self.parameterization == "eps":
            return (x_t - (1.0 - ab).sqrt() * out) / ab.sqrt()
        if self.parameterization == "v":
            return ab.sqrt() * x_t - (1.0 - ab).sqrt() * out
        return out

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance, t, x_t).expand_as(x_t)

    def p_mean_log_variance(self, out: torch.Tensor, var_values: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """p(x_{t-1} | x_t): the posterior mean at the predicted x0, and the learned log variance
        log sigma^2 = v log beta_t + (1 - v) log beta~_t with v = (output + 1) / 2  (Nichol & Dhariwal eq. 15)."""
        frac = (var_values + 1.0) / 2.0
        log_variance = frac * self._at(self.betas.log(), t, x_t) + (1.0 - frac) * self._at(
            self.posterior_log_variance, t, x_t
        )
        return self.q_posterior(self.predict_x0(out, x_t, t), x_t, t)[0], log_variance

    def vlb(
        self, out: torch.Tensor, var_values: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L_t of the variational bound in bits per dimension, per sample (Nichol & Dhariwal eq. 4-6):
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and -log p(x_0 | x_1) for t = 0. That last term is
        a continuous Gaussian here: latents are not 8-bit pixels, so improved DDPM's discretized decoder does not
        apply."""
        true_mean, true_log_variance = self.q_posterior(x0, x_t, t)
        mean, log_variance = self.p_mean_log_variance(out, var_values, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=(1, 2, 3))
        nll = gaussian_nll(x0, mean, log_variance).mean(dim=(1, 2, 3))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def loss(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        min_snr_gamma: float = 0.0,
        vlb_weight: float = 0.001,
    ) -> torch.Tensor:
        """Per-sample loss in float32: the min-SNR-weighted MSE to the target, plus, when the variance is learned,
        lambda * T * L_t (L_hybrid = L_simple + lambda L_vlb, Nichol & Dhariwal sec. 3.1; one uniform t estimates
        L_vlb = T E_t[L_t]). The VLB term sees the mean detached, so it trains the variance alone, as in improved
        DDPM."""
        model_output, x0, x_t, noise = model_output.float(), x0.float(), x_t.float(), noise.float()
        out, var_values = model_output.chunk(2, dim=1) if self.learn_sigma else (model_output, None)
        loss = ((out - self.target(x0, t, noise)) ** 2).mean(dim=(1, 2, 3)) * self.loss_weight(t, min_snr_gamma)
        if self.learn_sigma:
            loss = loss + vlb_weight * self.timesteps * self.vlb(out.detach(), var_values, x0, x_t, t)
        return loss
