"""Generate and write images as txt2img.py does, for every front end (txt2img.py, python -m ldm.webui): numbered PNGs
that never overwrite, each carrying its parameters as AUTOMATIC1111's `parameters` text and as JSON in an `ldm` chunk,
so the same parameters remake the image bit for bit whichever front end made it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.controlnet import Control
from ldm.lora import a1111_hash
from ldm.patcher import LoraPatch
from ldm.pipeline import InputError, Pipeline, load_image, outpaint_canvas
from ldm.samplers import SAMPLERS


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
        "Mask blur": facts.get("mask_blur"),
        "Outpaint": ",".join(map(str, facts["outpaint"])) if "outpaint" in facts else None,
    }
    pairs["Lora hashes"] = ", ".join(f"{lora['name']}: {lora['hash']}" for lora in facts.get("loras", [])) or None
    pairs["TI hashes"] = ", ".join(f"{e['token']}: {e['hash']}" for e in facts.get("embeddings", [])) or None
    for k, unit in enumerate(facts.get("controlnets", [])):  # as the sd-webui-controlnet extension writes a unit
        guess = ", Guess Mode: True" if facts.get("guess_mode") else ""
        pairs[f"ControlNet {k}"] = (
            f"Module: {unit['preprocess']}, Model: {unit['model']} [{unit['hash']}], Weight: {unit['scale']}, "
            f"Guidance Start: {unit['start']}, Guidance End: {unit['end']}{guess}"
        )
    lines = [facts["prompt"]] + ([f"Negative prompt: {facts['negative_prompt']}"] if facts["negative_prompt"] else [])
    return "\n".join(lines + [", ".join(f"{k}: {quote(v)}" for k, v in pairs.items() if v is not None)])


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
    """What the PNG metadata says of a LoRA (A1111's hash: of the tensor data of a .safetensors file, as its "addnet"
    hash, read once by the pipeline's patcher); make_images merges it."""
    hashed = None if no_metadata else pipe.patcher.read(path, a1111_hash, path.suffix == ".safetensors")
    facts = {"name": path.stem, "file": str(path), "weight": weight, "hash": hashed}
    return facts if te_weight in (None, weight) else facts | {"te_weight": te_weight}


def outpaint(args, init_image, mask, cfg) -> tuple:
    """--outpaint: the canvas and the mask that inpaint it (ldm.pipeline.outpaint_canvas); args.outpaint becomes the
    padding after rounding."""
    if init_image is None or mask is not None:
        raise InputError("--outpaint needs --init-image (the picture to extend) and no --mask")
    args.mask_blur = 4 if args.mask_blur is None else args.mask_blur
    try:
        padding = tuple(int(value) for value in args.outpaint.split(","))
    except ValueError:
        raise InputError(f"--outpaint takes LEFT,TOP,RIGHT,BOTTOM in whole pixels, got '{args.outpaint}'") from None
    canvas, mask, args.outpaint = outpaint_canvas(init_image, padding, cfg.vae.factor, args.mask_blur)
    return canvas, mask


def control_units(args) -> list[tuple[dict, Control]]:
    """The --controlnet groups, checked (one --control-image per --controlnet, each other setting given never or
    once per --controlnet): what the PNG metadata says of each, and its Control, whose net is loaded later."""
    n = len(args.controlnet)
    settings = {
        "--control-image": args.control_image,
        "--control-preprocess": args.control_preprocess,
        "--control-scale": args.control_scale,
        "--control-start": args.control_start,
        "--control-end": args.control_end,
    }
    if not n and (any(settings.values()) or args.guess_mode or args.save_control):
        raise InputError("the ControlNet settings need --controlnet FILE")
    for flag, values in settings.items():
        if len(values) != n and (values or flag == "--control-image"):
            raise InputError(f"{flag} is given {len(values)} time(s) for {n} --controlnet: give it once for each")
    units = []
    for k, path in enumerate(args.controlnet):
        unit = {
            "file": path,
            "image": args.control_image[k],
            "preprocess": args.control_preprocess[k] if args.control_preprocess else "none",
            "scale": args.control_scale[k] if args.control_scale else 1.0,
            "start": args.control_start[k] if args.control_start else 0.0,
            "end": args.control_end[k] if args.control_end else 1.0,
        }
        if not Path(path).exists():
            raise InputError(f"--controlnet {path}: no such file or folder")
        image = load_image(unit["image"])
        control = Control(None, image, unit["preprocess"], unit["scale"], unit["start"], unit["end"])
        control.check()
        units.append((unit | {"image": str(unit["image"])}, control))
    return units


def load_controls(pipe: Pipeline, units: list[tuple[dict, Control]], model: dict, no_metadata: bool) -> list[Control]:
    """Load the nets of control_units' Controls into the pipeline's device and dtype; model["controlnets"] says
    what the PNG metadata says of each (its file's stem and A1111 hash)."""
    for unit, control in units:
        control.net = pipe.load_controlnet(unit["file"])
        hashed = None if no_metadata else model_hash(Path(unit["file"]))
        model.setdefault("controlnets", []).append(unit | {"model": Path(unit["file"]).stem, "hash": hashed})
    return [control for _, control in units]


def make_images(
    pipe: Pipeline,
    args,
    prompts: list[str],
    init_image,
    mask,
    model: dict,
    tagged: dict,
    callback: Callable | None = None,
    controls: list[Control] = (),
) -> Iterator[Path]:
    """Make n_iter batches of n_samples images per prompt; write them (and strips, grid), yielding each path once
    written. args: txt2img.py's arguments (the webui fills the same fields); model: the "model" facts of the PNGs
    (model_facts, with "loras" and "embeddings" once loaded); tagged: {prompt: (its text without <lora:...> tags,
    [(file, text-encoder weight, UNet weight)])}; callback: Pipeline.generate's (an exception it raises stops the run,
    and the images written before stay); controls: the ControlNets (ldm.controlnet.Control), their nets loaded."""
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
        if args.outpaint is not None:
            run_facts |= {"mode": "outpaint", "outpaint": list(args.outpaint), "mask_blur": args.mask_blur}
        elif mask is not None:
            run_facts |= {"mode": "inpaint", "mask": str(args.mask)}
    if controls:
        options |= dict(controls=controls, guess_mode=args.guess_mode)
        run_facts["guess_mode"] = args.guess_mode
    number, seed, rows, first_facts = next_number(args.outdir), args.seed, [], None
    maps = [] if args.save_control else None
    for prompt in prompts:
        text, tags = tagged.get(prompt, (prompt, []))
        tag_loras = [lora_facts(pipe, path, unet_w, te_w, args.no_metadata) for path, te_w, unet_w in tags]
        loras = model.get("loras", []) + tag_loras  # --lora's and this prompt's tags'
        pipe.patcher.apply(
            [LoraPatch(f["file"], f["weight"], f.get("te_weight")) for f in loras], pipe.patcher.embeddings
        )
        for _ in range(args.n_iter):
            trajectory = [] if args.save_intermediates else None
            batch = pipe.generate(
                text, seed=seed, trajectory=trajectory, callback=callback, control_maps=maps, **options
            )
            for k, control_map in enumerate(maps or []):  # the maps of the first call (all calls use the same)
                yield save_png(control_map, args.outdir / f"{number:05}-control-{k}.png", None)
            maps = None
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
                yield save_png(image, args.outdir / f"{number:05}.png", facts)
                if strip is not None:
                    yield save_png(strip, args.outdir / f"{number:05}-trajectory.png", facts)
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
        yield save_png(grid, args.outdir / f"grid-{max(grids, default=-1) + 1:04}.png", first_facts)


def model_facts(ckpt: Path, embedded: bool, no_metadata: bool = False) -> dict:
    """What the PNGs say of the model: its name (the file's stem; "ldm-emoji" for the embedded one) and A1111's hash."""
    return {"model": "ldm-emoji" if embedded else ckpt.stem, "model_hash": None if no_metadata else model_hash(ckpt)}


def embedding_facts(pipe: Pipeline, path: Path, token: str | None, no_metadata: bool) -> dict:
    """Add a textual-inversion embedding to the pipeline's text encoder; what the PNG metadata says of it."""
    tokens = pipe.load_embedding(path, token)
    hashed = None if no_metadata else pipe.patcher.read(path, a1111_hash)
    return {"token": tokens[0], "file": str(path), "vectors": len(tokens), "hash": hashed}
