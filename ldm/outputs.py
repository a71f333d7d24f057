"""The PNGs of a run, for every front end (txt2img.py, python -m ldm.webui): a Request and an OutputSpec (where, how
many, grid, metadata) -> numbered PNGs that never overwrite, each carrying its parameters as AUTOMATIC1111's
`parameters` text and as JSON in an `ldm` chunk (derived from the Request), so the same parameters remake the image
bit for bit whichever front end made it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm import DEFAULT_MODEL
from ldm.lora import a1111_hash
from ldm.pipeline import Pipeline
from ldm.request import InputError, LoraSpec, OutputSpec, Request
from ldm.runtime import Runtime
from ldm.samplers import SAMPLERS, SCHEDULES
from ldm.taesd import taesd_name


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
        "Schedule type": SCHEDULES[facts["schedule"]] if "schedule" in facts else None,
        "CFG scale": facts["scale"],
        "Seed": facts["seed"],
        "Size": f"{facts['width']}x{facts['height']}",
        "Model hash": facts["model_hash"],
        "Model": facts["model"],
        "VAE": facts.get("vae"),
        "Denoising strength": facts.get("strength", facts.get("hires_denoise")),
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Eta DDIM": facts["eta"] or None,
        "Guidance rescale": facts["guidance_rescale"] or None,
        "CFG end": facts.get("cfg_end"),
        "Batch size": facts["batch_size"] if facts["batch_size"] > 1 else None,
        "Batch pos": facts["batch_pos"] if facts["batch_size"] > 1 else None,
        "Emphasis": "None" if facts.get("prompt_syntax") == "plain" else None,  # A1111's name for "plain"
        "Mask blur": facts.get("mask_blur"),
        "Outpaint": ",".join(map(str, facts["outpaint"])) if "outpaint" in facts else None,
    }
    if "hires_upscaler" in facts:  # as A1111 writes its hires fix: what differs from the first pass
        scale, size = facts["hires_scale"], facts["hires_size"]
        pairs["Hires upscale"] = None if scale is None else f"{scale:g}"
        pairs["Hires resize"] = None if size is None else f"{size[0]}x{size[1]}"
        pairs["Hires steps"] = facts["hires_steps"] if facts["hires_steps"] != facts["steps"] else None
        pairs["Hires upscaler"] = facts["hires_upscaler"]
        pairs["Hires sampler"] = (
            SAMPLERS[facts["hires_sampler"]][2] if facts["hires_sampler"] != facts["sampler"] else None
        )
        pairs["Hires prompt"] = facts["hires_prompt"] or None
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


def next_number(outdir: Path, prefix: str = "") -> int:
    """1 + the highest number that follows `prefix` at the start of a PNG name in outdir (0 when there is none)."""
    numbers = [
        int(m.group(1)) for p in outdir.glob(f"{prefix}*.png") if (m := re.match(rf"{re.escape(prefix)}(\d+)", p.name))
    ]
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


def png_facts(resolved: Request, request: Request, pipe: Pipeline, model: dict) -> dict:
    """What every PNG of a request says (its prompt, seed, size and batch position added per image): the resolved
    settings, the files given (init image, mask, control images: request's), the model (model: model_facts and the
    run's device and dtype), the LoRAs, embeddings and ControlNets with A1111's hashes (each file read once, by the
    pipeline's patcher)."""
    hashed = pipe.patcher.read
    r = resolved
    facts = {
        "mode": r.mode,
        "negative_prompt": r.negative_prompt,
        "steps": r.steps,
        "scale": r.scale,
        "sampler": r.sampler,
        "eta": r.eta,
        "guidance_rescale": r.guidance_rescale,
        "prompt_syntax": r.prompt_syntax,
        "clip_skip": r.clip_skip,
        "deepcache": r.deepcache,
        "deepcache_branch": r.deepcache_branch,
        **model,
        "width": r.width,
        "height": r.height,
        "batch_size": r.n_samples,
    }
    if r.cfg_end != 1:
        facts["cfg_end"] = r.cfg_end
    if r.schedule != "default":
        facts["schedule"] = r.schedule
    if r.init_image is not None:
        facts |= {"init_image": str(request.init_image), "strength": r.strength}
    if r.hires:
        facts |= {key: getattr(r, key) for key in ("hires_scale", "hires_steps", "hires_denoise", "hires_upscaler")}
        facts |= {"hires_size": r.hires_size and list(r.hires_size), "hires_sampler": r.hires_sampler}
        facts["hires_prompt"] = r.hires_prompt
    if r.mode == "outpaint":
        facts |= {"outpaint": list(r.outpaint), "mask_blur": r.mask_blur}
    elif r.mode == "inpaint":
        facts["mask"] = str(request.mask)
    if r.controls:
        facts["guess_mode"] = r.guess_mode
        facts["controlnets"] = [
            {
                "file": str(c.net),
                "image": str(given.image),
                "preprocess": c.preprocess,
                "scale": c.scale,
                "start": c.start,
                "end": c.end,
                "model": Path(c.net).stem,
                "hash": hashed(Path(c.net), model_hash),
            }
            for c, given in zip(r.controls, request.controls)
        ]
    if r.loras:
        facts["loras"] = [lora_facts(lora, hashed) for lora in r.loras]
    if r.embeddings:
        tokens = {str(e.file): pipe.embedding_tokens(e.file) for e in r.embeddings}
        facts["embeddings"] = [
            {
                "token": tokens[str(e.file)][0],
                "file": str(e.file),
                "vectors": len(tokens[str(e.file)]),
                "hash": hashed(e.file, a1111_hash),
            }
            for e in r.embeddings
        ]
    return facts


def lora_facts(lora: LoraSpec, hashed: Callable) -> dict:
    """What the PNG metadata says of a LoRA (A1111's hash: of the tensor data of a .safetensors file, as its
    "addnet" hash)."""
    path = Path(lora.file)
    facts = {
        "name": path.stem,
        "file": str(path),
        "weight": lora.weight,
        "hash": hashed(path, a1111_hash, path.suffix == ".safetensors"),
    }
    return facts if lora.te_weight in (None, lora.weight) else facts | {"te_weight": lora.te_weight}


def tag_loras(tags: list[tuple[Path, float, float]]) -> tuple[LoraSpec, ...]:
    """ldm.prompts.lora_tags' [(file, text-encoder weight, UNet weight)] as LoraSpecs."""
    return tuple(LoraSpec(path, unet_w, None if te_w == unet_w else te_w) for path, te_w, unet_w in tags)


def image_facts(facts: dict, seed: int, batch: list[Image.Image]) -> dict | None:
    """The facts of the last image of `batch` (its seed and position; seed: the batch's first), None for no metadata
    (facts empty)."""
    return facts | {"seed": seed + len(batch) - 1, "batch_pos": len(batch) - 1} if facts else None


def make_images(
    pipe: Pipeline,
    request: Request,
    spec: OutputSpec,
    model: dict,
    tagged: dict | None = None,
    callback: Callable | None = None,
) -> Iterator[Path]:
    """Make spec.n_iter batches of request.n_samples images per prompt, the seed going on from batch to batch; write
    them (and strips, control maps, grid), yielding each path once written. model: what the PNGs say of the model
    and the run (model_facts, device, dtype...); tagged: {prompt: (its text without <lora:...> tags, [(file,
    text-encoder weight, UNet weight)])}, each prompt's LoRAs beside request.loras; callback: Pipeline.generate's
    (an exception it raises stops the run, and the images written before stay)."""
    number, seed, rows, first_facts = next_number(spec.outdir), request.seed, [], None
    maps = [] if spec.control_maps else None
    whole = request.resolved(pipe.cfg)  # its image files read once for the whole run
    for prompt in request.prompts:
        text, tags = (tagged or {}).get(prompt, (prompt, []))
        loras = (request.loras or ()) + tag_loras(tags)
        for _ in range(spec.n_iter):
            resolved = replace(whole, prompts=(text,), loras=loras, seed=seed)
            trajectory = [] if spec.intermediates else None
            batch, facts = [], None
            for images in pipe.sub_batches(resolved, trajectory=trajectory, callback=callback, control_maps=maps):
                for k, control_map in enumerate(maps or []):  # the maps of the first call (all calls use the same)
                    yield save_png(control_map, spec.outdir / f"{number:05}-control-{k}.png", None)
                maps = None
                if facts is None:  # once the first sub-batch has applied the request's LoRAs and embeddings
                    facts = png_facts(resolved, request, pipe, model) | {"prompt": prompt} if spec.metadata else {}
                for image in images:  # written as each sub-batch is made
                    batch.append(image)
                    yield save_png(image, spec.outdir / f"{number:05}.png", image_facts(facts, seed, batch))
                    number += 1
            strips = pipe.trajectory_strips(trajectory) if trajectory is not None else []
            for pos, strip in enumerate(strips):
                path = spec.outdir / f"{number - len(batch) + pos:05}-trajectory.png"
                yield save_png(strip, path, image_facts(facts, seed, batch[: pos + 1]))
            first_facts = first_facts or image_facts(facts, seed, batch[:1])
            seed += len(batch)
            rows.append(batch)
    if len(rows) * len(rows[0]) > 1 and spec.grid:  # one row per batch, carrying the first image's parameters
        width, height = rows[0][0].size
        grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)))
        for r, batch in enumerate(rows):
            for c, image in enumerate(batch):
                grid.paste(image, (c * width, r * height))
        yield save_png(grid, spec.outdir / f"grid-{next_number(spec.outdir, 'grid-'):04}.png", first_facts)


def model_facts(ckpt: Path, run: Runtime, no_metadata: bool = False) -> dict:
    """What the PNGs say of the model and how it ran: its name (the file's stem; "ldm-emoji" for the embedded one,
    however it was named), A1111's hash, the device, dtype, quantization and backend, and a TAESD decoder's file and
    name (A1111's VAE field)."""
    name = "ldm-emoji" if Path(ckpt).resolve() == DEFAULT_MODEL.resolve() else Path(ckpt).stem
    facts = {"model": name, "model_hash": None if no_metadata else model_hash(Path(ckpt))}
    if run.taesd is not None:
        facts |= {"vae": taesd_name(run.taesd), "taesd": str(run.taesd), "taesd_encode": run.taesd_encode}
    return facts | {"dtype": run.dtype, "device": str(run.device), "quantize": run.quantize, "backend": run.backend}
