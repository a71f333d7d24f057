"""Datasets: every source format, image mode conversions, bad and escaping files, and the stream order."""

import json
import os
import random
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import ldm.data
from conftest import CAPTION_PROBLEMS, write_bad_corpus
from ldm.data import DataError, ImageCaptionDataset, StreamSampler, collate, open_rgb, rotate_hue, transform


def png(path, color=(200, 30, 30), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_metadata_jsonl_in_subfolders_with_caption_lists(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "sub" / "b.png", (10, 200, 10))
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": ["red one", "a red square"]}) + "\n"
    )
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "green"}) + "\n")
    ds = ImageCaptionDataset(tmp_path, resolution=8)
    assert len(ds) == 2 and sorted(map(ds.name, range(2))) == ["a.png", "sub/b.png"]
    item = ds[(0, 0)]
    assert item["pixels"].shape == (3, 8, 8) and item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    a = [i for i in range(2) if ds.name(i) == "a.png"][0]
    assert {ds[(a, seed)]["caption"] for seed in range(40)} == {"red one", "a red square"}  # picked at random per seed
    assert ds[(a, 3)]["caption"] == ds[(a, 3)]["caption"]


def test_metadata_csv_rows_for_one_file_are_its_captions(tmp_path):
    png(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text("file_name,caption\nx.png,first caption\nx.png,second caption\n")
    ds = ImageCaptionDataset(tmp_path, resolution=8, caption_column="caption")
    assert len(ds) == 1 and ds.captions(0) == ["first caption", "second caption"]


def test_txt_beside_image_one_caption_per_line(tmp_path):
    png(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("a cat\n\n  a small cat  \n")
    png(tmp_path / "nocaption.png", (10, 200, 10))  # other bytes: files with the same bytes are one image
    ds = ImageCaptionDataset(tmp_path, resolution=8)
    assert len(ds) == 1 and ds.captions(0) == ["a cat", "a small cat"]
    assert ds.skipped == [("nocaption.png", "no caption (.txt beside it)")]
    uncaptioned = ImageCaptionDataset(tmp_path, resolution=8, require_captions=False)  # the VAE's view of the folder
    assert len(uncaptioned) == 2 and uncaptioned.captions(1) == [""]


def alpha_over_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:].astype(np.float64) / 255
    return rgba[..., :3] * a + 255 * (1 - a)


def test_image_modes_become_correct_rgb(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 128], [0, 255, 0, 255]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(np.asarray(open_rgb(tmp_path / "rgba.png")), alpha_over_white(rgba), atol=1)

    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 1])
    pal.save(tmp_path / "p.png", transparency=0)  # index 0 is transparent -> white
    assert np.asarray(open_rgb(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [200, 100, 50], [200, 100, 50]]]

    grey16 = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    expected = np.round(grey16.astype(np.float64) * 255 / 65535)  # [0, 128, 255, 4]
    assert np.asarray(open_rgb(tmp_path / "g16.png")).transpose(2, 0, 1).tolist() == [expected.tolist()] * 3

    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert np.asarray(open_rgb(tmp_path / "l.png")).tolist() == [[[77] * 3] * 2] * 2
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    cmyk.save(tmp_path / "c.jpg", quality=100)
    assert (
        np.abs(
            np.asarray(open_rgb(tmp_path / "c.jpg")).astype(int)
            - np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))
        ).max()
        == 0
    )
    assert np.asarray(open_rgb(tmp_path / "c.jpg"))[0, 0].tolist()[0] > 200  # red stays red


