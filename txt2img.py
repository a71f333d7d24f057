r"""txt2img.py: text-to-image, img2img and inpainting with a Stable Diffusion v1 checkpoint.

    python txt2img.py --prompt "a red apple"   # the embedded 32x32 emoji model
    python txt2img.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a lighthouse at dusk" \
        --sampler dpmpp_2m_karras --steps 25
    python txt2img.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "an oil painting" \
        --init-image photo.png --strength 0.6
    python txt2img.py --ckpt sd-v1-5-inpainting.ckpt --prompt "a vase of tulips" --init-image room.png --mask mask.png
    python txt2img.py --ckpt sd15.safetensors --prompt "a fox, in mystyle" \
        --lora detail.safetensors:0.6 --embedding mystyle.pt

Writes one PNG per image into --outdir, numbered after the PNGs already there (nothing is overwritten), and a
grid when a run makes more than one image. Each PNG carries its generation parameters: AUTOMATIC1111's
"parameters" text chunk and the same facts as JSON in an "ldm" chunk (--no-metadata leaves both out).
Image k of a run has seed --seed + k; the same parameters (batch size included) give the same image bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import sys
import tempfile
import warnings
from pathlib import Path

from ldm import cli

PROMPT_FILE_LIMIT = 1 << 20  # --from-file is read up to 1 MiB (`--from-file /dev/zero` would read forever)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="txt2img.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: the empty prompt, as SD)")
    p.add_argument("--from-file", type=Path, help="a text file with one prompt per line, instead of --prompt")
    p.add_argument(
        "--ckpt",
        type=Path,
        help="an SD v1 .safetensors/.ckpt, a diffusers folder or one of ours (default: the embedded model)",
    )
    p.add_argument("--config", type=Path, help="architecture YAML, for a single file that does not carry its config")
    p.add_argument("--sampler", default="ddim", choices=cli.SAMPLER_NAMES, help="default: ddim")
    p.add_argument("--steps", "--ddim_steps", type=int, default=50, help="sampling steps (default: 50)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5; 1: none)")
    p.add_argument(
        "--prompt-syntax",
        choices=cli.SYNTAX_NAMES,
        default="a1111",
        help="a1111 (default): AUTOMATIC1111's (word:1.3), [word], BREAK; plain: every character literal",
    )
    p.add_argument(
        "--clip-skip",
        type=int,
        default=1,
        help="condition on the text encoder's N-th last layer (default: 1, the last)",
    )
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi, 0..1 (default: 0, off)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image k gets seed + k (default: 42)")
    p.add_argument("--H", type=int, help="height in pixels (default: the model's; img2img: the init image's)")
    p.add_argument("--W", type=int, help="width in pixels (default: the model's; img2img: the init image's)")
    p.add_argument(
        "--n-samples",
        "--n_samples",
        type=int,
        default=1,
        help="images per prompt made as one batch, in sub-batches that fit in memory (default: 1)",
    )
    p.add_argument("--n-iter", "--n_iter", type=int, default=1, help="batches per prompt (default: 1)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/txt2img-samples"))
    p.add_argument(
        "--eta", "--ddim_eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (ddim only)"
    )
    p.add_argument("--init-image", type=Path, help="img2img: the image to start from")
    p.add_argument(
        "--strength",
        type=float,
        help="fraction of the steps run from the init image, in (0, 1] (default: 0.75; inpainting: 1)",
    )
    p.add_argument(
        "--mask", type=Path, help="inpainting: white = repaint, black = keep, grey = blend (the init image's size)"
    )
    p.add_argument(
        "--dtype",
        choices=cli.DTYPE_NAMES,
        default="fp32",
        help="fp32 (default), fp16, bf16, or auto: bf16 on CPUs with AMX / AVX512-BF16, fp32 on others, fp16 on CUDA",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda when there is one, else cpu)")
    p.add_argument(
        "--quantize",
        choices=cli.QUANTIZE_NAMES,
        help="int8: PyTorch's dynamic int8 UNet (CPU, fp32): faster, a slightly different image",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (the first image pays the compile time)"
    )
    p.add_argument(
        "--backend",
        choices=("torch", "openvino"),
        default="torch",
        help="openvino: the UNet and VAE decoder converted to OpenVINO (once per weights, cached), in --dtype fp32 or "
        "bf16, or with int8 weights (--quantize int8); pip install 'ldm[openvino]'",
    )
    p.add_argument(
        "--deepcache",
        type=int,
        metavar="N",
        help="DeepCache: the whole UNet every N-th call, its deep features reused between (faster, close image)",
    )
    p.add_argument(
        "--deepcache-branch",
        type=int,
        default=0,
        help="DeepCache's skip branch: 0 (default) recomputes the least; higher stays closer to the full call",
    )
    p.add_argument(
        "--save-intermediates", action="store_true", help="also save a strip of each image's denoising trajectory"
    )
    p.add_argument("--skip-grid", "--skip_grid", action="store_true", help="no grid image")
    p.add_argument("--no-metadata", action="store_true", help="write PNGs without the generation parameters")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="merge a LoRA (kohya / AUTOMATIC1111 / diffusers file) at WEIGHT (default: 1); repeatable",
    )
    p.add_argument(
        "--lora-dir",
        type=Path,
        default=Path("models/Lora"),
        help="where a prompt's <lora:NAME:W> finds NAME.safetensors (default: models/Lora, as AUTOMATIC1111)",
    )
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE[:TOKEN]",
        help="a textual-inversion embedding, its trigger word TOKEN (default: the file's); repeatable",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args(None)  # --help and a mistyped flag answer here, before the imports below take seconds (torch, diffusers)

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm import DEFAULT_MODEL, load_pipeline
from ldm.checkpoint import peek_config
from ldm.config import load_config
from ldm.lora import a1111_hash
from ldm.pipeline import DTYPES, InputError, Pipeline, auto_dtype, check_request, load_image
from ldm.prompts import lora_tags
from ldm.samplers import SAMPLERS


def read_prompts(args) -> list[str]:
    if (args.prompt is None) == (args.from_file is None):
        raise InputError("give exactly one of --prompt and --from-file")
    for flag, text in (("--prompt", args.prompt or ""), ("--negative-prompt", args.negative_prompt)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line
            raise InputError(f"{flag} is not UTF-8 text") from None
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.from_file, "rb") as f:
            data = f.read(PROMPT_FILE_LIMIT + 1)
        prompts = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts from {args.from_file}: {e}") from None
    if len(data) > PROMPT_FILE_LIMIT:
        raise InputError(
            f"--from-file {args.from_file} is over {PROMPT_FILE_LIMIT >> 20} MiB: split it into smaller files"
        )
    if not prompts:
        raise InputError(f"{args.from_file} holds no prompt")
    return prompts


def model_hash(path: Path) -> str:
    """AUTOMATIC1111's model hash: the first 10 hex digits of the file's SHA-256 (a folder: of its files, in order)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:10]


