"""The X/Y/Z plot, as AUTOMATIC1111's xyz_grid script: up to three axes over generation settings, each cell a Request
(the base one with the cell's values, dataclasses.replace) made by the normal path (ldm.outputs.make_images, its
PNG written as any other), then one labelled grid: X across, Y down, one sub-grid per Z value, side by side.

    axes = [parse_axis("steps=10,20,30"), parse_axis("scale=3,5,7")]
    requests = cells(Request("a red apple"), axes)      # z, then y, then x: the grid's reading order
    paths = list(make_xyz(pipe, requests, axes, OutputSpec(Path("out")), model_facts))

An axis is a Request field that holds one number or word (sampler, steps, scale, seed, eta, clip_skip, cfg_end,
hires_steps, hires_denoise, hires_upscaler, hires_sampler, schedule...), or "prompt" (A1111's Prompt S/R: the first
value is searched for in the prompt and negative prompt and replaced by each value in turn) or "lora" (the weight
of the request's LoRAs). Labels are A1111's: "Steps: 20", "CFG Scale: 7.0"; a sampler or prompt value alone.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageDraw, ImageFont

from ldm.outputs import make_images, next_number, save_png
from ldm.pipeline import Pipeline
from ldm.request import InputError, OutputSpec, Request
from ldm.samplers import SAMPLERS, SCHEDULES

MAX_AXES = 3
# A1111's axis labels (scripts/xyz_grid.py), by our names; another setting is labelled by its name
LABELS = {
    "seed": "Seed",
    "steps": "Steps",
    "scale": "CFG Scale",
    "sampler": "Sampler",
    "prompt": "Prompt S/R",
    "eta": "Eta",
    "clip_skip": "Clip skip",
    "hires_steps": "Hires steps",
    "hires_denoise": "Denoising",
    "hires_upscaler": "Hires upscaler",
    "hires_sampler": "Hires sampler",
    "schedule": "Schedule type",
    "lora": "LoRA weight",
}
TYPES = {"int": int, "float": float, "str": str}
# the settings an axis can vary: the Request fields of one number or word (but the cells' count and size), and the
# two of A1111's own kind
FIXED = ("n_samples", "height", "width")
SETTINGS = {
    f.name: TYPES[f.type.split(" |")[0]]
    for f in fields(Request)
    if f.type.split(" |")[0] in TYPES and f.name not in FIXED
}
SETTINGS |= {"prompt": str, "lora": float}


@dataclass(frozen=True)
class Axis:
    """One axis of the plot: a setting (SETTINGS) and its values, in order."""

    name: str
    values: tuple

    def apply(self, request: Request, value) -> Request:
        """request with this axis at `value`."""
        if self.name == "prompt":  # A1111's Prompt S/R: the first value, replaced by this one
            search = self.values[0]
            prompts = tuple(p.replace(search, value) for p in request.prompts)
            return replace(request, prompts=prompts, negative_prompt=request.negative_prompt.replace(search, value))
        if self.name == "lora":
            return replace(request, loras=tuple(replace(lora, weight=value) for lora in request.loras))
        return replace(request, **{self.name: value})

    def label(self, value) -> str:
        """The value's label as A1111 writes it: "Steps: 20", "CFG Scale: 7.0", "Schedule type: Karras"; a sampler
        (its A1111 name) or a prompt's value alone."""
        if self.name == "prompt":
            return value
        if self.name in ("sampler", "hires_sampler") and value in SAMPLERS:
            return SAMPLERS[value][2] if self.name == "sampler" else f"Hires sampler: {SAMPLERS[value][2]}"
        if self.name == "schedule" and value in SCHEDULES:
            return f"{LABELS['schedule']}: {SCHEDULES[value]}"
        shown = round(value, 8) if isinstance(value, float) else value
        return f"{LABELS.get(self.name, self.name)}: {shown}"


def parse_axis(text: str, flag: str = "--xyz") -> Axis:
    """ "NAME=V1,V2,..." as an Axis (values read as CSV, so "a, b" in quotes is one value), each value of the
    setting's type."""
    name, equals, values = text.partition("=")
    name = name.strip()
    if not equals or not name:
        raise InputError(f"{flag} takes NAME=V1,V2,..., got '{text}'")
    if name not in SETTINGS:
        raise InputError(f"{flag}: unknown setting '{name}' (known: {', '.join(SETTINGS)})")
    words = [v.strip() for row in csv.reader([values]) for v in row]
    if not words or not all(words):
        raise InputError(f"{flag} {name}: give one or more values, separated by commas, got '{values}'")
    kind = SETTINGS[name]
    try:
        return Axis(name, tuple(kind(word) for word in words))
    except ValueError:
        what = {int: "whole numbers", float: "numbers"}[kind]
        raise InputError(f"{flag} {name}: the values must be {what}, got '{values}'") from None