def test_transform_crop_and_flip():
    img = Image.fromarray(np.arange(24 * 12 * 3, dtype=np.uint8).reshape(12, 24, 3) % 251)
    center = transform(img, 12, True, False, random.Random(0))
    assert center.shape == (3, 12, 12)
    assert torch.equal(
        center, torch.from_numpy(np.array(img)[:, 6:18]).permute(2, 0, 1).float() / 127.5 - 1
    )  # no resize needed
    assert torch.equal(transform(img, 12, True, True, random.Random(0)), center.flip(-1))
    crops = {tuple(transform(img, 12, False, False, random.Random(s))[0, 0, :2].tolist()) for s in range(20)}
    assert len(crops) > 3
    assert transform(Image.new("RGB", (37, 53)), 16, True, False, random.Random(0)).shape == (3, 16, 16)


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    for i in range(3):
        png(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:40])  # truncated
    (tmp_path / "2.png").write_text("not an image")
    ds = ImageCaptionDataset(tmp_path, resolution=8)
    assert len(ds) == 3
    item = ds[(1, 5)]  # 1 and 2 are broken: wraps around to 0
    assert item["caption"] == "image 0" and [name for name, _ in item["skipped"]] == ["1.png", "2.png"]
    assert all("unreadable" in why for _, why in item["skipped"])
    batch = collate([ds[(i, i)] for i in range(3)])
    assert batch["pixels"].shape == (3, 3, 8, 8) and len(batch["skipped"]) == 3 and batch["seed"] == [0, 1, 2]
    for i in (1, 2):
        (tmp_path / f"{i}.png").unlink()
    (tmp_path / "0.png").write_text("broken too")
    with pytest.raises(DataError, match="none of the 1 images"):
        ds = ImageCaptionDataset(tmp_path, resolution=8)
        ds[(0, 0)]