def a1111_text(facts: dict) -> str:
    """The `parameters` text AUTOMATIC1111 writes: prompt, negative prompt, then `Key: value` pairs."""

    def quote(
        value,
    ) -> str:  # as A1111 quotes, and also what its reader would otherwise change (quotes, blanks at the ends)
        text = str(value)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') or text != text.strip() else text

    clip_skip = facts.get("clip_skip", 1)
    pairs = {
        "Steps": facts["steps"],
        "Sampler": SAMPLERS[facts["sampler"]][2],
        "CFG scale": facts["scale"],
        "Seed": facts["seed"],
        "Size": f"{facts['width']}x{facts['height']}",
        "Model hash": facts["model_hash"],
        "Model": facts["model"],
        "Denoising strength": facts.get("strength"),
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Eta DDIM": facts["eta"] or None,
        "Guidance rescale": facts["guidance_rescale"] or None,
        "Batch size": facts["batch_size"] if facts["batch_size"] > 1 else None,
        "Batch pos": facts["batch_pos"] if facts["batch_size"] > 1 else None,
        "Emphasis": "None" if facts.get("prompt_syntax") == "plain" else None,  # A1111's name for "plain"
    }
    pairs["Lora hashes"] = ", ".join(f"{lora['name']}: {lora['hash']}" for lora in facts.get("loras", [])) or None
    pairs["TI hashes"] = ", ".join(f"{e['token']}: {e['hash']}" for e in facts.get("embeddings", [])) or None
    lines = [facts["prompt"]] + ([f"Negative prompt: {facts['negative_prompt']}"] if facts["negative_prompt"] else [])
    return "\n".join(lines + [", ".join(f"{k}: {quote(v)}" for k, v in pairs.items() if v is not None)])


