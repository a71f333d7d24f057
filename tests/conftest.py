import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # ~8 ms less per small op when the CPU is contended
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState, GradientState, PartialState  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image  # noqa: E402

import txt2img  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.model import StableDiffusion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cfg():
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def sd_cfg():
    return load_config(ROOT / "configs" / "sd-v1.yaml")


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh non-zero random weights everywhere (zero-initialised output convs would hide bugs): N(0, 0.25 / fan-in)
    plus 0.01 N(0, 1), drawn in place (the full-size models hold a billion of them): the numbers of
    `randn(shape, generator=g) * std + 0.01 * randn(shape, generator=g)`, bit for bit, at half the time."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            w = torch.empty(p.shape).normal_(0, 0.5 / max(1, p[0].numel()) ** 0.5, generator=g)
            p.copy_(w.add_(torch.randn(p.shape, generator=g).mul_(0.01)))
    return module


def launcher(processes: int) -> list[str]:
    """The command line that starts a training script on `processes` CPU processes: python itself for one, else
    `accelerate launch --multi_gpu` (`--cpu --num_processes 2` starts ONE process: Accelerate 1.15 runs several CPU
    processes only through MPI; `--multi_gpu` goes through torchrun, which without GPUs gives gloo CPU processes)."""
    if processes == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def run_in_process(script, argv) -> int:
    """script.main(argv) in this process, with Accelerate's process-wide state reset around it."""
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*([True] if state is AcceleratorState else []))
    try:
        return script.main(argv)
    finally:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state(*([True] if state is AcceleratorState else []))


def compvis_original_config(cfg) -> dict:
    """Our ModelConfig written as the CompVis v1-inference.yaml dict that diffusers' converters read."""
    u, v = cfg.unet, cfg.vae
    return {
        "model": {
            "params": {
                "scale_factor": cfg.scale_factor,
                "unet_config": {
                    "params": {
                        "in_channels": u.in_channels,
                        "out_channels": u.out_channels,
                        "model_channels": u.model_channels,
                        "attention_resolutions": list(u.attention_resolutions),
                        "num_res_blocks": u.num_res_blocks,
                        "channel_mult": list(u.channel_mult),
                        "num_heads": u.num_heads,
                        "transformer_depth": u.transformer_depth,
                        "context_dim": u.context_dim,
                    }
                },
                "first_stage_config": {
                    "params": {
                        "embed_dim": v.embed_dim,
                        "ddconfig": {
                            "double_z": v.double_z,
                            "z_channels": v.z_channels,
                            "resolution": v.resolution,
                            "in_channels": v.in_channels,
                            "out_ch": v.out_ch,
                            "ch": v.ch,
                            "ch_mult": list(v.ch_mult),
                            "num_res_blocks": v.num_res_blocks,
                            "attn_resolutions": list(v.attn_resolutions),
                        },
                    }
                },
            }
        }
    }


# The tiny model and the runs of the pipeline tests (test_pipeline.py, test_samplers.py): ours and diffusers'.
PROMPT = "a red apple on a table"
STEPS = 5
LATENT_ATOL = 1e-4


def tiny_model(
    in_channels: int = 4, parameterization: str = "eps", overrides: tuple[str, ...] = (), config: str = "tiny.yaml"
) -> StableDiffusion:
    """randomize_'s weights, cross-attention scaled up 10x: with plain random weights the UNet attends almost
    uniformly over the 77 tokens and the prompt barely moves the result, so a wrong prompt, negative prompt or
    guidance would go unnoticed (test_the_prompt_matters checks that it does not). overrides: more config keys;
    config: the model YAML in configs/ (tiny-sd2.yaml: the SD 2.x shape)."""
    overrides = [f"unet.in_channels={in_channels}", f"parameterization={parameterization}", *overrides]
    cfg = load_config(ROOT / "configs" / config, overrides)
    model = randomize_(StableDiffusion(cfg)).eval()
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if ".attn2." in name:
                p.mul_(10)
    return model