def cells(request: Request, axes: list[Axis], n_iter: int = 1, flag: str = "--xyz") -> list[Request]:
    """The plot's requests in reading order: for each Z value, each Y value, each X value (axes: X, Y, Z); n_iter:
    the run's batches per prompt (one image a cell: 1)."""
    if not 1 <= len(axes) <= MAX_AXES or len({a.name for a in axes}) < len(axes):
        raise InputError(f"{flag}: give 1 to {MAX_AXES} axes, each setting once")
    if len(request.prompts) != 1 or request.n_samples != 1 or n_iter != 1:
        raise InputError("the X/Y/Z plot makes one image a cell: give one prompt, 1 sample and 1 iteration")
    for axis in axes:
        if axis.name == "prompt" and not any(
            axis.values[0] in p for p in (request.prompts[0], request.negative_prompt)
        ):
            raise InputError(f"Prompt S/R did not find '{axis.values[0]}' in the prompt or negative prompt")
        if axis.name == "lora" and not request.loras:
            raise InputError(f"{flag} lora: varies the weight of the request's LoRAs, and it has none")
    requests = [request]
    for axis in axes:  # X varies fastest
        requests = [axis.apply(r, value) for value in axis.values for r in requests]
    return requests


def labels(axes: list[Axis]) -> list[list[str]]:
    """Each axis's labels, in the order of its values."""
    return [[axis.label(value) for value in axis.values] for axis in axes]


def wrapped(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """text broken into lines (at spaces) that fit in width pixels, where the words allow."""
    lines = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def annotated(images: list[Image.Image], columns: int, top: list[str], left: list[str], font) -> Image.Image:
    """images in rows of `columns`, on white, with `top` centred above the columns and `left` beside the rows (A1111's
    draw_grid_annotations; none: no margin)."""
    w, h = images[0].size
    rows = len(images) // columns
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tops = [wrapped(text, font, w) for text in top]
    box = [draw.multiline_textbbox((0, 0), text, font=font) for text in tops + left]
    pad = font.size // 2
    pad_top = max((b[3] for b in box[: len(tops)]), default=-2 * pad) + 2 * pad
    pad_left = max((b[2] for b in box[len(tops) :]), default=-2 * pad) + 2 * pad
    canvas = Image.new("RGB", (pad_left + columns * w, pad_top + rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, image in enumerate(images):
        canvas.paste(image, (pad_left + k % columns * w, pad_top + k // columns * h))
    for c, text in enumerate(tops):
        draw.multiline_text((pad_left + c * w + w / 2, pad), text, "black", font, anchor="ma", align="center")
    for r, text in enumerate(left):
        draw.multiline_text((pad_left - pad, pad_top + r * h + h / 2), text, "black", font, anchor="rm", align="right")
    return canvas


def grid_image(images: list[Image.Image], axes: list[Axis]) -> Image.Image:
    """The labelled grid of the cells' images (in cells' order): X across, Y down, one sub-grid per Z value side by
    side, each titled with its Z label."""
    x, y, z = labels(axes) + [[]] * (MAX_AXES - len(axes))
    w, h = images[0].size
    font = ImageFont.load_default(size=max(12, (w + h) // 25))
    per_z = len(x) * max(1, len(y))
    subs = [annotated(images[k : k + per_z], len(x), x, y, font) for k in range(0, len(images), per_z)]
    return annotated(subs, len(subs), z, [], font) if z else subs[0]


def make_xyz(
    pipe: Pipeline,
    requests: list[Request],
    axes: list[Axis],
    spec: OutputSpec,
    model: dict,
    tagged: dict | None = None,
    callback: Callable | None = None,
) -> Iterator[Path]:
    """Make and write each cell's image (ldm.outputs.make_images: a PNG with its own parameters), then the labelled
    grid, "xyz_grid-NNNN.png" (the first cell's parameters); yields each path once written. model, tagged, callback:
    as make_images'."""
    single, images, first = replace(spec, grid=False), [], None
    for request in requests:
        for path in make_images(pipe, request, single, model, tagged, callback):
            if re.fullmatch(r"\d+\.png", path.name):  # the image (not a control map nor a trajectory strip)
                images.append(Image.open(path).convert("RGB"))
                first = first or path
            yield path
    facts = json.loads(Image.open(first).text["ldm"]) if spec.metadata else None
    yield save_png(
        grid_image(images, axes), spec.outdir / f"xyz_grid-{next_number(spec.outdir, 'xyz_grid-'):04}.png", facts
    )