def file_spec(value: str, flag: str, weight: bool) -> tuple[Path, float | str | None]:
    """FILE[:SUFFIX] of --lora (a weight, default 1) or --embedding (a token, default None): a colon ends the file
    name only where the whole value is not an existing file."""
    path, _, suffix = value.rpartition(":")
    if Path(value).is_file() or not path:
        return Path(value), 1.0 if weight else None
    if not weight:
        return Path(path), suffix
    try:
        number = float(suffix)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"{flag} {value}: the weight after the last ':' must be a finite number, got '{suffix}'")
    return Path(path), number


def next_number(outdir: Path) -> int:
    """1 + the highest number that starts a PNG name in outdir (0 when there is none)."""
    numbers = [int(m.group(1)) for p in outdir.glob("*.png") if (m := re.match(r"(\d+)", p.name))]
    return max(numbers, default=-1) + 1


def save_png(image: Image.Image, path: Path, facts: dict | None) -> Path:
    """Write a new PNG (never replacing a file), with the parameters chunks unless facts is None."""
    info = None
    if facts is not None:
        info = PngInfo()
        info.add_text("parameters", a1111_text(facts))
        info.add_text("ldm", json.dumps(facts, ensure_ascii=False))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:
            image.save(f, format="PNG", pnginfo=info)
    except FileExistsError:
        raise InputError(f"{path} appeared while writing: not overwriting it") from None
    except KeyboardInterrupt:  # Ctrl-C while writing: no partial file stays
        path.unlink(missing_ok=True)
        raise
    except OSError as e:  # the disk is full, the folder is read-only...: no partial file stays
        path.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def lora_facts(pipe: Pipeline, path: Path, weight: float, te_weight: float | None, no_metadata: bool) -> dict:
    """Merge a LoRA into the pipeline's weights; what the PNG metadata says of it (A1111's hash: of the tensor data
    of a .safetensors file, as its "addnet" hash)."""
    pipe.load_lora(path, weight, None if te_weight == weight else te_weight)
    hashed = None if no_metadata else a1111_hash(path, addnet=path.suffix == ".safetensors")
    facts = {"name": path.stem, "file": str(path), "weight": weight, "hash": hashed}
    return facts if te_weight in (None, weight) else facts | {"te_weight": te_weight}