@pytest.mark.parametrize("require_captions", [True, False])
def test_the_bad_input_corpus_is_used_or_skipped_with_its_reason(tmp_path, monkeypatch, require_captions):
    """Every file of the corpus (see conftest.write_bad_corpus) is either used, correctly converted, or skipped with
    its reason, and nothing outside the folder is opened. Without required captions (the VAE) captionless images are
    used."""
    expected = write_bad_corpus(tmp_path / "data")
    if not require_captions:
        expected |= dict.fromkeys(CAPTION_PROBLEMS, "used")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(ldm.data.Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    ds = ImageCaptionDataset(tmp_path / "data", resolution=16, require_captions=require_captions)
    outcome = dict(ds.skipped)
    for i in range(len(ds)):
        item = ds[(i, i)]
        outcome |= dict(item["skipped"])
        if not item["skipped"]:
            outcome[ds.name(i)] = "used"
            assert (
                item["pixels"].shape == (3, 16, 16)
                and item["pixels"].isfinite().all()
                and item["pixels"].abs().max() <= 1
            )
    assert sorted(outcome) == sorted(expected)
    assert all(outcome[name].startswith(why) for name, why in expected.items()), {
        n: outcome[n] for n in expected if not outcome[n].startswith(expected[n])
    }
    assert opened and all(str(p).startswith(str(tmp_path / "data")) for p in opened)

    by_name = {ds.name(i): i for i in range(len(ds))}
    assert sorted(ds.captions(by_name["red.png"])) == [
        "a red picture",
        "red",
        "red again",
    ]  # the duplicate's caption joins
    assert (
        len(ds.captions(by_name["long-caption.png"])[0]) > 10_000 - 2
    )  # kept whole: truncating is the tokenizer's job
    pixels = lambda name: ds[(by_name[name], 0)]["pixels"]  # noqa: E731
    assert pixels("cmyk.jpg")[0].mean() > 0.6 and pixels("cmyk.jpg")[1:].mean() < -0.6  # CMYK red stays red
    assert pixels("one-pixel.png").flatten(1).unique(dim=1).tolist() == [[-1.0], [-1.0], [1.0]]  # blue, upscaled
    assert torch.equal(
        pixels("wide.png"), pixels("wide.png")[:, :1, :1].expand(3, 16, 16)
    )  # a center crop of one colour
    assert pixels("palette-alpha.png").max() == 1.0  # transparent pixels on white


def test_nothing_outside_the_folder_is_read(tmp_path, monkeypatch):
    root, outside = tmp_path / "data", png(tmp_path / "secret.png")
    png(root / "ok.png")
    (root / "link.png").symlink_to(outside)
    (root / "metadata.jsonl").write_text(
        "\n".join(
            json.dumps({"file_name": f, "text": "x"})
            for f in ["ok.png", "../secret.png", str(outside), "link.png", "gone.png"]
        )
    )
    opened = []
    real_open = Image.open
    monkeypatch.setattr(ldm.data.Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    ds = ImageCaptionDataset(root, resolution=8)
    for i in range(len(ds)):
        ds[(i, 0)]
    assert len(ds) == 1 and opened and all(str(p).startswith(str(root)) for p in opened)
    reasons = dict(ds.skipped)
    assert reasons == {
        "../secret.png": "outside the dataset folder",
        str(outside): "outside the dataset folder",
        "link.png": "outside the dataset folder",
        "gone.png": "file not found",
    }


SCAN = """
import sys
from ldm.data import ImageCaptionDataset
for name, why in ImageCaptionDataset(sys.argv[1], resolution=8).skipped:
    print(f"{name}: {why}")
"""


def test_fifos_devices_and_folders_named_like_data_files_are_skipped_at_once(tmp_path):
    """A FIFO named metadata.jsonl would block its reader forever: the scan (in a child process, with a timeout)
    skips it, and every other file that is not a regular one, as "not a regular file"."""
    png(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "ok.txt").write_text("a red square")
    os.mkfifo(tmp_path / "a" / "metadata.jsonl")
    os.mkfifo(tmp_path / "a" / "fifo.png")
    (tmp_path / "a" / "folder.png").mkdir()
    png(tmp_path / "b" / "sub" / "ok.png")
    (tmp_path / "b" / "sub" / "ok.txt").write_text("a red square")
    os.mkfifo(tmp_path / "b" / "sub" / "metadata.jsonl")
    (tmp_path / "b" / "metadata.csv").mkdir()
    (tmp_path / "b" / "metadata.jsonl").symlink_to("/dev/zero")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "folder.png").mkdir()
    os.mkfifo(tmp_path / "c" / "fifo.png")
    png(tmp_path / "c" / "ok.png")
    rows = [{"file_name": name, "text": "x"} for name in ("ok.png", "folder.png", "fifo.png", "gone.png")]
    (tmp_path / "c" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    scans = {}
    for name in "abc":
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", SCAN, str(tmp_path / name)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and time.monotonic() - start < 60, out.stderr[-2000:]
        scans[name] = out.stdout.splitlines()
    assert scans["a"] == [
        "metadata.jsonl: not a regular file",
        "fifo.png: not a regular file",
        "folder.png: not a regular file",
    ]
    assert scans["b"] == [
        "metadata.csv: not a regular file",
        "metadata.jsonl: not a regular file",
        "sub/metadata.jsonl: not a regular file",
    ]
    assert scans["c"] == ["folder.png: not a regular file", "fifo.png: not a regular file", "gone.png: file not found"]


def test_empty_and_missing_datasets_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    png(tmp_path / "nocaptions" / "a.png")
    with pytest.raises(DataError, match="cannot load dataset"):
        ImageCaptionDataset(tmp_path / "empty", resolution=8)
    with pytest.raises(
        DataError, match=r"no images with captions found in .*nocaptions \(1 skipped, e.g. a.png: no caption"
    ):
        ImageCaptionDataset(tmp_path / "nocaptions", resolution=8)


def hf_dataset(n=4):
    images = [Image.new("RGB", (12, 10), (40 * i, 20, 200)) for i in range(n)]
    return datasets.Dataset.from_dict(
        {"img": images, "caption": [[f"cap {i}", f"other {i}"] for i in range(n)]},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}),
    )


