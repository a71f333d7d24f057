"""The latent cache holds what on-the-fly encoding computes, and is rebuilt exactly when its inputs change."""

import random

import torch
from PIL import Image

from conftest import randomize_
from ldm.cache import LatentCache, build_cache, cache_key
from ldm.data import ImageCaptionDataset, transform
from ldm.model import StableDiffusion


def make_folder(root, n=5):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 16), (50 * i, 100, 200 - 30 * i)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"colour {i}\nshade {i}")
    (root / "3.png").write_bytes(b"broken")
    return root


def test_cache_matches_on_the_fly_encoding(tmp_path, tiny_cfg):
    model = randomize_(StableDiffusion(tiny_cfg)).eval()
    ds = ImageCaptionDataset(make_folder(tmp_path / "data"), resolution=16, random_flip=True)
    folder = tmp_path / "cache" / cache_key(ds, model.vae, model.text_encoder)
    build_cache(ds, model.vae, model.text_encoder, folder, batch_size=2)
    cache = LatentCache(folder)
    assert len(cache) == 4 and [name for name, _ in cache.skipped] == ["3.png"]
    assert not list((tmp_path / "cache").glob(".*tmp"))
    with torch.no_grad():
        torch.testing.assert_close(cache.empty_context, model.text_encoder.encode("")[0])
        for seed in range(6):
            item = cache[(3, seed)]  # the fourth readable image: 4.png
            rng = random.Random(seed)
            caption = ["colour 4", "shade 4"][rng.randrange(2)]
            flip = rng.random() < 0.5
            posterior = model.vae.encode(
                transform(Image.open(tmp_path / "data" / "4.png").convert("RGB"), 16, True, flip, rng)[None]
            )
            torch.testing.assert_close(item["mean"], posterior.mean[0])
            torch.testing.assert_close(item["std"], posterior.std[0])
            torch.testing.assert_close(item["context"], model.text_encoder.encode(caption)[0])
            on_the_fly = ds[(4, seed)]
            assert on_the_fly["caption"] == caption  # the same choices for the same seed, cached or not


def test_cache_key_follows_encoder_text_resolution_and_data(tmp_path, tiny_cfg):
    model = randomize_(StableDiffusion(tiny_cfg))
    root = make_folder(tmp_path / "data")
    ds = ImageCaptionDataset(root, resolution=16)
    weights = {
        model.vae.decoder.conv_out.bias: False,
        model.vae.encoder.conv_in.bias: True,
        model.text_encoder.transformer.final_layer_norm.bias: True,
    }
    for weight, shapes_the_cache in weights.items():  # the decoder does not shape the latents
        key = cache_key(ds, model.vae, model.text_encoder)
        with torch.no_grad():
            weight.add_(1.0)
        assert (cache_key(ds, model.vae, model.text_encoder) != key) == shapes_the_cache
    key = cache_key(ds, model.vae, model.text_encoder)
    assert cache_key(ImageCaptionDataset(root, resolution=8), model.vae, model.text_encoder) != key
    assert cache_key(ImageCaptionDataset(root, resolution=16, random_flip=True), model.vae, model.text_encoder) != key
    (root / "1.txt").write_text("a new caption")
    assert cache_key(ImageCaptionDataset(root, resolution=16), model.vae, model.text_encoder) != key
