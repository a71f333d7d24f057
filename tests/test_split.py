"""python -m ldm.datasets.split: two imagefolders that Hugging Face `datasets` (the oracle) reads back as a partition
of the source, the held-out part of the asked size and seed; bad input is one line and overwrites nothing."""

import json

import numpy as np
from PIL import Image

from ldm.datasets.split import main


def read_back(folder, cache):
    """{image bytes: captions} of an imagefolder, as `datasets` loads it."""
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache))
    return {np.asarray(row["image"]).tobytes(): row["text"] for row in ds}


def test_split_is_a_partition(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        name = f"{'sub/' if i % 3 == 0 else ''}{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(src / name)
        rows.append({"file_name": name, "text": [f"thing {i}", f"a thing {i}"]})
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main([str(src), str(tmp_path / "train"), str(tmp_path / "held"), "--holdout", "4"]) == 0
    assert capsys.readouterr().out == "wrote 8 + 4 images\n"
    whole, train, held = (read_back(tmp_path / d, tmp_path / "cache") for d in ("src", "train", "held"))
    assert len(whole) == 12 and len(train) == 8 and len(held) == 4
    assert not set(train) & set(held) and train | held == whole  # disjoint, and the same images with their captions
    assert main([str(src), str(tmp_path / "train1"), str(tmp_path / "held1"), "--holdout", "4", "--seed", "1"]) == 0
    assert read_back(tmp_path / "held1", tmp_path / "cache") != held  # the seed picks them
    assert main([str(src), str(tmp_path / "train2"), str(tmp_path / "held2"), "--holdout", "4"]) == 0
    assert read_back(tmp_path / "held2", tmp_path / "cache") == held  # and only the seed

    before = (tmp_path / "train" / "metadata.jsonl").read_bytes()
    capsys.readouterr()
    for args, message in [
        ((src, tmp_path / "train", tmp_path / "x", "--holdout", "4"), "is not empty"),
        ((src, tmp_path / "y", tmp_path / "z", "--holdout", "12"), "--holdout must be between 1 and 11"),
        ((tmp_path / "none", tmp_path / "y", tmp_path / "z", "--holdout", "1"), "not a folder"),
    ]:
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert (tmp_path / "train" / "metadata.jsonl").read_bytes() == before
    assert not any((tmp_path / d).exists() for d in "xyz")
