"""Training from webdataset shards: tar files of KEY.jpg / .png / .webp + KEY.txt (+ KEY.json), as img2dataset
writes them, read from a folder of .tar files, a brace pattern (`laion/{00000..01023}.tar`), an http(s):// URL
pattern or a `pipe:` command (webdataset's conventions, its brace expansion), with Python's own `tarfile`.

    python -m ldm.shards my_images my_shards --per-shard 1000   # an image folder (as data.path reads it) -> shards

Why not webdataset's pipeline itself: exact resume needs to know, at every step, which sample each process gets,
and where in which shard it lies; webdataset's shard lists, node/worker splitters and shuffle buffers keep that
inside iterators with no state to save. Here the stream is a pure function of (index, seed, epoch, world size):

1. The index (`build_index`, once per run, split over the processes, kept in <output_dir>/shard-index.json): for
   every shard, how many samples it holds and which of them cannot train and why (no image, no caption, an
   undecodable image, a member cut short, a .json filter; a shard that cannot be opened after 3 tries is skipped
   with a warning). Deciding that up front, on every image, is what lets each process know its share without asking
   the others: decoding is checked twice, here and in training (at LAION scale, train from `python -m
   ldm.precompute` shards, where the one decode happens in the precompute).
2. An epoch (`Plan`): the shards in the order of randperm(seed + epoch), their usable samples laid end to end; rank
   r takes the r-th of `world` equal contiguous stretches of `steps * batch_size` samples, so every usable sample is
   drawn at most once an epoch, fewer than one global batch are left out, and all ranks run the same number of
   steps. Each rank reads only its stretch (whole shards, and at most two cut ones at its ends).
3. Within its stretch, a rank shuffles with a buffer of `data.shuffle_buffer` samples seeded (seed, epoch, rank); the
   buffer is replayed on the sample numbers alone to resume mid-epoch, then only what is still to come is read.
   DataLoader workers take the batches in turn (worker w: batches w, w + W, ...), each reading the stretch and
   decoding only its own batches, so the batches come out in the same order for any number of workers.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from ldm.buckets import bucket_sizes, fit, nearest
from ldm.config import ShardFilters
from ldm.data import DataError, choose, collate, open_rgb, sample_seed, unreadable

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TRIES = 3
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: "a/b.seg.jpg" -> "a/b", "seg.jpg"


def is_shards(path: str) -> bool:
    """Whether data.path names webdataset shards (rather than an image folder or a `datasets` source)."""
    if path.startswith(("pipe:", "http://", "https://")) or path.endswith(".tar"):
        return True
    folder = Path(path).expanduser()
    return folder.is_dir() and any(folder.glob("*.tar"))


def shard_urls(path: str) -> list[str]:
    """data.path -> the shards: a folder's .tar files by name, or the brace pattern expanded."""
    folder = Path(path).expanduser()
    if not path.startswith(("pipe:", "http://", "https://")) and folder.is_dir():
        return [str(p) for p in sorted(folder.glob("*.tar"))]
    return list(braceexpand(path))


