"""AUTOMATIC1111's REST API, /sdapi/v1, over ldm: the clients that speak it (Open WebUI, SillyTavern, the `webuiapi`
package, bots) drive ldm.

    python -m ldm.webui --api               # the page and the API on one port
    python -m ldm.webui --nowebui           # the API alone (FastAPI + uvicorn)

A request body (A1111's field names) becomes an ldm.request.Request and an OutputSpec, made by
ldm.outputs.make_images as txt2img.py and the page make them: the same parameters give the same image. Fields left
out are the model's (sampler, steps, scale, size: Request.resolved decides), not A1111's 512x512. Fields of A1111
that ldm lacks (restore_faces, tiling, subseeds...) are accepted at their neutral value and a 422 naming the field
otherwise; fields A1111 does not know are ignored, as A1111 does. One generation runs at a time (the Session's lock,
shared with the page); progress, interrupt and skip answer while it runs. The PNGs go to a temporary folder,
removed once read, unless save_images (then --outdir). Images in requests are base64 only (no paths, no URLs), at
most MAX_PIXELS pixels, read after their size is checked; bodies at most MAX_BODY bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import random
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError

from ldm import ASSETS, LdmError
from ldm.images import to_pil
from ldm.outputs import make_images
from ldm.prompts import LORA_SUFFIXES, lora_tags
from ldm.request import HIRES_UPSCALERS, LATENT_UPSCALERS, Control, InputError, OutputSpec, Request
from ldm.samplers import SAMPLERS, SCHEDULES
from ldm.webui_app import CONTROLNET_SUFFIXES, EMBEDDED, Session

MAX_BODY = 64 << 20  # bytes of a request body: a few base64 images
MAX_PIXELS = 4096 * 4096  # of an image in a request, checked from its header before it is decoded
SAMPLER_OF = {a1111: name for name, (_, _, a1111) in SAMPLERS.items()}  # "Euler a" -> "euler_a"
AUTOMATIC = ("automatic", "Automatic")  # A1111's scheduler that is the sampler's own
# A1111's scheduler names and labels -> ldm's schedule ("Karras" or "karras" -> "karras")
SCHEDULE_OF = {AUTOMATIC[0]: "default"} | {label: name for name, label in SCHEDULES.items()}
SCHEDULE_OF |= {name: name for name in SCHEDULES if name != "default"}
OUTPAINTING = "poor man's outpainting"  # A1111's script: [pixels, mask blur, masked content, directions]
# how the API calls the request's settings, in its error messages (ldm.request.NAMES)
NAMES = {
    "scale": "cfg_scale",
    "strength": "denoising_strength",
    "init_image": "init_images",
    "mask_blur": "mask_blur",
    "controlnet": "ControlNet model",
    "control_preprocess": "ControlNet module",
}
# A1111 fields ldm does not have: the values that mean "off", accepted (and ignored); any other is a 422
NEUTRAL = {
    "restore_faces": (None, False),
    "tiling": (None, False),
    "subseed_strength": (None, 0),
    "seed_resize_from_h": (None, -1, 0),
    "seed_resize_from_w": (None, -1, 0),
    "s_churn": (None, 0),
    "s_tmin": (None, 0),
    "s_tmax": (None, 0, float("inf")),
    "s_noise": (None, 1),
    "s_min_uncond": (None, 0),
    "styles": (None, []),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "hr_scheduler": (None, "", "Use same scheduler", *AUTOMATIC),
    "hr_negative_prompt": (None, ""),
    "refiner_checkpoint": (None, "", "None"),
    "disable_extra_networks": (None, False),
    "firstphase_width": (None, 0),
    "firstphase_height": (None, 0),
    "resize_mode": (None, 0),
    "initial_noise_multiplier": (None, 1),
    "inpainting_fill": (None, 0, 1),  # fill and original: ldm starts the masked part from the image's noised latents
}


class Txt2ImgBody(BaseModel):
    """POST /sdapi/v1/txt2img: A1111's fields; those ldm lacks are typed Any and checked against NEUTRAL."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    eta: float | None = None
    denoising_strength: float | None = None  # txt2img: the hires pass's (enable_hr)
    enable_hr: bool = False  # the hires fix: hr_scale, or hr_resize_x and hr_resize_y
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_sampler_name: str | None = None
    hr_prompt: str = ""
    hr_checkpoint_name: Any = None
    hr_scheduler: Any = None
    hr_negative_prompt: Any = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    restore_faces: Any = None
    tiling: Any = None
    subseed: int | None = None  # used by subseed_strength only
    subseed_strength: Any = None
    seed_resize_from_h: Any = None
    seed_resize_from_w: Any = None
    s_churn: Any = None
    s_tmin: Any = None
    s_tmax: Any = None
    s_noise: Any = None
    s_min_uncond: Any = None
    styles: Any = None
    script_name: str | None = None  # img2img: "poor man's outpainting" (OUTPAINTING)
    script_args: list = []
    refiner_checkpoint: Any = None
    disable_extra_networks: Any = None
    firstphase_width: Any = None
    firstphase_height: Any = None