def test_save_to_disk_and_load_dataset_folders(tmp_path):
    hf_dataset().save_to_disk(str(tmp_path / "saved"))
    ds = ImageCaptionDataset(tmp_path / "saved", resolution=8, image_column="img", caption_column="caption")
    assert len(ds) == 4 and ds.captions(2) == ["cap 2", "other 2"]
    np.testing.assert_allclose(ds[(3, 0)]["pixels"][:, 0, 0].numpy(), (np.array([120, 20, 200]) / 127.5 - 1), atol=1e-6)

    (tmp_path / "parquet").mkdir()
    hf_dataset().to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    ds = ImageCaptionDataset(tmp_path / "parquet", resolution=8, image_column="img", caption_column="caption")
    assert len(ds) == 4 and ds[(1, 0)]["caption"] in ("cap 1", "other 1")
    with pytest.raises(DataError, match="no column 'text' .*columns: img, caption"):
        ImageCaptionDataset(tmp_path / "saved", resolution=8, image_column="img")


def test_corrupt_image_bytes_in_a_dataset_are_skipped(tmp_path):
    good = hf_dataset(2).cast_column("img", datasets.Image(decode=False))
    rows = good.to_list()
    rows[0]["img"] = {"bytes": b"\x89PNG broken", "path": None}
    rows.append({"img": {"bytes": None, "path": "/etc/hostname"}, "caption": ["escape"]})
    bad = datasets.Dataset.from_list(rows, features=good.features)
    bad.save_to_disk(str(tmp_path / "bad"))
    ds = ImageCaptionDataset(tmp_path / "bad", resolution=8, image_column="img", caption_column="caption")
    item = ds[(2, 0)]  # the escaping row, then the broken one, then row 1
    assert item["caption"] in ("cap 1", "other 1")
    assert [(name, "outside" in why or "unreadable" in why) for name, why in item["skipped"]] == [
        ("row 2", True),
        ("row 0", True),
    ]


def test_stream_is_independent_of_process_count_and_resumes_exactly():
    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    n, batch = 10, 3
    one = take(StreamSampler(n, 2 * batch, seed=7), 6 * batch)
    ranks = [take(StreamSampler(n, batch, rank=r, world=2, seed=7), 3 * batch) for r in range(2)]
    interleaved = [key for step in range(3) for r in range(2) for key in ranks[r][step * batch : (step + 1) * batch]]
    assert interleaved == one
    assert take(StreamSampler(n, 2 * batch, seed=7, start=4 * batch), 2 * batch) == one[4 * batch :]
    first_epoch = [i for i, _ in take(StreamSampler(n, 1, seed=7), n)]
    assert sorted(first_epoch) == list(range(n)) and first_epoch != list(range(n))
    assert len({s for _, s in one}) == len(one)  # every position its own seed


def test_rotate_hue_turns_colours_about_the_grey_axis():
    """120 degrees sends red to green to blue (a channel cycle), 360 is the identity, greys and white stay, and two
    turns compose; the distance of a colour from the grey axis (its saturation) is kept where nothing clips."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 3, 5, 5), generator=g) * 0.8 - 0.4  # |x_i| <= 0.4: turned, no channel leaves [-1, 1]
    cycled = rotate_hue(x, torch.tensor([120.0, 240.0, 360.0]))
    assert torch.allclose(cycled[0], x[0].roll(1, 0), atol=1e-6)  # (r, g, b) -> (b, r, g)
    assert torch.allclose(cycled[1], x[1].roll(2, 0), atol=1e-6)
    assert torch.allclose(cycled[2], x[2], atol=1e-6)
    greys = torch.linspace(-1, 1, 5).view(1, 1, 5, 1).expand(1, 3, 5, 2)
    assert torch.allclose(rotate_hue(greys, torch.tensor([77.0])), greys, atol=1e-6)
    a, b = torch.tensor([25.0, 25.0, 25.0]), torch.tensor([10.0, 10.0, 10.0])
    assert torch.allclose(rotate_hue(rotate_hue(x, a), b), rotate_hue(x, a + b), atol=1e-5)
    chroma = lambda y: (y - y.mean(1, keepdim=True)).norm(dim=1)  # noqa: E731
    assert torch.allclose(chroma(rotate_hue(x, a)), chroma(x), atol=1e-5)