def open_shard(url: str) -> BinaryIO:
    """A shard's bytes as a stream: a local file, an http(s) download, or a `pipe:` command's stdout."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return proc.stdout
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60)
    return open(url, "rb")


def read_groups(url: str, limit: int | None = None) -> Iterator[tuple[int, str, dict[str, bytes] | str]]:
    """(ordinal, key, {ext: bytes}) for each sample of a shard in order, members grouped by key; a member that cannot
    be read ends the shard, its sample given as (ordinal, key, why). Stops after `limit` samples. An unopenable
    shard is tried 3 times, then raises OSError."""
    for attempt in range(TRIES):
        try:
            stream = open_shard(url)
            tar = tarfile.open(fileobj=stream, mode="r|*")
            break
        except (OSError, tarfile.TarError) as e:
            if attempt == TRIES - 1:
                raise OSError(" ".join(f"{type(e).__name__}: {e}".split())[:200]) from None
            time.sleep(0.2 * (attempt + 1))
    ordinal, key, group = 0, None, {}
    with stream, tar:
        try:
            for member in tar:
                m = KEY_EXT.match(member.name)
                if not member.isfile() or m is None or Path(member.name).name.startswith(("__", ".")):
                    continue
                if m.group(1) != key and key is not None:
                    yield ordinal, key, group
                    ordinal, group = ordinal + 1, {}
                    if limit is not None and ordinal >= limit:
                        return
                key = m.group(1)
                group[m.group(2).lower()] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError, EOFError) as e:
            if key is not None:
                yield ordinal, key, "unreadable member (" + " ".join(f"{type(e).__name__}: {e}".split())[:120] + ")"
            return
        if key is not None:
            yield ordinal, key, group


# data.filters' fields: the img2dataset .json field each reads, and whether a value passes its limit
FILTERS = {
    "min_width": ("original_width", lambda value, limit: value >= limit),
    "min_height": ("original_height", lambda value, limit: value >= limit),
    "max_pwatermark": ("pwatermark", lambda value, limit: value <= limit),
    "min_aesthetic": ("aesthetic", lambda value, limit: value >= limit),
}


@dataclass
class SampleRules:
    """What makes a sample usable: its caption's source and the .json filters (a filter at its default is off)."""

    caption_field: str = ""
    filters: ShardFilters = field(default_factory=ShardFilters)

    def meta(self, group: dict[str, bytes]) -> dict:
        """The sample's .json metadata ({} without one); raises on one that is not a JSON object."""
        if "json" not in group:
            return {}
        meta = json.loads(group["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("its .json is not an object")
        return meta

    def caption(self, group: dict[str, bytes]) -> str:
        """The caption ("" when there is none)."""
        if self.caption_field:
            value = self.meta(group).get(self.caption_field)
            return value.strip() if isinstance(value, str) else ""
        return group["txt"].decode("utf-8").strip() if "txt" in group else ""

    def why_not(self, group: dict[str, bytes]) -> tuple[str, tuple[int, int]]:
        """(why a sample cannot train, "" when it can; its image's size). Filters read original_width /
        original_height, pwatermark and aesthetic of the .json (a sample without the field a filter needs is
        filtered out)."""
        image = next((ext for ext in (*IMAGE_EXTS, "mean.npy") if ext in group), None)
        if image is None:
            return "no image (no .jpg, .png, .webp or precomputed .mean.npy member)", (0, 0)
        try:
            meta = self.meta(group)
            if not self.caption(group):
                why = "no caption" + (f" (no '{self.caption_field}' in its .json)" if self.caption_field else "")
                return why, (0, 0)
        except (ValueError, UnicodeDecodeError) as e:
            return unreadable(e), (0, 0)
        for name, (key, passes) in FILTERS.items():
            limit, value = getattr(self.filters, name), meta.get(key)
            if limit != getattr(ShardFilters, name) and not (isinstance(value, (int, float)) and passes(value, limit)):
                return f"filtered by data.filters.{name} ({key} {value} vs {limit})", (0, 0)
        if image == "mean.npy":  # precomputed (ldm.precompute): the size it was encoded at
            return "", tuple(meta["size"])
        try:
            return "", open_rgb(group[image]).size
        except Exception as e:  # a corrupt image can raise almost anything inside a decoder
            return unreadable(e), (0, 0)


def index_shard(url: str, rules: SampleRules) -> dict:
    """{"url", "samples": how many, "skipped": {ordinal: [key, why]}, "sizes": {ordinal: [width, height]} of the
    others} of one shard; a shard that cannot be opened after 3 tries has no samples and its "error"."""
    entry = {"url": url, "samples": 0, "skipped": {}, "sizes": {}}
    try:
        for ordinal, key, group in read_groups(url):
            why, size = (group, None) if isinstance(group, str) else rules.why_not(group)
            entry["samples"] = ordinal + 1
            if why:
                entry["skipped"][str(ordinal)] = [key, why]
            else:
                entry["sizes"][str(ordinal)] = list(size)
    except OSError as e:
        print(f"warning: skipped shard {url}: cannot be read after {TRIES} tries ({e})", file=sys.stderr)
        entry["error"] = str(e)
    return entry


def build_index(urls: list[str], rules: SampleRules, rank: int, world: int) -> list[dict]:
    """This process's part of the index: shards rank, rank + world, ... (Shards gathers the parts)."""
    return [index_shard(url, rules) for url in urls[rank::world]]


def skipped_names(index: list[dict]) -> dict[str, str]:
    """name -> why for what the index leaves out (Run's skipped report): "URL:KEY", or the URL of a lost shard."""
    names = {shard["url"]: f"shard unreadable ({shard['error']})" for shard in index if "error" in shard}
    for shard in index:
        names |= {f"{shard['url']}:{key}": why for key, why in shard["skipped"].values()}
    return names


class Plan:
    """Which samples each of `world` ranks draws in an epoch, and in which batches: `stretch(epoch, rank)` ->
    [(shard, [ordinals])] in reading order, `per_rank` samples in all; `batcher(epoch, rank)` deals their numbers
    into batches; `steps(epoch)`, alike on every rank. With `buckets` (ldm.buckets.bucket_sizes) each batch holds one
    bucket, and an epoch has as many steps as the rank with the fewest full batches can give."""

    def __init__(self, index: list[dict], batch_size: int, world: int, seed: int, shuffle_buffer: int, buckets=None):
        self.index, self.batch_size, self.world, self.seed = index, batch_size, world, seed
        self.shuffle_buffer, self.buckets, self._steps = shuffle_buffer, buckets, {}
        self.usable = [[o for o in range(shard["samples"]) if str(o) not in shard["skipped"]] for shard in index]
        self.total = sum(map(len, self.usable))
        self.per_rank = self.total // (world * batch_size) * batch_size
        if self.per_rank == 0:
            raise DataError(
                f"the shards hold {self.total} usable samples, fewer than one global batch "
                f"({world} process(es) x batch_size {batch_size})"
            )

    def stretch(self, epoch: int, rank: int) -> list[tuple[int, list[int]]]:
        order = torch.randperm(len(self.index), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        begin, end, at, parts = rank * self.per_rank, (rank + 1) * self.per_rank, 0, []
        for s in order:
            n = len(self.usable[s])
            lo, hi = max(begin - at, 0), min(end - at, n)
            if lo < hi:
                parts.append((s, self.usable[s][lo:hi]))
            at += n
        return parts

    def batcher(self, epoch: int, rank: int) -> Batcher:
        bucket_of = None
        if self.buckets:
            sizes = [self.index[s]["sizes"][str(o)] for s, ordinals in self.stretch(epoch, rank) for o in ordinals]
            bucket_of = [nearest(self.buckets, w, h) for w, h in sizes]
        shuffle = Shuffle(self.per_rank, self.shuffle_buffer, epoch_rng(self.seed, epoch, rank))
        return Batcher(shuffle, self.batch_size, bucket_of)

    def steps(self, epoch: int) -> int:
        if not self.buckets:
            return self.per_rank // self.batch_size
        if epoch not in self._steps:
            self._steps[epoch] = min(self.batcher(epoch, rank).count() for rank in range(self.world))
        return self._steps[epoch]


class Shuffle:
    """A shuffle buffer over the sample numbers 0..n-1 (webdataset's algorithm: fill to `size`, then each draw takes
    a random one out and the next one in). Its state is the buffer and the next number to come in."""

    def __init__(self, n: int, size: int, rng: random.Random):
        self.n, self.size, self.rng, self.buffer, self.next_in = n, size, rng, [], 0

    def draw(self) -> int:
        while self.next_in < self.n and len(self.buffer) < self.size:
            self.buffer.append(self.next_in)
            self.next_in += 1
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()


class Batcher:
    """The shuffled numbers dealt into batches: `batch_size` in a row, or with buckets (`bucket_of`: each number's
    bucket) a batch whenever a bucket fills (a part-filled bucket at the end of the epoch is left out)."""

    def __init__(self, shuffle: Shuffle, batch_size: int, bucket_of: list[int] | None):
        self.shuffle, self.batch_size, self.bucket_of, self.filling = shuffle, batch_size, bucket_of, {}

    def next(self) -> tuple[list[int], int | None]:
        """(the next batch's numbers, its bucket); StopIteration at the end of the epoch."""
        if self.bucket_of is None:
            if self.shuffle.n - self.shuffle.next_in + len(self.shuffle.buffer) < self.batch_size:
                raise StopIteration
            return [self.shuffle.draw() for _ in range(self.batch_size)], None
        while self.shuffle.buffer or self.shuffle.next_in < self.shuffle.n:
            n = self.shuffle.draw()
            batch = self.filling.setdefault(self.bucket_of[n], [])
            batch.append(n)
            if len(batch) == self.batch_size:
                return self.filling.pop(self.bucket_of[n]), self.bucket_of[n]
        raise StopIteration

    def count(self) -> int:
        """How many batches it deals in the epoch (it is used up)."""
        n = 0
        with contextlib.suppress(StopIteration):
            while True:
                self.next()
                n += 1
        return n

    def pending(self) -> set[int]:
        """The numbers drawn into the shuffle buffer or a part-filled bucket and not yet dealt."""
        return set(self.shuffle.buffer).union(*self.filling.values())


def epoch_rng(seed: int, epoch: int, rank: int) -> random.Random:
    return random.Random(hashlib.blake2b(f"{seed}:{epoch}:{rank}".encode(), digest_size=8).digest())


class Reader:
    """A rank's stretch read forward: get(n) -> the raw sample with number n, keeping only the numbers in `wanted`
    (drawn, not yet dealt) and those from `first_new` on."""

    def __init__(self, index: list[dict], stretch: list[tuple[int, list[int]]], wanted: set[int], first_new: int):
        self.store, self.wanted, self.first_new = {}, wanted, first_new
        start = min(wanted | {first_new})
        self.samples = self._samples(index, stretch, start)

    def _samples(self, index, stretch, start) -> Iterator[tuple[int, tuple[str, dict]]]:
        number = 0
        for s, ordinals in stretch:
            if number + len(ordinals) <= start:
                number += len(ordinals)
                continue
            keep, url, end = set(ordinals), index[s]["url"], number + len(ordinals)
            try:
                for ordinal, key, group in read_groups(url, limit=ordinals[-1] + 1):
                    if ordinal in keep:
                        if isinstance(group, str):
                            raise DataError(f"shard {url} changed since it was indexed: {key}: {group}")
                        yield number, (f"{url}:{key}", group)
                        number += 1
            except OSError as e:
                raise DataError(f"shard {url} was readable when indexed and is not now: {e}") from None
            if number != end:
                raise DataError(f"shard {url} holds fewer samples than when it was indexed")

    def get(self, n: int) -> tuple[str, dict]:
        while n not in self.store:
            number, sample = next(self.samples)
            if number in self.wanted or number >= self.first_new:
                self.store[number] = sample
        return self.store.pop(n)


class Shards(IterableDataset):
    """Webdataset shards as the endless stream of this process's batches (see the module docstring).

    `index`: the whole index (open_index builds or reads it); `data`: the DataConfig. Iterated, it yields collated
    batches of {"pixels" (or a precomputed "mean", "std" and token "ids"), "caption", "seed", "key", "size",
    "original_size", "crop", "skipped"} from stream position `start` (samples drawn by all processes so far)."""

    def __init__(self, index: list[dict], data, batch_size: int, rank: int, world: int, seed: int, start: int = 0):
        self.index, self.data, self.batch_size, self.seed, self.start = index, data, batch_size, seed, start
        self.rank, self.world = rank, world
        self.buckets = bucket_sizes(data.resolution, data.bucket_step) if data.buckets else None
        self.plan = Plan(index, batch_size, world, seed, data.shuffle_buffer, self.buckets)
        self.skipped = list(skipped_names(index).items())

    def __len__(self) -> int:
        return self.plan.total

    def common_size(self) -> tuple[int, int]:
        """(width, height) of the bucket that holds the most samples (the square without buckets)."""
        if not self.buckets:
            return self.data.resolution, self.data.resolution
        counts = collections.Counter(nearest(self.buckets, w, h) for s in self.index for w, h in s["sizes"].values())
        return self.buckets[counts.most_common(1)[0][0]]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        global_batch = self.world * self.batch_size
        step = self.start // global_batch  # global batches drawn so far
        epoch, first = 0, step
        while first >= self.plan.steps(epoch):
            first, epoch = first - self.plan.steps(epoch), epoch + 1
        while True:
            batcher = self.plan.batcher(epoch, self.rank)
            for _ in range(first):
                batcher.next()
            reader = Reader(self.index, self.plan.stretch(epoch, self.rank), batcher.pending(), batcher.shuffle.next_in)
            for _ in range(first, self.plan.steps(epoch)):
                numbers, bucket = batcher.next()
                if step % workers == worker:
                    size = self.buckets[bucket] if self.buckets else (self.data.resolution,) * 2
                    base = step * global_batch + self.rank * self.batch_size
                    yield collate([self.item(*reader.get(n), size, base + j) for j, n in enumerate(numbers)])
                else:
                    for n in numbers:
                        reader.get(n)
                step += 1
            epoch, first = epoch + 1, 0

    def item(self, name: str, group: dict[str, bytes], size: tuple[int, int], position: int) -> dict:
        """One training sample scaled to cover `size` and cropped, its random choices (flip, then crop) from its
        stream position's seed, as ImageCaptionDataset.load; or a precomputed one's latent mean and std and its
        caption's token ids."""
        seed = sample_seed(self.seed, position)
        item = {"caption": rules_of(self.data).caption(group), "seed": seed, "key": name, "skipped": []}
        if "mean.npy" in group:
            meta = json.loads(group["json"])
            mean, std, ids = (
                torch.from_numpy(np.load(io.BytesIO(group[k])).astype(dtype))
                for k, dtype in (("mean.npy", np.float32), ("std.npy", np.float32), ("ids.npy", np.int64))
            )
            return (
                item
                | {"mean": mean, "std": std, "ids": ids, "size": meta["size"]}
                | {
                    "original_size": meta["original_size"],
                    "crop": meta["crop"],
                }
            )
        rng = random.Random(seed)
        _, flip = choose(rng, 1, self.data.random_flip)
        img = open_rgb(group[next(ext for ext in IMAGE_EXTS if ext in group)])
        pixels, crop = fit(img, size, self.data.center_crop, flip, rng)
        return item | {"pixels": pixels, "size": size, "original_size": img.size, "crop": crop}


def rules_of(data) -> SampleRules:
    return SampleRules(data.caption_field, data.filters)


def open_index(data, output_dir: Path, accelerator) -> list[dict]:
    """The shard index of data.path: read from <output_dir>/shard-index.json when it was built from the same shards
    and rules, else built by all processes together (each a share of the shards) and written there."""
    from accelerate.utils import broadcast_object_list, gather_object

    urls, rules = shard_urls(data.path), rules_of(data)
    if not urls:
        raise DataError(f"no .tar shards in {data.path}")
    settings = {"urls": urls, "rules": asdict(rules)}
    path = Path(output_dir) / "shard-index.json"
    found = [None]
    if accelerator.is_main_process and path.exists():
        saved = json.loads(path.read_text())
        found = [saved["shards"] if saved.get("settings") == settings else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    if found[0] is not None:
        return found[0]
    part = build_index(urls, rules, accelerator.process_index, accelerator.num_processes)
    parts = gather_object([part]) if accelerator.num_processes > 1 else [part]
    by_url = {shard["url"]: shard for p in parts for shard in p}
    index = [by_url[url] for url in urls]
    if accelerator.is_main_process:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": settings, "shards": index}))
        tmp.rename(path)
    return index


def write_shards(source: str, dest: Path, per_shard: int) -> int:
    """An image folder or dataset (as ImageCaptionDataset reads it) -> dest/00000.tar, ...: KEY.png (the image as
    8-bit RGB PNG), KEY.txt (its first caption), KEY.json (original_width, original_height, its name). -> shards
    written."""
    from ldm.data import ImageCaptionDataset, _png_bytes

    dataset = ImageCaptionDataset(source, resolution=1)
    dest.mkdir(parents=True, exist_ok=True)
    shards = 0
    for start in range(0, len(dataset), per_shard):
        with tarfile.open(dest / f"{shards:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, len(dataset))):
                img, captions = dataset.read(i)
                meta = {"original_width": img.width, "original_height": img.height, "name": dataset.name(i)}
                for ext, data in (
                    ("png", _png_bytes(img)),
                    ("txt", captions[0].encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards += 1
    return shards


def main(argv=None) -> int:
    from ldm.cli import ArgumentParser, run

    p = ArgumentParser(prog="python -m ldm.shards", description="Write an image folder as webdataset shards.")
    p.add_argument("source", help="an image folder with captions, or what data.path reads")
    p.add_argument("dest", type=Path, help="the folder of the shards (00000.tar, 00001.tar, ...)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    args = p.parse_args(argv)

    def work() -> int:
        n = write_shards(args.source, args.dest, args.per_shard)
        print(f"wrote {n} shards to {args.dest}")
        return 0

    return run(work)


if __name__ == "__main__":
    sys.exit(main())