def run(pipe: Pipeline, args, prompts: list[str], init_image, mask, model: dict, tagged: dict) -> list[Path]:
    """Make n_iter batches of n_samples images per prompt; write them (and strips, grid); return the paths.
    tagged: {prompt: (its text without <lora:...> tags, [(file, text-encoder weight, UNet weight)])}."""
    options = dict(
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        scale=args.scale,
        sampler=args.sampler,
        height=args.H,
        width=args.W,
        eta=args.eta,
        n_samples=args.n_samples,
        guidance_rescale=args.guidance_rescale,
        prompt_syntax=args.prompt_syntax,
        clip_skip=args.clip_skip,
        deepcache=args.deepcache,
        deepcache_branch=args.deepcache_branch,
    )
    run_facts = {
        "mode": "txt2img",
        **{k: v for k, v in options.items() if k not in ("height", "width", "n_samples")},
        **model,
        "batch_size": args.n_samples,
        "dtype": args.dtype,
        "device": args.device,
        "quantize": args.quantize,
        "backend": args.backend,
    }
    if init_image is not None:
        options |= dict(init_image=init_image, mask=mask, strength=args.strength)
        run_facts |= {"mode": "img2img", "init_image": str(args.init_image), "strength": args.strength}
        if mask is not None:
            run_facts |= {"mode": "inpaint", "mask": str(args.mask)}
    number, seed, written, rows, first_facts = next_number(args.outdir), args.seed, [], [], None
    tag_loras: list[dict] = []  # the LoRAs of the last prompt's tags, merged beside those of --lora
    for prompt in prompts:
        text, tags = tagged.get(prompt, (prompt, []))
        if tags or tag_loras:  # the weights are --lora's alone again, then this prompt's tags are merged
            pipe.unload_loras()
            for lora in model.get("loras", []):
                pipe.load_lora(lora["file"], lora["weight"])
            tag_loras = [lora_facts(pipe, path, unet_w, te_w, args.no_metadata) for path, te_w, unet_w in tags]
        for _ in range(args.n_iter):
            trajectory = [] if args.save_intermediates else None
            batch = pipe.generate(text, seed=seed, trajectory=trajectory, **options)
            strips = pipe.trajectory_strips(trajectory) if trajectory is not None else [None] * len(batch)
            for pos, (image, strip) in enumerate(zip(batch, strips)):
                facts = run_facts | {
                    "prompt": prompt,
                    "seed": seed + pos,
                    "width": image.width,
                    "height": image.height,
                    "batch_pos": pos,
                }
                if tag_loras:
                    facts["loras"] = model.get("loras", []) + tag_loras
                facts = None if args.no_metadata else facts
                first_facts = first_facts or facts
                written.append(save_png(image, args.outdir / f"{number:05}.png", facts))
                if strip is not None:
                    written.append(save_png(strip, args.outdir / f"{number:05}-trajectory.png", facts))
                number += 1
            seed += len(batch)
            rows.append(batch)
    if len(rows) * len(rows[0]) > 1 and not args.skip_grid:  # one row per batch, carrying the first image's parameters
        width, height = rows[0][0].size
        grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)))
        for r, batch in enumerate(rows):
            for c, image in enumerate(batch):
                grid.paste(image, (c * width, r * height))
        grids = [int(m.group(1)) for p in args.outdir.glob("grid-*.png") if (m := re.match(r"grid-(\d+)", p.name))]
        written.append(save_png(grid, args.outdir / f"grid-{max(grids, default=-1) + 1:04}.png", first_facts))
    return written


def show_note(message, *_):
    print(f"note: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: generate(args))


def generate(args) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = show_note  # warnings (an image resized, a prompt truncated) as one-line notes
        written = execute(args)
    print("\n".join(map(str, written)))
    return 0


def check_writable(outdir: Path) -> None:
    """Fail before the model loads, not after the images, where outdir cannot be made or written: make it, write a
    temporary file into it, then remove the folders made for the check (bad input leaves nothing behind)."""
    made = []  # deepest first
    try:
        for folder in (outdir, *outdir.absolute().parents):  # the folder, or where it will be made
            if folder.exists():
                break
            made.append(folder)
        if not folder.is_dir():
            raise InputError(f"--outdir {outdir}: {folder} is a file, not a folder")
        outdir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=outdir).close()
    except OSError as e:  # a name too long, a broken link, a read-only file system, no permission...
        raise InputError(f"--outdir {outdir}: cannot write there ({e.strerror or e})") from None
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # one that was never made
                folder.rmdir()


