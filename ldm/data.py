"""Image + caption datasets for training, their transforms, and the sampler that makes runs reproducible.

`ImageCaptionDataset(path)` reads, by what it finds at `path`:
  - a folder written by `datasets`' `save_to_disk` (`state.json` or `dataset_dict.json` inside; split "train");
  - an image folder with captions in `metadata.jsonl` / `metadata.csv` (Hugging Face `imagefolder` convention:
    a `file_name` column relative to the metadata file, and a caption column), in any subfolder;
  - an image folder with captions in `name.txt` beside `name.png` (one caption per non-empty line);
  - anything else `datasets.load_dataset(path, split="train")` reads (parquet / csv / json files, ...).
A caption may be a list: one is picked at random each time the image is drawn. For ControlNet training each item
also has a control map (`control=`): "canny", the edges of the image as it is cropped, or a column naming a control
image (diffusers' fill50k `conditioning_image`: a path relative to the metadata file's folder), cropped and flipped
as the image. Images are converted to 8-bit
RGB correctly whatever their mode. Whatever cannot be used is skipped and counted with its reason, never a crash
mid-epoch: unreadable files (corrupt, truncated, not images, over Pillow's decompression-bomb limit), images without
a caption (missing, empty, not UTF-8), lines of metadata.jsonl that are not JSON objects, images no metadata file
lists, and files outside the dataset folder (`../x.png`, absolute paths, symlinks out), which are never read.
Files with the same bytes are one image, with the captions of all of them.

Randomness is keyed by the position of a sample in the data stream (`StreamSampler`), not by process or
worker, so one process with batch 2B and two with batch B see the same samples with the same crops, flips,
captions and noise, and a resumed run continues the stream exactly.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import os
import random
import re
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from ldm import LdmError
from ldm.buckets import fit
from ldm.images import canny

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class DataError(LdmError):
    """A dataset that cannot be used (missing, empty, wrong columns); the message says what and where."""


# ---------------------------------------------------------------- images


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode an image fully and convert it to 8-bit RGB.

    Transparency (RGBA, LA, palette with a transparent index) is composited on white, palette / grey / CMYK
    go through Pillow's conversions, 16-bit grey is scaled by 255/65535 (Pillow's own conversion clips it),
    and the EXIF orientation is applied. Raises on a corrupt or truncated file, and on one over Pillow's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS: a warning up to twice the limit, which we raise too).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = Image.fromarray(
            (np.asarray(img).astype(np.float64) * (255 / 65535)).round().clip(0, 255).astype(np.uint8)
        )
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def transform(img: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random) -> torch.Tensor:
    """Resize the short side to `resolution` (bicubic, antialiased), crop a square (center or random), flip;
    -> [-1, 1]. The square bucket of ldm.buckets.fit."""
    return fit(img, (resolution, resolution), center_crop, flip, rng)[0]


def rotate_hue(pixels: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Turn the hue of each image (B, 3, H, W) in [-1, 1] by its angle: a rotation of RGB space about the grey axis
    k = (1, 1, 1) / sqrt(3), so white, black and greys stay and saturation is kept (a VAE augmentation for the colours
    a dataset rarely shows). Rodrigues: R = cos(a) I + sin(a) [k]x + (1 - cos(a)) k k^T; out of gamut is clamped."""
    a = torch.deg2rad(degrees.float()).view(-1, 1, 1)
    k = torch.full((3,), 3**-0.5)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rot = a.cos() * torch.eye(3) + a.sin() * cross + (1 - a.cos()) * torch.outer(k, k)
    return torch.einsum("bij,bjhw->bihw", rot.to(pixels), pixels).clamp(-1, 1)


def choose(rng: random.Random, n_captions: int, random_flip: bool) -> tuple[int, bool]:
    """The per-sample choices shared by the image and the cached paths, in one fixed order: caption, then flip."""
    return rng.randrange(n_captions), random_flip and rng.random() < 0.5


# ---------------------------------------------------------------- sources


def _strings(value) -> list[str]:
    """The strings of a caption cell: a string, or a list of strings."""
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    return [v for v in values if isinstance(v, str)]