class Img2ImgBody(Txt2ImgBody):
    """POST /sdapi/v1/img2img: txt2img's fields and the init image, mask and their settings."""

    init_images: list[str] | None = None
    mask: str | None = None
    mask_blur: int | None = None
    inpainting_mask_invert: int = 0
    resize_mode: Any = None
    initial_noise_multiplier: Any = None
    inpainting_fill: Any = None


class ControlNetUnit(BaseModel):
    """A unit of sd-webui-controlnet's API (alwayson_scripts.ControlNet.args): the fields ldm uses; module "none" or
    "canny" (its thresholds are ldm's, 100 and 200); the others (resize_mode, pixel_perfect...) ignored."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: str | dict | None = None
    input_image: str | None = None  # the extension's older name of image
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = 0


class PngInfoBody(BaseModel):
    image: str


class ApiError(InputError):
    """A request the API cannot serve: a 422 (or `status`) with A1111's error body."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def error_response(e: LdmError) -> JSONResponse:
    """A1111's error body: the exception's name, the one-line message as detail and errors."""
    body = {"error": type(e).__name__, "detail": str(e), "body": "", "errors": str(e)}
    return JSONResponse(body, status_code=getattr(e, "status", 422))


def open_image(data: str, field: str) -> Image.Image:
    """A base64 image of a request (a `data:` prefix allowed), opened: its header read, its pixels not yet."""
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
        return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise ApiError(f"{field}: {e}") from None
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise ApiError(f"{field} is not base64 image data") from None


def decode_image(data: str, mode: str, field: str) -> Image.Image:
    """A base64 image of a request as a PIL image in `mode`, its pixel count checked before its pixels are read."""
    with open_image(data, field) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ApiError(f"{field}: a {image.width}x{image.height} image is over {MAX_PIXELS} pixels")
        try:
            return ImageOps.exif_transpose(image).convert(mode)
        except OSError as e:  # truncated or corrupt pixel data
            raise ApiError(f"{field} is not a readable image: {e}") from None


