"""The latent and text-embedding cache: encode a dataset once, then train the UNet without the VAE encoder.

For every readable image the VAE posterior's mean and std are stored (of its mirror image too with
random_flip), so training from the cache still samples z = mean + std * noise; every distinct caption and
the empty prompt are encoded once. A dataset with control maps (ControlNet training) has them stored too, as bytes.
A cache lives in <cache_dir>/<key>/ where the key hashes the VAE
encoder's and the text encoder's weights, the resolution, the flip setting and the dataset's fingerprint:
change any of them and a new cache is built, while runs that agree share one. It is written to a temporary
folder and renamed into place, so a killed build leaves nothing half-written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from ldm.data import DataError, ImageCaptionDataset, choose, transform, unreadable
from ldm.text_encoder import FrozenTextEncoder
from ldm.vae import AutoencoderKL

VERSION = 1


def _hash_weights(h, module: nn.Module) -> None:
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def cache_key(dataset: ImageCaptionDataset, vae: AutoencoderKL, text_encoder: FrozenTextEncoder) -> str:
    """What the cached tensors depend on: encoder weights (not the decoder's), text model, resolution, flip, data."""
    h = hashlib.sha256(json.dumps([VERSION, dataset.resolution, dataset.random_flip, dataset.fingerprint()]).encode())
    for module in (vae.encoder, vae.quant_conv, text_encoder):
        _hash_weights(h, module)
    return h.hexdigest()[:20]


def _decode(dataset: ImageCaptionDataset, flips: tuple[bool, ...], indices: list[int]):
    """DataLoader collate_fn: decode a chunk of images (center crop, and mirrored)
    -> (pixels, control maps as uint8 or None, captions, names, skipped)."""
    pixels, hints, captions, names, skipped = [], [], [], [], []
    for i in indices:
        try:
            img, caps = dataset.read(i)
        except Exception as e:  # a corrupt file can raise almost anything inside a decoder
            skipped.append((dataset.name(i), unreadable(e)))
            continue
        pixels.append(torch.stack([transform(img, dataset.resolution, True, flip, random.Random(0)) for flip in flips]))
        if dataset.control:
            crop = random.Random(0).getstate()
            hint = [dataset.control_map(i, p, flip, crop) for p, flip in zip(pixels[-1], flips)]
            hints.append((torch.stack(hint) * 255).round().byte())
        captions.append(caps)
        names.append(dataset.name(i))
    return (torch.stack(pixels) if pixels else None), (torch.stack(hints) if hints else None), captions, names, skipped


@torch.no_grad()
def build_cache(
    dataset: ImageCaptionDataset,
    vae: AutoencoderKL,
    text_encoder: FrozenTextEncoder,
    folder: Path,
    batch_size: int = 16,
    num_workers: int = 0,
    progress=lambda it: it,
) -> None:
    """Encode `dataset` into `folder` (written beside it, then renamed): latents.safetensors, text.safetensors,
    index.json."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    flips = (False, True) if dataset.random_flip else (False,)
    loader = DataLoader(
        range(len(dataset)), batch_size, num_workers=num_workers, collate_fn=functools.partial(_decode, dataset, flips)
    )
    means, stds, hints, item_captions, names, skipped = [], [], [], [], [], list(dataset.skipped)
    for pixels, hint, captions, chunk_names, bad in progress(loader):
        skipped += bad
        if pixels is None:
            continue
        posterior = vae.encode(pixels.flatten(0, 1).to(device, dtype))
        means.append(posterior.mean.float().cpu().unflatten(0, pixels.shape[:2]))
        stds.append(posterior.std.float().cpu().unflatten(0, pixels.shape[:2]))
        hints += [] if hint is None else [hint]
        item_captions += captions
        names += chunk_names
    if not names:
        raise DataError(f"none of the {len(dataset)} images could be read (first: {skipped[0][0]}: {skipped[0][1]})")
    texts = sorted({c for caps in item_captions for c in caps} | {""})
    ids = {t: i for i, t in enumerate(texts)}
    contexts = [text_encoder.encode(texts[i : i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    latents = {"mean": torch.cat(means), "std": torch.cat(stds)} | ({"hint": torch.cat(hints)} if hints else {})
    save_file(latents, tmp / "latents.safetensors")
    save_file({"context": torch.cat(contexts)}, tmp / "text.safetensors")
    index = {
        "captions": [[ids[c] for c in caps] for caps in item_captions],
        "empty": ids[""],
        "flip": dataset.random_flip,
        "names": names,
        "skipped": skipped,
    }
    (tmp / "index.json").write_text(json.dumps(index))
    try:
        tmp.rename(folder)
    except OSError:  # another run finished the same cache first: theirs is as good
        shutil.rmtree(tmp)


class LatentCache(Dataset):
    """(index, seed) -> {"mean", "std": (C, h, w) posterior of image index, "context": (77, D) of one of its
    captions, "seed"}, and "hint": (3, H, W) its control map in [0, 1] when the cache holds them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.captions, self.flip, self.skipped = index["captions"], index["flip"], [tuple(s) for s in index["skipped"]]
        with safe_open(str(self.folder / "text.safetensors"), "pt") as f:
            self.empty_context = f.get_slice("context")[index["empty"] : index["empty"] + 1][0]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        caption, flip = choose(random.Random(seed), len(self.captions[index]), self.flip)
        text_id = self.captions[index][caption]
        with safe_open(str(self.folder / "latents.safetensors"), "pt") as f:
            names = [name for name in ("mean", "std", "hint") if name in f.keys()]
            item = {name: f.get_slice(name)[index : index + 1][0, int(flip)] for name in names}
        with safe_open(str(self.folder / "text.safetensors"), "pt") as f:
            context = f.get_slice("context")[text_id : text_id + 1][0]
        if "hint" in item:
            item["hint"] = item["hint"].float() / 255
        return item | {"context": context, "seed": seed, "skipped": []}