def execute(args) -> list[Path]:
    """Check the input, load the model, generate and write the images; return the paths written."""
    prompts = read_prompts(args)
    if args.n_iter < 1:
        raise InputError(f"--n-iter must be at least 1, got {args.n_iter}")
    for flag, value in (
        ("--scale", args.scale),
        ("--eta", args.eta),
        ("--guidance-rescale", args.guidance_rescale),
        ("--strength", args.strength),
    ):
        if value is not None and not math.isfinite(value):
            raise InputError(f"{flag} must be a finite number, got {value}")
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive number of pixels, got {value}")
    last_seed = args.seed + len(prompts) * args.n_iter * max(args.n_samples, 1) - 1
    if not -(2**63) <= args.seed <= last_seed < 2**64:  # the range of torch.Generator.manual_seed
        raise InputError(
            f"--seed {args.seed}: the seeds of the images must lie in [-2**63, 2**64), the last would be {last_seed}"
        )
    if args.strength is not None and args.init_image is None:
        raise InputError("--strength needs --init-image")
    if args.init_image is not None and args.strength is None:
        args.strength = 1.0 if args.mask is not None else 0.75
    loras = [file_spec(value, "--lora", weight=True) for value in args.lora]
    # A1111's <lora:NAME:W> tags: taken out of each prompt, their files found now (before loading the model)
    tagged = {p: lora_tags(p, args.lora_dir) for p in prompts} if args.prompt_syntax == "a1111" else {}
    embeddings = [file_spec(value, "--embedding", weight=False) for value in args.embedding]
    init_image = load_image(args.init_image) if args.init_image else None
    mask = load_image(args.mask, "L") if args.mask else None
    ckpt = DEFAULT_MODEL if args.ckpt is None else args.ckpt
    check_writable(args.outdir)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise InputError(f"unknown --device '{args.device}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but no CUDA device is available")
    if args.dtype == "auto":
        args.dtype, why = auto_dtype(device)
        print(f"note: --dtype auto: {args.dtype} ({why})", file=sys.stderr)
    config = load_config(args.config) if args.config else None
    check_request(  # before loading: a request that cannot run costs no loading time
        config or peek_config(ckpt),
        [tagged[p][0] if p in tagged else p for p in prompts],
        n_samples=args.n_samples,
        steps=args.steps,
        sampler=args.sampler,
        strength=1.0 if args.strength is None else args.strength,
        eta=args.eta,
        guidance_rescale=args.guidance_rescale,
        scale=args.scale,
        init_image=init_image,
        mask=mask,
        height=args.H,
        width=args.W,
        device=device,
        dtype=DTYPES[args.dtype],
        deepcache=args.deepcache,
        deepcache_branch=args.deepcache_branch,
    )
    openvino = args.backend == "openvino"
    if openvino and (device.type != "cpu" or args.dtype == "fp16" or args.compile):
        raise InputError("--backend openvino runs on the CPU in --dtype fp32 or bf16, without --compile")
    precision = args.quantize or args.dtype
    dtype = torch.float32 if openvino else DTYPES[args.dtype]  # (the text encoder stays torch, in fp32)
    quantize = None if openvino else args.quantize
    pipe = load_pipeline(ckpt, device, dtype, config, quantize, args.compile, args.backend, precision)
    if args.compile:
        print("note: compiling the UNet on its first call (~2-3 min on a CPU, less on a GPU)...", file=sys.stderr)
    model = {
        "model": "ldm-emoji" if args.ckpt is None else ckpt.stem,
        "model_hash": None if args.no_metadata else model_hash(ckpt),
    }
    for path, weight in loras:
        model.setdefault("loras", []).append(lora_facts(pipe, path, weight, None, args.no_metadata))
    for path, token in embeddings:
        tokens = pipe.load_embedding(path, token)
        hashed = None if args.no_metadata else a1111_hash(path)
        embedding = {"token": tokens[0], "file": str(path), "vectors": len(tokens), "hash": hashed}
        model.setdefault("embeddings", []).append(embedding)
    return run(pipe, args, prompts, init_image, mask, model, tagged)


if __name__ == "__main__":
    sys.exit(main())
