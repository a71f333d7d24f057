"""The Game Boy style transform of the shipped LoRA: four shades by luma, its statistic, the command line."""

import json

import numpy as np
from PIL import Image

from ldm.data import scan_folder
from ldm.datasets.gameboy import PALETTE, PALETTE_TOLERANCE, gameboy, main, palette_share


def test_four_shades_by_luma_quarter():
    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    rgb[0, :4] = [(0, 0, 0), (255, 255, 255), (100, 100, 100), (63, 63, 63)]
    out = np.asarray(gameboy(Image.fromarray(rgb))).reshape(-1, 3)
    shade = [next(i for i, c in enumerate(PALETTE) if (c == px).all()) for px in out]  # every pixel is a shade
    luma = [0.299 * int(r) + 0.587 * int(g) + 0.114 * int(b) for r, g, b in rgb.reshape(-1, 3)]
    assert shade[:4] == [0, 3, 1, 0] and len(set(shade)) == 4
    assert all(s == min(int(y / 64), 3) for s, y in zip(shade, luma))


def test_palette_share():
    white, styled = Image.new("RGB", (8, 8), "white"), gameboy(Image.new("RGB", (8, 8), (200, 30, 30)))
    assert palette_share([white]) == 0 and palette_share([styled, gameboy(white)]) == 1
    near = Image.new("RGB", (2, 1))
    near.putpixel((0, 0), tuple(int(c) for c in PALETTE[2] + [PALETTE_TOLERANCE, 0, 0]))  # at the tolerance: in
    near.putpixel((1, 0), tuple(int(c) for c in PALETTE[2] + [PALETTE_TOLERANCE + 1, 0, 0]))  # beyond it: out
    assert palette_share([near]) == 0.5


def test_cli_writes_a_styled_imagefolder_and_overwrites_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (6, 6), (200, 30, 30)).save(src / "a.png")
    Image.new("RGBA", (6, 6), (0, 0, 0, 0)).save(src / "sub" / "b.png")  # transparent: white
    rows = [{"file_name": "a.png", "text": ["sun", "a sun"]}, {"file_name": "sub/b.png", "text": "nothing"}]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main([str(src), str(tmp_path / "out")]) == 0
    files, skipped = scan_folder(tmp_path / "out", "text")
    assert not skipped and [(p.relative_to(tmp_path / "out").as_posix(), c) for p, c in files] == [
        ("a.png", ["sun", "a sun"]),
        ("sub/b.png", ["nothing"]),
    ]
    assert np.asarray(Image.open(tmp_path / "out" / "sub" / "b.png")).reshape(-1, 3).tolist()[0] == PALETTE[3].tolist()
    before = (tmp_path / "out" / "a.png").read_bytes()
    capsys.readouterr()
    for args, message in [
        ((src, tmp_path / "out"), "is not empty"),
        ((tmp_path / "none", tmp_path / "x"), "not a folder"),
    ]:
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert (tmp_path / "out" / "a.png").read_bytes() == before and not (tmp_path / "x").exists()