def _utf8(text: str) -> bool:
    """False for text that held bytes which are not UTF-8 (files are decoded with errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _captions(value) -> list[str]:
    """A caption cell -> a list of non-empty captions (a string, or a list of strings); text that is not UTF-8 is
    none."""
    return [v.strip() for v in _strings(value) if v.strip() and _utf8(v)]


def _no_caption(value, where: str) -> str:
    """Why a caption cell holds no caption."""
    return f"caption {where} is not UTF-8" if not all(map(_utf8, _strings(value))) else f"no caption {where}"


def _inside(root: Path, path: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL in a file_name
        return False


def _read_metadata(meta: Path, root: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """The rows of a metadata file, and (line, why) for each line of a .jsonl that is not a JSON object.
    Bytes that are not UTF-8 spoil only the captions that hold them (decoded with errors="surrogateescape")."""
    try:
        text = meta.read_bytes().decode("utf-8-sig", errors="surrogateescape")
        if meta.suffix == ".csv":
            return list(csv.DictReader(io.StringIO(text, newline=""))), []
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read {meta}: {e}") from None
    rows, bad = [], []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): a JSON string may hold U+2028 and its kind
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append((f"{meta.relative_to(root)} line {n}", "not a JSON object"))
    return rows, bad


def scan_folder(
    root: Path, caption_column: str, require_captions: bool = True
) -> tuple[list[tuple[Path, list[str]]], list[tuple[str, str]]]:
    """An image folder -> ([(image path, captions)], [(name, why skipped)]), in a stable order.

    Without require_captions, images without a caption are kept with the caption "" (for the VAE)."""
    uncaptioned = [] if require_captions else [""]
    files, listed, skipped = {}, set(), []
    walk = sorted(Path(d) / f for d, folders, names in os.walk(root) for f in names + folders)  # x.png/ is no image
    images = [p for p in walk if p.suffix.lower() in IMAGE_EXTENSIONS]
    named = [p for p in walk if p.name in METADATA_FILES]
    metas = [p for p in named if p.is_file()]  # reading a FIFO or a device could block forever
    skipped += [(str(p.relative_to(root)), "not a regular file") for p in named if p not in metas]
    for meta in metas:
        rows, bad = _read_metadata(meta, root)
        skipped += bad
        for row in rows:
            name = str(row.get("file_name") or "")
            path = meta.parent / name
            listed.add(Path(os.path.normpath(path)))
            if not name:
                skipped.append((f"{meta.relative_to(root)}: a row without file_name", "no file_name"))
            elif Path(name).is_absolute() or not _inside(root, path):
                skipped.append((name, "outside the dataset folder"))
            elif not path.is_file():
                skipped.append((name, "not a regular file" if path.exists() else "file not found"))
            else:  # several rows for one file add captions
                listed.add(path.resolve())
                if captions := _captions(row.get(caption_column)) or uncaptioned:
                    files.setdefault(path.resolve(), []).extend(captions)
                else:
                    skipped.append((name, _no_caption(row.get(caption_column), f"in column '{caption_column}'")))
    if metas:
        skipped += [(str(p.relative_to(root)), "not listed in a metadata file") for p in images if p not in listed]
    else:
        for path in images:
            txt = path.with_suffix(".txt")
            if not _inside(root, path) or (txt.exists() and not _inside(root, txt)):
                skipped.append((str(path.relative_to(root)), "outside the dataset folder"))
            elif not path.is_file():
                skipped.append((str(path.relative_to(root)), "not a regular file"))
            else:
                lines = (
                    txt.read_bytes().decode("utf-8-sig", errors="surrogateescape").splitlines() if txt.is_file() else []
                )
                if captions := _captions(lines) or uncaptioned:
                    files.setdefault(path.resolve(), []).extend(captions)
                else:
                    skipped.append((str(path.relative_to(root)), _no_caption(lines, "(.txt beside it)")))
    skipped += _merge_duplicates(files, root)
    return sorted(files.items()), skipped


def _merge_duplicates(files: dict[Path, list[str]], root: Path) -> list[tuple[str, str]]:
    """Files with the same bytes are one image: the first by name takes the captions of the others, which are
    dropped from `files` and returned as skipped. Only files that share their size with another are read."""
    sizes = collections.Counter(path.stat().st_size for path in files)
    first, skipped = {}, []
    for path in sorted(files):
        if sizes[path.stat().st_size] < 2:
            continue
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").digest()
        if digest in first:
            files[first[digest]] += files.pop(path)
            skipped.append(
                (
                    str(path.relative_to(root)),
                    f"duplicate (same bytes as {first[digest].relative_to(root)}; captions merged)",
                )
            )
        else:
            first[digest] = path
    return skipped


def _saved_by_datasets(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def _is_image_folder(path: Path) -> bool:
    """Images with metadata files or .txt captions (not a save_to_disk folder, nor one of parquet / csv / json
    files)."""
    if not path.is_dir() or _saved_by_datasets(path):
        return False
    return any((path / m).exists() for m in METADATA_FILES) or any(
        p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")
    )


def _load_hf(path: Path | str, image_column: str, caption_column: str, require_captions: bool):
    """A `datasets` Dataset whose image column yields undecoded {bytes, path} (decoding errors are ours to count)."""
    import datasets

    try:
        if isinstance(path, Path) and _saved_by_datasets(path):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable folders / unknown names
        raise DataError(
            f"cannot load dataset {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: no 'train' split (found {', '.join(ds)})")
        ds = ds["train"]
    for column in (image_column, caption_column) if require_captions else (image_column,):
        if column not in ds.column_names:
            raise DataError(
                f"{path}: no column '{column}' (columns: {', '.join(ds.column_names)}); "
                "set data.image_column / data.caption_column"
            )
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


class ImageCaptionDataset(Dataset):
    """(index, seed) -> {"pixels": (3, R, R) in [-1, 1], "caption": str, "seed": seed, "key": its name,
    "skipped": [(name, why)]}.

    A file that cannot be decoded is replaced by the next readable one and reported in "skipped".
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        image_column: str = "image",
        caption_column: str = "text",
        require_captions: bool = True,
        control: str = "",
    ):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.control = control  # "": no control map; "canny"; or the column of the control images
        self.image_column, self.caption_column, self.require_captions = image_column, caption_column, require_captions
        self.skipped: list[tuple[str, str]] = []
        local = Path(path).expanduser()
        self.root = local.resolve() if local.exists() else None
        if self.root is not None and _is_image_folder(local):
            self.files, self.skipped = scan_folder(self.root, caption_column, require_captions)
            self.hf = None
        else:
            self.hf = _load_hf(
                local if self.root is not None else str(path), image_column, caption_column, require_captions
            )
            self.files = None
        if len(self) == 0:
            detail = (
                f" ({len(self.skipped)} skipped, e.g. {self.skipped[0][0]}: {self.skipped[0][1]})"
                if self.skipped
                else ""
            )
            raise DataError(f"no images with captions found in {path}{detail}")
        self.controls = self._control_files() if self.control not in ("", "canny") and self.files else None

    def _control_files(self) -> dict[Path, Path]:
        """Image path -> its control image, from the metadata files' `control` column; a missing one is an error."""
        controls = {}
        for meta in sorted(p for name in METADATA_FILES for p in self.root.rglob(name) if p.is_file()):
            for row in _read_metadata(meta, self.root)[0]:
                image, control = meta.parent / str(row.get("file_name") or ""), row.get(self.control)
                if not isinstance(control, str) or not control:
                    continue
                file = meta.parent / control
                if Path(control).is_absolute() or not _inside(self.root, file) or not file.is_file():
                    where = "outside the dataset folder" if file.is_file() else "not found"
                    raise DataError(f"{meta}: {self.control} {control!r} of {row.get('file_name')!r} is {where}")
                controls[image.resolve()] = file
        used = {file.resolve() for file in controls.values()}  # listed, in the control column
        self.skipped = [(name, why) for name, why in self.skipped if (self.root / name).resolve() not in used]
        missing = [path for path, _ in self.files if path not in controls]
        if missing:
            name = missing[0].relative_to(self.root)
            raise DataError(f"{name} has no '{self.control}' in its metadata ({len(missing)} images lack one)")
        return controls

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.hf)

    def name(self, i: int) -> str:
        return str(self.files[i][0].relative_to(self.root)) if self.files is not None else f"row {i}"

    def captions(self, i: int) -> list[str]:
        """The captions of item i: [] when it has none although they are required, [""] when they are not."""
        if self.files is not None:
            return self.files[i][1]
        found = _captions(self.hf[i][self.caption_column]) if self.caption_column in self.hf.column_names else []
        return found or ([] if self.require_captions else [""])

    def image(self, i: int, column: str | None = None) -> Image.Image:
        """Image i (or its control image: column=self.control) as RGB; raises on anything unreadable (the callers
        count it)."""
        if self.files is not None:
            return open_rgb(self.files[i][0] if column is None else self.controls[self.files[i][0]])
        cell = self.hf[i][column or self.image_column]
        if isinstance(cell, Image.Image):
            cell.load()
            return open_rgb(_png_bytes(cell))
        data = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, bytes) else None
        if data is None:  # a path: only inside the dataset folder
            name = cell.get("path") if isinstance(cell, dict) else cell
            file = (self.root / name) if self.root is not None and isinstance(name, str) else None
            if file is None or Path(name).is_absolute() or not _inside(self.root, file):
                raise ValueError(f"image path {name!r} is outside the dataset folder")
            return open_rgb(file)
        return open_rgb(data)

    def read(self, i: int) -> tuple[Image.Image, list[str]]:
        """Image i and its captions; raises when either is missing or unreadable (the callers count it)."""
        captions = self.captions(i)
        if not captions:
            raise ValueError(f"no caption in column '{self.caption_column}'")
        return self.image(i), captions

    def load(self, i: int, rng: random.Random) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        img, captions = self.read(i)
        caption, flip = choose(rng, len(captions), self.random_flip)
        crop = rng.getstate()
        pixels = transform(img, self.resolution, self.center_crop, flip, rng)
        return pixels, captions[caption], self.control_map(i, pixels, flip, crop)

    def control_map(self, i: int, pixels: torch.Tensor, flip: bool, crop) -> torch.Tensor | None:
        """The (3, R, R) control map in [0, 1] of item i, whose transformed image is `pixels`: its canny edges, or
        its control image under the same crop (`crop`: the random state the image's crop was drawn from) and flip."""
        if not self.control:
            return None
        if self.control == "canny":
            image = Image.fromarray(((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
            return torch.from_numpy(np.array(canny(image))).permute(2, 0, 1).float() / 255
        rng = random.Random()
        rng.setstate(crop)
        return transform(self.image(i, self.control), self.resolution, self.center_crop, flip, rng) / 2 + 0.5

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        skipped = []
        for k in range(len(self)):
            i = (index + k) % len(self)
            try:
                pixels, caption, hint = self.load(i, random.Random(seed))
            except Exception as e:  # a corrupt file can raise almost anything inside a decoder
                skipped.append((self.name(i), unreadable(e)))
                continue
            item = {"pixels": pixels, "caption": caption, "seed": seed, "key": self.name(i), "skipped": skipped}
            return item | ({"hint": hint} if self.control else {})
        raise DataError(
            f"none of the {len(self)} images in the dataset could be read (first: {skipped[0][0]}: {skipped[0][1]})"
        )

    def fingerprint(self) -> str:
        """Changes when a file, a caption or the dataset's content changes (for cache invalidation)."""
        h = hashlib.sha256(f"{self.image_column}|{self.caption_column}|{self.control}".encode())
        if self.files is None:
            h.update(self.hf._fingerprint.encode())
        for path, captions in self.files or ():
            st = path.stat()
            h.update(json.dumps([str(path.relative_to(self.root)), st.st_size, st.st_mtime_ns, captions]).encode())
            if self.controls:
                st = self.controls[path].stat()
                h.update(
                    json.dumps([str(self.controls[path].relative_to(self.root)), st.st_size, st.st_mtime_ns]).encode()
                )
        return h.hexdigest()


def unreadable(error: Exception) -> str:
    """Why a file was skipped, in one line (without the address of the object Pillow read it from)."""
    text = re.sub(r" <[^<>]* at 0x[0-9a-f]+>", "", f"{type(error).__name__}: {error}")
    return "unreadable (" + " ".join(text.split())[:120] + ")"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def collate(samples: list[dict]) -> dict:
    """Stack tensors, keep strings and seeds as lists, merge the skipped-file reports."""
    batch = {"seed": [s["seed"] for s in samples], "skipped": [x for s in samples for x in s["skipped"]]}
    for key in samples[0]:
        if key not in batch:
            values = [s[key] for s in samples]
            batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker_init_fn: a SIGTERM sent to the whole process group, or a Ctrl-C in the terminal (SIGINT
    to its foreground group), is the main process' to handle; a worker goes on serving the batches it needs."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------- order


class StreamSampler(Sampler):
    """An endless stream of (index, seed) keys for one process.

    The stream is randperm(n) seeded seed + epoch, epoch after epoch; position p carries its own seed. Each
    global batch (world * B positions) is cut into contiguous per-process slices, so the samples of a step do
    not depend on the number of processes, and starting at position `start` resumes the stream exactly.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, start: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self._epoch, self._perm = -1, None

    def key(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch, self._perm = (
                epoch,
                torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)),
            )
        return int(self._perm[i]), sample_seed(self.seed, position)

    def __iter__(self):
        position = self.start + self.rank * self.batch_size
        while True:
            for j in range(self.batch_size):
                yield self.key(position + j)
            position += self.world * self.batch_size


def sample_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for stream position `position` of a run seeded `seed`."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest(), "little") >> 1


def holdout_split(dataset: Dataset, holdout: int, seed: int) -> tuple[Dataset, Dataset]:
    """(training part, held-out part): `holdout` items picked by a permutation seeded `seed`, the rest for training."""
    if holdout >= len(dataset):
        raise DataError(f"holdout={holdout} leaves no training images: the dataset has {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[holdout:])), Subset(dataset, sorted(order[:holdout]))


class Subset(Dataset):
    """Items `indices` of a dataset read with (index, seed) keys, renumbered 0..len-1."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """The files the whole dataset skipped while listing its folder."""
        return self.dataset.skipped

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        return self.dataset[(self.indices[index], seed)]