def tiny_diffusers_vae():
    """diffusers' AutoencoderKL of configs/tiny.yaml's VAE (16x16 images, 8x8x4 latents), made by diffusers."""
    return AutoencoderKL(
        block_out_channels=(16, 32),
        norm_num_groups=4,
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def diffusers_run(ref, seed: int, n: int, **kwargs):
    """diffusers' images and final latents, with image i's generator seeded seed + i (DPM++ SDE: its Brownian tree
    of image i too, as AUTOMATIC1111 and ldm.samplers seed it; STEPS steps unless kwargs say)."""
    if hasattr(ref.scheduler, "noise_sampler_seed"):
        ref.scheduler.noise_sampler_seed = list(range(seed, seed + n))
    final = {}

    def keep(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    images = ref(
        PROMPT,
        num_images_per_prompt=n,
        generator=generators(seed, n),
        callback_on_step_end=keep,
        **{"num_inference_steps": STEPS} | kwargs,
    ).images
    return images, final["latents"]


def ours_run(pipe, seed: int, n: int, mode: str = "txt2img", **kwargs):
    trajectory = []
    kwargs = {"steps": STEPS} | kwargs
    images = getattr(pipe, mode)(PROMPT, seed=seed, n_samples=n, progress=False, trajectory=trajectory, **kwargs)
    return images, trajectory


def counted_run(pipe, seed: int, n: int, **kwargs):
    """ours_run's images and trajectory, and the batch size of each UNet call (the rows guidance runs)."""
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        return (*ours_run(pipe, seed, n, **kwargs), batches)
    finally:
        hook.remove()


def assert_same(ours, theirs, latents, their_latents, region=None):
    a, b = pixels(ours), pixels(theirs)
    if region is not None:
        a, b = a[:, region], b[:, region]
    assert np.abs(a - b).mean() <= 1, np.abs(a - b).mean()  # <= 1/255 of the 0..255 range
    assert (latents - their_latents).abs().max() <= LATENT_ATOL


def bilevel_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of any size, written row by row: a 20000x20000 one is a 50 kB file (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def write_bad_corpus(root: Path) -> dict[str, str]:
    """A scraped image folder at its worst, with metadata.jsonl, plus files outside it (in root.parent / "outside").

    Returns {name: what must happen}: "used", or the start of the reason it is skipped for. Captions matter only
    when they are required (train_unet); without (train_vae) the images of CAPTION_PROBLEMS are used."""
    outside = root.parent / "outside"
    root.mkdir(parents=True)
    outside.mkdir()
    rng = np.random.default_rng(0)
    rows, expected = [], {}

    def add(name: str, caption, outcome: str, **row) -> Path:
        rows.append({"file_name": name, **({"text": caption} if caption is not None else {}), **row})
        expected[name] = outcome
        return root / name

    for colour, rgb in {
        "red": (220, 40, 40),
        "green": (40, 200, 60),
        "blue": (40, 60, 220),
        "yellow": (230, 210, 40),
    }.items():
        noisy = np.clip(np.array(rgb) + rng.integers(-25, 26, (16, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(add(f"{colour}.png", [f"a {colour} picture", colour], "used"))
    (root / "red2.png").write_bytes((root / "red.png").read_bytes())
    add("red2.png", "red again", "duplicate (same bytes as red.png")
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(add("cmyk.jpg", "cmyk", "used"), quality=95)
    Image.fromarray(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250).save(add("grey16.png", "16-bit", "used"))
    palette = Image.new("P", (16, 16))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([i % 2 for i in range(256)])
    palette.save(add("palette-alpha.png", "palette", "used"), transparency=0)
    Image.new("L", (18, 16), 90).save(add("grey.png", "grey", "used"))
    Image.new("RGB", (1, 1), (0, 0, 255)).save(add("one-pixel.png", "one pixel", "used"))
    Image.new("RGB", (4000, 2), (0, 128, 0)).save(add("wide.png", "wide", "used"))
    Image.new("RGB", (16, 16), (30, 30, 30)).save(
        add("long-caption.png", "a dark square " * 715, "used")
    )  # 10,010 characters
    add("zero-bytes.png", "empty file", "unreadable").write_bytes(b"")
    add("truncated.png", "truncated", "unreadable").write_bytes((root / "red.png").read_bytes()[:100])
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "whole.jpg")
    add("truncated.jpg", "truncated", "unreadable").write_bytes((root / "whole.jpg").read_bytes()[:200])
    (root / "whole.jpg").unlink()
    add("text.png", "text", "unreadable").write_text("this is not a picture\n")
    add(os.fsdecode(b"broken-\xe9.png"), "bad name", "unreadable").write_bytes(
        b"\x89PNG\r\n\x1a\n"
    )  # a file name not UTF-8
    bilevel_png(
        add("bomb.png", "bomb", "unreadable (DecompressionBombWarning"), 10_000, 10_000
    )  # 1e8 pixels: over the limit
    bilevel_png(
        add("big-bomb.png", "bomb", "unreadable (DecompressionBombError"), 20_000, 20_000
    )  # over twice the limit
    Image.new("RGB", (16, 16), (250, 250, 0)).save(add("no-caption.png", None, "no caption in column 'text'"))
    Image.new("RGB", (16, 16), (250, 0, 250)).save(add("empty-caption.png", "  ", "no caption in column 'text'"))
    Image.new("RGB", (16, 16), (0, 250, 250)).save(
        add("latin1-caption.png", "LATIN1", "caption in column 'text' is not UTF-8")
    )
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "unlisted.png")
    expected["unlisted.png"] = "not listed in a metadata file"
    for name in ("secret.png", "linked.png"):
        Image.new("RGB", (16, 16), (255, 0, 0)).save(outside / name)
    (root / "link.png").symlink_to(outside / "linked.png")
    add("link.png", "link", "outside the dataset folder")
    add("../outside/secret.png", "escape", "outside the dataset folder")
    add(str(outside / "secret.png"), "absolute", "outside the dataset folder")
    lines = [json.dumps(row).encode() for row in rows]
    lines = [line.replace(b"LATIN1", "caf\xe9".encode("latin-1")) for line in lines]  # not UTF-8
    lines.insert(3, b'{"file_name": "red.png", "text": "unterminated')
    expected["metadata.jsonl line 4"] = "not a JSON object"
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return expected


CAPTION_PROBLEMS = ("no-caption.png", "empty-caption.png", "latin1-caption.png")


# `python -c WATCH_OPENS FOLDER SCRIPT ARGS...` runs SCRIPT as __main__ and writes "OPENED <path>" to stderr for every
# file opened (Python's "open" audit event: open(), os.open(), and so Pillow) that resolves into FOLDER.
WATCH_OPENS = """
import os, runpy, sys
watched = os.path.realpath(sys.argv.pop(1))
def audit(event, args):
    path = os.path.realpath(os.fsdecode(args[0])) if event == "open" and isinstance(args[0], (str, bytes)) else ""
    if path.startswith(os.path.join(watched, "")):
        os.write(2, f"OPENED {path}\\n".encode("utf-8", "backslashreplace"))
sys.addaudithook(audit)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def check_corpus_run(output: str, expected: dict[str, str], folder: Path) -> None:
    """A training run (under WATCH_OPENS folder) on write_bad_corpus(folder / "data") went on to the end, its summary
    names each file skipped with its reason (a name that is not UTF-8 escaped) and their count, and of the files
    it opened under `folder`, some are the data's and none is outside the data folder."""
    for name, why in expected.items():
        shown = name.encode("utf-8", "backslashreplace").decode()
        assert (f"\nskipped {shown}: {why}" in output) == (why != "used"), (name, why, output[-3000:])
    assert (
        f"\n{sum(why != 'used' for why in expected.values())} files skipped (" in output and "Traceback" not in output
    )
    opened = [Path(p) for p in re.findall(r"OPENED (.+)", output)]
    data = Path(os.path.realpath(folder / "data"))
    assert any(p.parent == data for p in opened) and not [
        p for p in opened if p.is_relative_to(data.parent / "outside")
    ]


# ---------------------------------------------------------------- the txt2img command and its PNG text


def cli(*args) -> int:
    return txt2img.main([str(a) for a in args])


A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111(text: str) -> dict:
    """AUTOMATIC1111's own reader of its `parameters` text (parse_generation_parameters in modules/infotext_utils.py,
    its prompt and `Key: value` part): the prompt's lines, from a line starting "Negative prompt:" on the negative
    prompt's, each line stripped; on the last line, the pairs, a value in double quotes read as JSON."""
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines, last = lines + [last], ""
    fields, negative = {"Prompt": "", "Negative prompt": ""}, False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative, line = True, line[16:].strip()
        key = "Negative prompt" if negative else "Prompt"
        fields[key] += ("\n" if fields[key] else "") + line
    for key, value in A1111_PARAM.findall(last):
        try:
            fields[key] = json.loads(value) if value[:1] == value[-1:] == '"' else value
        except json.JSONDecodeError:
            fields[key] = value
    return fields


# the web page's txt2img fields (ldm.webui_app.FIELDS) as a run passes them, for the tests that build its requests
PAGE_VALUES = {
    "prompt": "a red apple",
    "negative_prompt": "",
    "seed": 1,
    "batch_size": 1,
    "batch_count": 1,
    "sampler": "ddim",
    "schedule": "default",
    "steps": 2,
    "scale": 3,
    "eta": 0,
    "guidance_rescale": 0,
    "cfg_end": 1,
    "prompt_syntax": "a1111",
    "clip_skip": 1,
    "preview_every": 0,
}