@dataclass
class Progress:
    """The running job, for /progress, /interrupt and /skip: A1111's state fields and the latest latents."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    latents: torch.Tensor | None = None
    gone: threading.Event | None = None  # set when the client has disconnected


class Interrupted(Exception):
    """Raised by the step callback after /interrupt or /skip, or when the client has gone: the run ends there, its
    images so far returned."""


class Api:
    """The API's state over a Session (shared with the page): the running job's progress, the options, the users."""

    def __init__(self, session: Session, users: dict[str, str] | None = None):
        self.session, self.users = session, users or {}
        self.progress = Progress()
        self.clip_skip = 1  # A1111's CLIP_stop_at_last_layers option

    # ---------------------------------------------------------------- the models and the other files it serves
    def models(self) -> dict[str, str | None]:
        """{A1111 title: the path to load (None: the embedded model)} of the Session's models."""
        return {
            ("ldm-emoji" if path == EMBEDDED else Path(path).name): (None if path == EMBEDDED else path)
            for path in self.session.models()
        }

    def title(self) -> str:
        return "ldm-emoji" if self.session.ckpt is None else Path(self.session.ckpt).name

    def set_model(self, name: str) -> None:
        """Load the model of that title (or its name without the suffix); only the Session's models."""
        models = self.models()
        stems = {Path(title).stem: title for title in models}
        title = name if name in models else stems.get(name.split(" [")[0].strip())
        if title is None:
            raise ApiError(f"sd_model_checkpoint: no model '{name}' (see /sdapi/v1/sd-models)")
        if title != self.title():
            self.session.load(models[title])

    def set_options(self, options: dict) -> None:
        self.clip_skip = clip_skip_of(options, self.clip_skip)
        if "sd_model_checkpoint" in options:
            self.set_model(str(options["sd_model_checkpoint"]))

    def options(self) -> dict:
        args = self.session.args
        return {
            "sd_model_checkpoint": self.title(),
            "CLIP_stop_at_last_layers": self.clip_skip,
            "sd_vae": "Automatic",
            "samples_format": "png",
            "outdir_samples": str(args.outdir),
            "samples_save": True,
        }

    def files(self, kind: str, suffixes: tuple[str, ...]) -> list[Path]:
        return [self.session.args.models_dir / kind / name for name in self.session.files(kind, suffixes)]

    # ---------------------------------------------------------------- generation
    def request_of(self, body: Txt2ImgBody) -> tuple[Request, OutputSpec, dict]:
        """The Request, OutputSpec and <lora:> tags of a body, checked as far as they can be without the model."""
        for field, neutral in NEUTRAL.items():
            value = getattr(body, field, None)
            if value not in neutral:
                raise ApiError(f"{field}: ldm does not have this setting; leave it out or send {neutral[1]!r}")
        sampler, schedule = self.sampler_of(body)
        if body.eta not in (None, 0, 1) and sampler != "ddim":
            raise ApiError(f"eta {body.eta}: ldm's eta applies to DDIM only")
        clip_skip = clip_skip_of(body.override_settings, self.clip_skip)
        init_image = mask = None
        padding, mask_blur = self.outpaint_of(body)
        if isinstance(body, Img2ImgBody):
            if not body.init_images:
                raise ApiError("init_images: img2img needs one image")
            init_image = decode_image(body.init_images[0], "RGB", "init_images[0]")
            if body.mask:
                mask = decode_image(body.mask, "L", "mask")
                mask = ImageOps.invert(mask) if body.inpainting_mask_invert else mask
                mask = mask.filter(ImageFilter.GaussianBlur(body.mask_blur)) if body.mask_blur else mask
        controls, guess_mode = self.controls_of(body.alwayson_scripts)
        request = Request(
            (body.prompt,),
            negative_prompt=body.negative_prompt,
            n_samples=body.batch_size,
            seed=random.randrange(2**32) if body.seed == -1 else body.seed,
            sampler=sampler,
            schedule=schedule,
            steps=body.steps,
            scale=body.cfg_scale,
            height=body.height,
            width=body.width,
            eta=body.eta or 0.0 if sampler == "ddim" else 0.0,
            clip_skip=clip_skip,
            init_image=init_image,
            mask=mask,
            strength=body.denoising_strength if init_image is not None else None,
            outpaint=padding,
            mask_blur=mask_blur,
            controls=controls,
            guess_mode=guess_mode,
            embeddings=tuple(self.session.embeddings),
            **self.hires_of(body),
        )
        spec = OutputSpec(self.session.args.outdir, body.n_iter, grid=False)
        spec.check(request, NAMES)
        return request, spec, {body.prompt: self.lora_tags(body.prompt)}

    def hires_of(self, body: Txt2ImgBody) -> dict:
        """The Request's hires fix fields of A1111's enable_hr, hr_* and (txt2img) denoising_strength."""
        if not body.enable_hr or isinstance(body, Img2ImgBody):
            return {}
        if bool(body.hr_resize_x) != bool(body.hr_resize_y):
            raise ApiError("hr_resize_x and hr_resize_y: give both (the hires size) or neither (hr_scale)")
        sampler = body.hr_sampler_name
        same = sampler in (None, "", "Use same sampler")
        if not same and sampler not in SAMPLER_OF:
            raise ApiError(f"hr_sampler_name '{sampler}': not one of ldm's ({', '.join(SAMPLER_OF)})")
        return {
            "hires_scale": None if body.hr_resize_x else body.hr_scale,
            "hires_size": (body.hr_resize_x, body.hr_resize_y) if body.hr_resize_x else None,
            "hires_steps": body.hr_second_pass_steps,
            "hires_denoise": body.denoising_strength,
            "hires_upscaler": body.hr_upscaler,
            "hires_prompt": body.hr_prompt or None,
            "hires_sampler": None if same else SAMPLER_OF[sampler],
        }

    def outpaint_of(self, body: Txt2ImgBody) -> tuple[tuple[int, ...] | None, int | None]:
        """The outpainting (padding, mask blur) of img2img's script "poor man's outpainting" (script_args: pixels,
        mask blur, masked content, directions among left, right, up, down); (None, None) without a script."""
        if not body.script_name:
            return None, None
        if body.script_name.lower() != OUTPAINTING or not isinstance(body, Img2ImgBody):
            raise ApiError(f"script_name '{body.script_name}': ldm runs no script but img2img's \"{OUTPAINTING}\"")
        try:
            pixels, blur, _, directions = body.script_args
            padding = tuple(int(pixels) if side in directions else 0 for side in ("left", "up", "right", "down"))
            return padding, int(blur)
        except (TypeError, ValueError):
            raise ApiError(f"script_args of {OUTPAINTING}: [pixels, mask blur, masked content, directions]") from None

    def lora_tags(self, prompt: str) -> tuple[str, list]:
        """ldm.prompts.lora_tags of a prompt, each file in --models-dir/Lora or a shipped add-on's folder: a NAME
        that is a path elsewhere ("../", "/") is a 422."""
        folder = self.session.args.models_dir / "Lora"
        text, tags = lora_tags(prompt, folder)
        for path, _, _ in tags:
            if Path(os.path.normpath(path)).parent not in (Path(os.path.normpath(folder)), *ASSETS.iterdir()):
                raise ApiError(f"<lora:{path.stem}>: LoRAs are read from {folder} only")
        return text, tags

    def sampler_of(self, body: Txt2ImgBody) -> tuple[str | None, str]:
        """ldm's sampler and schedule of A1111's sampler_name (or sampler_index) and scheduler: "DPM++ 2M" with
        "Karras" is dpmpp_2m on karras (the sampler None: the model's); a sampler that does not take the schedule is
        the request's one-line error."""
        scheduler = body.scheduler or AUTOMATIC[0]
        if scheduler not in SCHEDULE_OF:
            raise ApiError(f"scheduler '{scheduler}': not one of ldm's ({', '.join(SCHEDULE_OF)})")
        name = body.sampler_name or body.sampler_index
        if name is not None and name not in SAMPLER_OF:
            raise ApiError(f"sampler_name '{name}': not one of ldm's ({', '.join(SAMPLER_OF)})")
        return SAMPLER_OF.get(name), SCHEDULE_OF[scheduler]

    def controls_of(self, scripts: dict) -> tuple[tuple[Control, ...], bool]:
        """sd-webui-controlnet's units, {"ControlNet": {"args": [unit, ...]}}, as Controls; and guess mode (a unit's
        control_mode "ControlNet is more important"). Another always-on script is a 422, as in A1111."""
        for name in scripts:
            if name.lower() != "controlnet":
                raise ApiError(f"alwayson_scripts: ldm has no script '{name}' (only ControlNet)")
        args = next(iter(scripts.values()), {}).get("args", []) if scripts else []
        try:
            units = [ControlNetUnit.model_validate(unit) for unit in args]
        except ValidationError as e:
            where = ".".join(map(str, e.errors()[0]["loc"]))
            raise ApiError(f"ControlNet unit: {where}: {e.errors()[0]['msg']}") from None
        controls, guess = [], False
        for k, unit in enumerate(u for u in units if u.enabled):
            name = unit.model.split(" [")[0]
            found = [p for p in self.files("ControlNet", CONTROLNET_SUFFIXES) if name in (p.name, p.stem)]
            if not found:
                folder = self.session.args.models_dir / "ControlNet"
                raise ApiError(f"ControlNet unit {k}: no model '{name}' in {folder}")
            image = unit.image.get("image") if isinstance(unit.image, dict) else unit.image or unit.input_image
            if not image:
                raise ApiError(f"ControlNet unit {k}: give its image (base64)")
            image = decode_image(image, "RGB", f"ControlNet unit {k} image")
            controls.append(Control(found[0], image, unit.module, unit.weight, unit.guidance_start, unit.guidance_end))
            guess = guess or unit.control_mode in (2, "ControlNet is more important")
        return tuple(controls), guess

    def callback(self, i: int, steps: int, latents: torch.Tensor) -> None:
        """Pipeline's step callback: the progress of the job, and its end after /interrupt or /skip or when its
        client has gone."""
        p = self.progress
        p.job_no += i == 0 and p.sampling_step > 0
        p.sampling_step, p.sampling_steps, p.latents = i + 1, steps, latents[:1]
        if p.interrupted or p.skipped or p.gone is not None and p.gone.is_set():
            raise Interrupted

    def generate(self, body: Txt2ImgBody, gone: threading.Event | None = None) -> dict:
        """A1111's answer to a txt2img or img2img body: images (base64 PNGs with their parameters), the body echoed,
        info (a JSON string: seeds, infotexts...). gone: set when the client has disconnected (the job ends at its
        next step)."""
        request, spec, tagged = self.request_of(body)
        job = "img2img" if isinstance(body, Img2ImgBody) else "txt2img"
        with self.session.lock:
            before = self.options()
            self.progress = Progress(job, job_count=body.n_iter, started=time.time(), gone=gone)
            try:
                self.set_options({k: v for k, v in body.override_settings.items() if k == "sd_model_checkpoint"})
                with tempfile.TemporaryDirectory(prefix="ldm-api-") as folder:
                    pngs = self.run(request, spec if body.save_images else replace(spec, outdir=Path(folder)), tagged)
            finally:
                self.progress.job_count = 0
                if body.override_settings_restore_afterwards:
                    self.set_options({"sd_model_checkpoint": before["sd_model_checkpoint"]})
        images = [base64.b64encode(data).decode() for _, data in pngs] if body.send_images else []
        info = info_of(body, request, [text for text, _ in pngs], self.progress)
        return {"images": images, "parameters": body.model_dump(exclude={"init_images", "mask"}), "info": info}

    def run(self, request: Request, spec: OutputSpec, tagged: dict) -> list[tuple[dict, bytes]]:
        """make_images into spec.outdir: each PNG's text chunks and bytes, those made before an interrupt too."""
        s, pngs = self.session, []
        try:
            for path in make_images(s.pipe, request, spec, s.model, tagged, self.callback):
                with Image.open(path) as png:
                    pngs.append((dict(png.text), path.read_bytes()))
        except Interrupted:
            pass
        return pngs

    def preview(self) -> str | None:
        """The running job's latest first image, as the page previews it (ldm.decode: TAESD or the latent colours), as
        base64 PNG."""
        latents = self.progress.latents
        if latents is None or not self.progress.job_count:
            return None
        with torch.inference_mode():
            image = to_pil(self.session.pipe.decode.preview(latents))[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()


def info_of(body: Txt2ImgBody, request: Request, texts: list[dict], progress: Progress) -> str:
    """A1111's `info` of an answer, a JSON string, from the PNGs' text chunks (their parameters, their ldm facts)."""
    facts = [json.loads(text["ldm"]) for text in texts]
    first = facts[0] if facts else {}
    return json.dumps(
        {
            "prompt": body.prompt,
            "all_prompts": [body.prompt] * len(facts),
            "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * len(facts),
            "seed": request.seed,
            "all_seeds": [f["seed"] for f in facts],
            "subseed": -1,
            "all_subseeds": [-1] * len(facts),
            "subseed_strength": 0,
            "width": first.get("width"),
            "height": first.get("height"),
            "sampler_name": SAMPLERS[first["sampler"]][2] if first else None,
            "scheduler": SCHEDULES[first.get("schedule", "default")],
            "cfg_scale": first.get("scale"),
            "steps": first.get("steps"),
            "batch_size": body.batch_size,
            "restore_faces": False,
            "sd_model_name": first.get("model"),
            "sd_model_hash": first.get("model_hash"),
            "denoising_strength": first.get("strength"),
            "clip_skip": first.get("clip_skip"),
            "styles": [],
            "index_of_first_image": 0,
            "infotexts": [text.get("parameters", "") for text in texts],
            "interrupted": progress.interrupted or progress.skipped,
            "version": "ldm",
        }
    )


def clip_skip_of(options: dict, default: int) -> int:
    """A1111's CLIP_stop_at_last_layers option (ldm's clip_skip) of an options dict, default when absent."""
    value = options.get("CLIP_stop_at_last_layers", default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(f"CLIP_stop_at_last_layers must be a whole number >= 1, got {value!r}")
    return value


def png_info(data: str) -> dict:
    """/png-info: a PNG's A1111 parameters text, its other text chunks, and its ldm facts."""
    with open_image(data, "image") as png:
        items = dict(getattr(png, "text", {}))
    text = items.pop("parameters", "")
    try:
        facts = json.loads(items["ldm"]) if "ldm" in items else {}
    except json.JSONDecodeError:
        raise ApiError("image: its ldm parameters chunk is not JSON") from None
    return {"info": text, "items": items, "parameters": facts}


def router(api: Api) -> APIRouter:
    """The /sdapi/v1 routes, each a thin call of api's, behind HTTP Basic auth when api.users."""

    basic = HTTPBasic(auto_error=False)

    def auth(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if not api.users:
            return
        ok = credentials is not None and secrets.compare_digest(
            api.users.get(credentials.username, secrets.token_hex(8)).encode(), credentials.password.encode()
        )
        if not ok:
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    r = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(auth)])
    s = api.session

    def answer(work):
        try:
            return work()
        except LdmError as e:
            return error_response(e)

    async def generated(request: HttpRequest, body: Txt2ImgBody):
        """api.generate in a worker thread, watching the client: one that disconnects ends its job."""
        gone = threading.Event()
        work = asyncio.ensure_future(run_in_threadpool(answer, lambda: api.generate(body, gone)))
        while not work.done():
            if await request.is_disconnected():
                gone.set()
            await asyncio.wait([work], timeout=0.5)
        return work.result()

    @r.post("/txt2img")
    async def txt2img(request: HttpRequest, body: Txt2ImgBody):
        return await generated(request, body)

    @r.post("/img2img")
    async def img2img(request: HttpRequest, body: Img2ImgBody):
        return await generated(request, body)

    @r.get("/options")
    def get_options():
        return api.options()

    @r.post("/options")
    def set_options(options: dict[str, Any]):
        def work():
            with s.lock:
                api.set_options(options)

        return answer(work)

    @r.get("/sd-models")
    def sd_models():
        return [
            {"title": t, "model_name": Path(t).stem, "hash": None, "sha256": None, "filename": p or t, "config": None}
            for t, p in api.models().items()
        ]

    @r.post("/refresh-checkpoints")
    def refresh_checkpoints():
        return None  # the models are listed afresh on each call

    @r.get("/samplers")
    def samplers():
        return [{"name": a, "aliases": [name], "options": {}} for name, (_, _, a) in SAMPLERS.items()]

    @r.get("/schedulers")
    def schedulers():  # as A1111's modules/sd_schedulers.py describes them
        return [
            {
                "name": AUTOMATIC[0] if name == "default" else name,
                "label": label,
                "aliases": ["SGMUniform"] if name == "sgm_uniform" else None,
                "default_rho": 7.0 if name == "karras" else -1,
                "need_inner_model": name == "sgm_uniform",
            }
            for name, label in SCHEDULES.items()
        ]

    @r.get("/upscalers")
    def upscalers():
        names = ["None", *(name for name in HIRES_UPSCALERS if name not in LATENT_UPSCALERS)]
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in names]

    @r.get("/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": name} for name in LATENT_UPSCALERS]

    @r.get("/sd-vae")
    def sd_vae():
        return []

    @r.get("/loras")
    def loras():
        return [
            {"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in api.files("Lora", LORA_SUFFIXES)
        ]

    @r.post("/refresh-loras")
    def refresh_loras():
        return None  # listed afresh on each call

    @r.get("/embeddings")
    def embeddings():
        loaded = {}
        for e in s.embeddings:
            tokens = s.pipe.embedding_tokens(e.file)
            width = s.pipe.cfg.unet.context_dim
            loaded[tokens[0]] = {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": width,
                "vectors": len(tokens),
            }
        return {"loaded": loaded, "skipped": {}}

    @r.get("/progress")
    def progress(skip_current_image: bool = False):
        p = api.progress
        done = (p.job_no + p.sampling_step / max(p.sampling_steps, 1)) / max(p.job_count, 1) if p.job_count else 0.0
        done = min(done, 1.0)
        elapsed = time.time() - p.started
        state = {
            "skipped": p.skipped,
            "interrupted": p.interrupted,
            "stopping_generation": False,
            "job": p.job if p.job_count else "",
            "job_count": p.job_count,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(p.started)),
            "job_no": p.job_no,
            "sampling_step": p.sampling_step,
            "sampling_steps": p.sampling_steps,
        }
        image = None if skip_current_image else api.preview()
        eta = elapsed / done - elapsed if done else 0.0
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": image, "textinfo": None}

    @r.post("/interrupt")
    def interrupt():
        api.progress.interrupted = bool(api.progress.job_count)

    @r.post("/skip")
    def skip():
        api.progress.skipped = bool(api.progress.job_count)

    @r.post("/png-info")
    def png_info_route(body: PngInfoBody):
        return answer(lambda: png_info(body.image))

    @r.get("/memory")
    def memory():
        vm = psutil.virtual_memory()
        ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
        if not torch.cuda.is_available():
            return {"ram": ram, "cuda": {"error": "no CUDA"}}
        free, total = torch.cuda.mem_get_info()
        return {"ram": ram, "cuda": {"system": {"free": free, "used": total - free, "total": total}}}

    @r.get("/cmd-flags")
    def cmd_flags():
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(s.args).items() if k != "api_auth"}

    @r.get("/scripts")
    def scripts():
        return {"txt2img": ["controlnet"], "img2img": ["controlnet", OUTPAINTING]}

    @r.get("/prompt-styles")
    def prompt_styles():
        return []

    return r


class BodyLimit:
    """ASGI middleware: a /sdapi body over `limit` bytes is a 413, checked on its Content-Length and as it streams."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/sdapi/"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self.too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def too_large(self, scope, receive, send):
        e = ApiError(f"request body over {self.limit} bytes", 413)
        await error_response(e)(scope, receive, send)


def create_app(session: Session, users: dict[str, str] | None = None) -> FastAPI:
    """A FastAPI app serving /sdapi/v1 (and its OpenAPI page, /docs) over session; the page mounts onto it."""
    app = FastAPI(title="ldm: AUTOMATIC1111's API")
    app.include_router(router(Api(session, users)))
    app.add_middleware(BodyLimit)
    return app
