"""Precompute the VAE's latent distributions of webdataset shards, once, so training does not encode every epoch
(MosaicML's SD2 run saved 1.4x this way):

    python -m ldm.precompute --config configs/train-unet-tiny.yaml OUT data.path=shards/ [key.path=value ...]
    accelerate launch --num_processes 8 -m ldm.precompute --config my.yaml OUT ...     # several processes

For each shard of data.path an output shard of the same name in OUT holding, for each usable sample (the same as
training would use: data.filters, captions, images that decode), the posterior's mean and std at its training size
(`KEY.mean.npy`, `KEY.std.npy`, float16, (C, h, w): the square of data.resolution, or its aspect-ratio bucket with
data.buckets), the text encoder's input (`KEY.ids.npy`: the caption's token ids as training tokenizes it, int32, and
the caption itself, `KEY.txt`), with `KEY.json` (the source's fields plus `size`,
`original_size`, `crop`). Images are center-cropped and not flipped. `data.path=OUT` then trains from them with the
same stream (the same samples, order and seeds): z = mean + std * noise with the noise of each sample's seed, and
the stored token ids (those of "" where caption dropout draws it).
Processes take the shards in turn; a shard already in OUT is kept, so an interrupted job continues where it stopped.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from ldm.buckets import bucket_sizes, fit, nearest
from ldm.cli import ArgumentParser, run
from ldm.data import open_rgb
from ldm.shards import IMAGE_EXTS, read_groups, rules_of, shard_urls


def encode_shard(url: str, dest: Path, vae, text_encoder, data, batch_size: int, device) -> int:
    """One shard -> dest (written to dest.tmp, then renamed); -> the samples written."""
    rules = rules_of(data)
    buckets = bucket_sizes(data.resolution, data.bucket_step) if data.buckets else None
    samples = []
    for _, key, group in read_groups(url):
        why, size = (group, None) if isinstance(group, str) else rules.why_not(group)
        if why:
            continue
        img = open_rgb(group[next(ext for ext in IMAGE_EXTS if ext in group)])
        bucket = buckets[nearest(buckets, *img.size)] if buckets else (data.resolution, data.resolution)
        pixels, crop = fit(img, bucket, True, False, random.Random(0))
        meta = rules.meta(group) | {"size": list(bucket), "original_size": list(img.size), "crop": list(crop)}
        samples.append((key, pixels, rules.caption(group), meta))
    moments = {}
    for size in {tuple(s[1].shape) for s in samples}:  # one batch size at a time: the VAE takes equal shapes
        keys = [i for i, s in enumerate(samples) if tuple(s[1].shape) == size]
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            with torch.no_grad():
                posterior = vae.encode(torch.stack([samples[i][1] for i in chunk]).to(device))
            for j, i in enumerate(chunk):
                moments[i] = (posterior.mean[j].float().cpu(), posterior.std[j].float().cpu())
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i, (key, _, caption, meta) in enumerate(samples):
            mean, std = (npy(m.numpy().astype(np.float16)) for m in moments[i])
            ids = npy(text_encoder.tokenize([caption])[0].numpy().astype(np.int32))
            members = [("mean.npy", mean), ("std.npy", std), ("ids.npy", ids), ("txt", caption.encode())]
            members += [("json", json.dumps(meta).encode())]
            for ext, payload in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    tmp.rename(dest)
    return len(samples)


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ldm.precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="the training YAML (its model, init_from and data)")
    p.add_argument("out", type=Path, help="the folder of the output shards")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. data.path=shards/")
    args = p.parse_intermixed_args(argv)
    return run(lambda: precompute(args))


def precompute(args) -> int:
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from ldm.checkpoint import load_model
    from ldm.config import TrainUNetConfig
    from ldm.model import StableDiffusion
    from ldm.run_files import read_train_config

    cfg, init = read_train_config(args.config, args.overrides, TrainUNetConfig, lambda path, _: load_model(path))
    state = PartialState(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)  # without init_from: the random VAE train_unet.py makes with this seed
    model = init if init is not None else StableDiffusion(cfg.model)
    vae = model.vae.to(state.device).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    start, count = time.perf_counter(), 0
    for url in shard_urls(cfg.data.path)[state.process_index :: state.num_processes]:
        dest = args.out / Path(url.split("?")[0]).name
        if not dest.exists():
            count += encode_shard(url, dest, vae, model.text_encoder, cfg.data, cfg.batch_size, state.device)
    state.wait_for_everyone()
    print(f"process {state.process_index}: {count} samples, {count / (time.perf_counter() - start):.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
