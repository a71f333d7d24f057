"""The page of python -m ldm.webui (Gradio): txt2img, img2img, inpaint and outpaint tabs with LoRA and embedding
pickers and a ControlNet, PNG info, Models, the diffusion explorer. Generation goes through ldm.outputs.make_images,
as txt2img.py's does."""

from __future__ import annotations

import dataclasses
import json
import queue
import random
import threading
from pathlib import Path

import gradio as gr
from PIL import Image, ImageFilter

from ldm import DEFAULT_MODEL, LdmError, load_pipeline
from ldm.cli import CONTROL_PREPROCESS_NAMES, HIRES_UPSCALER_NAMES, SYNTAX_NAMES
from ldm.config import ModelConfig
from ldm.explorer import forward_process, reverse_process, step_view
from ldm.images import canny, load_image, to_pil
from ldm.outputs import make_images, model_facts, next_number, save_png
from ldm.prompts import LORA_SUFFIXES, lora_tags
from ldm.request import HIRES_DENOISE, Control, EmbeddingSpec, OutputSpec, Request
from ldm.runtime import runtime
from ldm.samplers import SAMPLERS, SCHEDULES
from ldm.xyz import cells, make_xyz, parse_axis

# The embedded model's 32x32 images, shown enlarged to their box (Gradio's own object-fit, scale-down, leaves them at 32
# px) with nearest neighbour, not blurred; the files served stay as made.
CSS = "img { image-rendering: pixelated; } .image-frame img { object-fit: contain !important; }"
FIELDS = (
    "prompt",
    "negative_prompt",
    "sampler",
    "schedule",
    "steps",
    "scale",
    "seed",
    "width",
    "height",
    "batch_count",
    "batch_size",
    "eta",
    "guidance_rescale",
    "cfg_end",
    "clip_skip",
    "prompt_syntax",
)


class Interrupted(Exception):
    """Raised by the step callback when Interrupt was pressed: the run stops at its next step."""


class Session:
    """The model being served, what its PNGs say of it and of the run (model_facts, device, dtype...), the embeddings
    added with the picker (every request carries them), the stop flag, and the lock that runs one generation at a
    time between the page and the REST API (ldm.api)."""

    def __init__(self, args):
        self.args = args
        self.runtime = runtime(args.device, taesd=args.taesd)
        self.stop = threading.Event()
        self.lock = threading.RLock()
        self.load(args.ckpt)

    def load(self, ckpt: Path | None) -> None:
        path = DEFAULT_MODEL if ckpt is None else Path(ckpt)
        with self.lock:  # not while a generation runs
            self.pipe = load_pipeline(path, **self.runtime.options())
            self.ckpt, self.model = ckpt, model_facts(path, self.runtime)
            self.embeddings: list[EmbeddingSpec] = []

    def models(self) -> list[str]:
        """The embedded model and the checkpoints in --models-dir: single files and diffusers folders."""
        folder = self.args.models_dir
        found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.ckpt"))
        found += sorted(p for p in folder.glob("*/") if (p / "model_index.json").is_file())
        return [EMBEDDED] + [str(p) for p in found]

    def files(self, kind: str, suffixes: tuple[str, ...]) -> list[str]:
        folder = self.args.models_dir / kind
        return sorted(p.name for p in folder.glob("*") if p.suffix in suffixes) if folder.is_dir() else []


EMBEDDED = "ldm-emoji (embedded)"
# the sampler and schedule dropdowns show AUTOMATIC1111's names ("DPM++ 2M", "Karras"), the request gets ldm's
SAMPLER_CHOICES = [(a1111, name) for name, (_, _, a1111) in SAMPLERS.items()]
SCHEDULE_CHOICES = [(label, name) for name, label in SCHEDULES.items()]


CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt")
# how the page calls the request's settings, in its error messages (ldm.request.NAMES)
NAMES = {
    "steps": "Steps",
    "schedule": "Schedule type",
    "scale": "CFG scale",
    "eta": "DDIM eta",
    "guidance_rescale": "Guidance rescale",
    "cfg_end": "CFG end",
    "strength": "Strength",
    "height": "Height",
    "width": "Width",
    "seed": "Seed",
    "init_image": "an image",
    "mask": "a mask",
    "outpaint": "Outpainting",
    "mask_blur": "Mask blur",
    "controlnet": "ControlNet",
    "control_preprocess": "Preprocess",
    "n_iter": "Batch count",
    "hires_scale": "Upscale by",
    "hires_steps": "Hires steps",
    "hires_denoise": "Denoising strength",
    "hires_sampler": "Hires sampler",
}
SAME_SAMPLER = "Use same sampler"  # A1111's hires sampler choice for the first pass's
XYZ = {"xyz_x": "X", "xyz_y": "Y", "xyz_z": "Z"}  # the X/Y/Z plot's axis fields, each NAME=V1,V2,... (ldm.xyz)


def request_of(
    session: Session, values: dict, init_image=None, mask=None, strength=None, padding=None, mask_blur=None
) -> tuple[Request, OutputSpec]:
    """The Request and OutputSpec of these page values (init_image, mask: files; padding, mask_blur: outpainting's),
    checked in the page's words."""
    seed = int(values["seed"])
    net, control_image = values.get("controlnet"), values.get("control_image")
    if net and not control_image:
        raise LdmError("a ControlNet needs a control image: upload one")
    hires = {}
    if values.get("hires"):
        hires = {
            "hires_scale": float(values["hires_scale"]),
            "hires_steps": int(values["hires_steps"]),
            "hires_denoise": float(values["hires_denoise"]),
            "hires_upscaler": values["hires_upscaler"],
            "hires_sampler": None if values["hires_sampler"] == SAME_SAMPLER else values["hires_sampler"],
            "hires_prompt": values["hires_prompt"] or None,
        }
    controls = ()
    if net:
        settings = [float(values[key]) for key in ("control_scale", "control_start", "control_end")]
        path = session.args.models_dir / "ControlNet" / net
        controls = (Control(path, Path(control_image), values["control_preprocess"], *settings),)
    request = Request(
        (values["prompt"],),
        negative_prompt=values["negative_prompt"],
        n_samples=int(values["batch_size"]),
        seed=random.randrange(2**32) if seed == -1 else seed,
        sampler=values["sampler"],
        schedule=values["schedule"],
        steps=int(values["steps"]),
        scale=float(values["scale"]),
        height=None if values.get("height") is None else int(values["height"]),
        width=None if values.get("width") is None else int(values["width"]),
        eta=float(values["eta"]),
        guidance_rescale=float(values["guidance_rescale"]),
        cfg_end=float(values["cfg_end"]),
        prompt_syntax=values["prompt_syntax"],
        clip_skip=int(values["clip_skip"]),
        init_image=init_image,
        mask=mask,
        strength=strength,
        outpaint=None if padding is None else tuple(int(p) for p in padding),
        mask_blur=None if padding is None else int(mask_blur),
        controls=controls,
        guess_mode=bool(net and values["guess_mode"]),
        embeddings=tuple(session.embeddings),
        **hires,
    )
    spec = OutputSpec(session.args.outdir, int(values["batch_count"]))
    spec.check(request, NAMES)
    request.resolved(session.pipe.cfg, NAMES)
    return request, spec


def generate(
    session: Session, values: dict, progress, init_image=None, mask=None, mask_blur=0, strength=None, padding=None
):
    """Run make_images (the X/Y/Z plot: make_xyz) in a worker thread; yield (preview, gallery, info) as they come.
    init_image: a file; mask: a file, or a PIL image (drawn); mask_blur: A1111's, a Gaussian blur radius in pixels;
    padding: outpaint init_image by (left, top, right, bottom) pixels, its mask feathered over mask_blur pixels."""
    session.stop.clear()
    mask_file = mask
    try:
        if isinstance(mask, (str, Path)):
            mask = load_image(mask, "L")
        if mask is not None and (mask_blur or mask_file is None):  # the mask used, beside the images for the PNGs
            mask = mask.filter(ImageFilter.GaussianBlur(mask_blur))
            folder = session.args.outdir / "masks"
            mask_file = save_png(mask, folder / f"{next_number(folder):05}-mask.png", None)
        mask_file = None if mask is None else str(mask_file)
        outpaint = {"padding": padding, "mask_blur": mask_blur} if padding is not None else {}
        request, spec = request_of(session, values, init_image or None, mask_file, strength, **outpaint)
        given = [bool(values.get(key)) for key in XYZ]
        if given != sorted(given, reverse=True):
            raise LdmError("X/Y/Z plot: fill the axes in order, X first (a Y axis before a Z axis)")
        axes = [parse_axis(values[key], f"X/Y/Z plot {axis}") for key, axis in XYZ.items() if values.get(key)]
        requests = cells(request, axes, spec.n_iter, "X/Y/Z plot") if axes else [request]
        for cell in requests if axes else ():  # every cell's settings checked before the first is made
            cell.resolved(session.pipe.cfg, NAMES)
        prompts = {p for r in requests for p in r.prompts}
        lora_dir = session.args.models_dir / "Lora"
        tagged = {p: lora_tags(p, lora_dir) for p in prompts} if request.prompt_syntax == "a1111" else {}
    except LdmError as e:
        raise gr.Error(str(e), print_exception=False) from None
    every, events = int(values["preview_every"]), queue.Queue()

    def callback(i, steps, latents):
        if session.stop.is_set():
            raise Interrupted
        preview = every and (i + 1) % every == 0 and i + 1 < steps
        events.put(("step", i + 1, steps, to_pil(session.pipe.decode.preview(latents[:1]))[0] if preview else None))

    def work():
        try:
            if axes:
                made = make_xyz(session.pipe, requests, axes, spec, session.model, tagged, callback)
            else:
                made = make_images(session.pipe, request, spec, session.model, tagged, callback)
            with session.lock:
                for path in made:
                    events.put(("image", path))
        except Interrupted:
            events.put(("interrupted",))
        except LdmError as e:
            events.put(("error", gr.Error(str(e), print_exception=False)))
        except Exception as e:  # a bug: its traceback goes to the server's log, "Error" to the page
            events.put(("error", e))
        finally:
            events.put(("done",))

    threading.Thread(target=work, daemon=True).start()
    preview, images, note, passes = None, [], "", 0
    while (event := events.get())[0] != "done":
        if event[0] == "step":
            _, i, steps, picture = event
            passes += i == 1  # the hires fix makes each batch in two
            batch = (passes + request.hires) // (1 + request.hires)
            total = spec.n_iter * len(requests)  # the X/Y/Z plot's cells: one batch each
            progress((i, steps), desc=f"batch {batch} of {total}: step {i}/{steps}", unit="steps")
            if picture is None:
                continue
            preview = picture
        elif event[0] == "image":
            images += [] if event[1].name.startswith("grid-") else [str(event[1])]
        elif event[0] == "interrupted":
            note = "Interrupted: the images finished before it are kept.\n"
        else:
            raise event[1]
        yield preview, images, note + info(images)


def info(images: list[str]) -> str:
    """The parameters text of the first image (its seed shows the seed used)."""
    if not images:
        return ""
    with Image.open(images[0]) as png:
        return png.text.get("parameters", "")


def settings(prefix: str, cfg: ModelConfig, size: bool = True) -> dict:
    """The generation fields of one tab (elem_ids prefix-name), the LoRA and embedding pickers above them; sampler,
    steps, scale and size (unless not size: outpainting's is the canvas's) start at the model's defaults
    (cfg.sampling, its image size)."""
    c, side = {}, cfg.image_size * cfg.vae.factor
    c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id=f"{prefix}-prompt")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id=f"{prefix}-negative")
    with gr.Row():
        sampling = cfg.sampling
        c["sampler"] = gr.Dropdown(
            SAMPLER_CHOICES, value=sampling.sampler, label="Sampler", elem_id=f"{prefix}-sampler"
        )
        c["schedule"] = gr.Dropdown(
            SCHEDULE_CHOICES, value="default", label="Schedule type", elem_id=f"{prefix}-schedule"
        )
        c["steps"] = gr.Slider(1, 150, value=sampling.steps, step=1, label="Steps", elem_id=f"{prefix}-steps")
        c["scale"] = gr.Slider(1, 30, value=sampling.scale, step=0.5, label="CFG scale", elem_id=f"{prefix}-scale")
    with gr.Row():
        c["seed"] = gr.Number(42, precision=0, label="Seed (-1: random)", elem_id=f"{prefix}-seed")
        if size:
            c["width"] = gr.Number(side, precision=0, label="Width", elem_id=f"{prefix}-width")
            c["height"] = gr.Number(side, precision=0, label="Height", elem_id=f"{prefix}-height")
        c["batch_count"] = gr.Slider(1, 16, value=1, step=1, label="Batch count", elem_id=f"{prefix}-count")
        c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{prefix}-size")
    with gr.Accordion("More", open=False):
        with gr.Row():
            c["eta"] = gr.Number(0.0, label="DDIM eta", elem_id=f"{prefix}-eta")
            c["guidance_rescale"] = gr.Slider(0, 1, value=0, step=0.05, label="Guidance rescale")
            c["cfg_end"] = gr.Slider(0, 1, value=1, step=0.05, label="CFG end (guided fraction of the steps)")
            c["clip_skip"] = gr.Number(1, precision=0, label="Clip skip", elem_id=f"{prefix}-clip-skip")
            c["prompt_syntax"] = gr.Radio(list(SYNTAX_NAMES), value="a1111", label="Prompt syntax")
            c["preview_every"] = gr.Number(5, precision=0, label="Preview every N steps (0: none)")
    return c


def hires_fix() -> dict:
    """The txt2img tab's "Hires. fix" fields, A1111's: draw, upscale, then img2img at a denoising strength."""
    c = {}
    with gr.Accordion("Hires. fix", open=False):
        c["hires"] = gr.Checkbox(False, label="Hires. fix", elem_id="txt2img-hires")
        with gr.Row():
            c["hires_upscaler"] = gr.Dropdown(
                list(HIRES_UPSCALER_NAMES), value=HIRES_UPSCALER_NAMES[0], label="Upscaler", elem_id="txt2img-hires-up"
            )
            c["hires_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img-hires-scale")
            c["hires_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: the same)")
            c["hires_denoise"] = gr.Slider(0.01, 1, value=HIRES_DENOISE, step=0.01, label="Denoising strength")
        with gr.Row():
            c["hires_sampler"] = gr.Dropdown(
                [SAME_SAMPLER, *SAMPLER_CHOICES], value=SAME_SAMPLER, label="Hires sampler"
            )
            c["hires_prompt"] = gr.Textbox(label="Hires prompt (empty: the prompt)", elem_id="txt2img-hires-prompt")
    return c


def xyz_plot() -> dict:
    """The txt2img tab's X/Y/Z plot fields: up to three axes, each a setting and its values (ldm.xyz)."""
    c = {}
    with gr.Accordion("X/Y/Z plot", open=False), gr.Row():
        for key, axis in XYZ.items():
            c[key] = gr.Textbox(label=f"{axis}: NAME=V1,V2,...", placeholder="steps=10,20,30", elem_id=f"txt2img-{key}")
    return c


def pickers(session: Session, prompt) -> None:
    """LoRA and embedding pickers that add A1111's <lora:NAME:W> or an embedding's (token:W) to the prompt."""

    def add_lora(text, name, weight):
        return text if not name else f"{text} <lora:{Path(name).stem}:{weight:g}>".strip()

    def add_embedding(text, name, weight):
        if not name:
            return text
        path = session.args.models_dir / "embeddings" / name
        if EmbeddingSpec(path) not in session.embeddings:
            try:
                session.pipe.load_embedding(path)
            except LdmError as e:
                raise gr.Error(str(e), print_exception=False) from None
            session.embeddings.append(EmbeddingSpec(path))
        token = session.pipe.embedding_tokens(path)[0]
        word = token if weight == 1 else f"({token}:{weight:g})"
        return f"{text} {word}".strip()

    with gr.Accordion("LoRA and embeddings", open=False), gr.Row():
        lora = gr.Dropdown(session.files("Lora", LORA_SUFFIXES), label="LoRA (models/Lora)", scale=2)
        lora_weight = gr.Slider(-2, 2, value=1, step=0.05, label="weight")
        gr.Button("Add LoRA").click(add_lora, [prompt, lora, lora_weight], prompt)
        embedding = gr.Dropdown(session.files("embeddings", (".pt", ".safetensors", ".bin")), label="Embedding")
        embedding_weight = gr.Slider(0, 2, value=1, step=0.05, label="weight")
        gr.Button("Add embedding").click(add_embedding, [prompt, embedding, embedding_weight], prompt)


def controlnet(session: Session, prefix: str) -> dict:
    """A ControlNet from models/ControlNet, its control image (with its canny map shown), preprocessing, scale,
    start, end and guess mode: txt2img.py's --controlnet group."""
    c = {}
    with gr.Accordion("ControlNet", open=False, elem_id=f"{prefix}-controlnet-panel"):
        with gr.Row():
            files = session.files("ControlNet", CONTROLNET_SUFFIXES)
            c["controlnet"] = gr.Dropdown(
                [("none", "")] + files, value="", label="ControlNet (models/ControlNet)", elem_id=f"{prefix}-controlnet"
            )
            c["control_preprocess"] = gr.Radio(list(CONTROL_PREPROCESS_NAMES), value="none", label="Preprocess")
            c["guess_mode"] = gr.Checkbox(False, label="Guess mode")
        with gr.Row():
            c["control_image"] = gr.File(label="Control image", file_types=["image"], elem_id=f"{prefix}-control-image")
            edges = gr.Image(label="Canny map", format="png", interactive=False, height=160, elem_id=f"{prefix}-canny")
        show = gr.Button("Show the canny map", elem_id=f"{prefix}-show-canny")
        with gr.Row():
            c["control_scale"] = gr.Slider(0, 2, value=1, step=0.05, label="Scale", elem_id=f"{prefix}-control-scale")
            c["control_start"] = gr.Slider(0, 1, value=0, step=0.05, label="Start", elem_id=f"{prefix}-control-start")
            c["control_end"] = gr.Slider(0, 1, value=1, step=0.05, label="End", elem_id=f"{prefix}-control-end")
    show.click(guard(lambda path: canny(load_image(path)) if path else None), c["control_image"], edges)
    return c


def generation_tab(session: Session, mode: str) -> dict:
    """One of the txt2img / img2img / inpaint / outpaint tabs: its fields, Generate and Interrupt, preview, gallery,
    parameters."""
    with gr.Row():
        with gr.Column():
            extra = []
            if mode == "img2img":
                extra = [gr.File(label="Image", file_types=["image"], elem_id="img2img-image")]
            if mode == "inpaint":
                editor = gr.ImageEditor(
                    label="Image: paint the mask (white: repaint)",
                    type="pil",
                    image_mode="RGBA",
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                    format="png",
                    elem_id="inpaint-editor",
                )
                with gr.Row():
                    image = gr.File(label="...or upload the image", file_types=["image"], elem_id="inpaint-image")
                    mask = gr.File(label="and a mask (white: repaint)", file_types=["image"], elem_id="inpaint-mask")
                blur = gr.Slider(0, 16, value=0, step=1, label="Mask blur (pixels)", elem_id="inpaint-blur")
                extra = [editor, image, mask, blur]
            if mode == "outpaint":
                extra = [gr.File(label="Image", file_types=["image"], elem_id="outpaint-image")]
                with gr.Row():
                    for side in ("left", "top", "right", "bottom"):
                        extra.append(gr.Number(0, precision=0, label=f"{side} (pixels)", elem_id=f"outpaint-{side}"))
                extra.append(gr.Slider(0, 64, value=4, step=1, label="Mask blur (pixels)", elem_id="outpaint-blur"))
            if mode != "txt2img":
                default = 0.75 if mode == "img2img" else 1.0
                extra.append(gr.Slider(0.01, 1, value=default, step=0.01, label="Strength", elem_id=f"{mode}-strength"))
            c = settings(mode, session.pipe.cfg, size=mode != "outpaint")
            pickers(session, c["prompt"])
            if mode == "txt2img":
                c |= hires_fix() | xyz_plot()
            c |= controlnet(session, mode)
        with gr.Column():
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id=f"{mode}-generate")
                stop = gr.Button("Interrupt", elem_id=f"{mode}-interrupt")
            preview = gr.Image(label="Preview", format="png", interactive=False, height=160, elem_id=f"{mode}-preview")
            gallery = gr.Gallery(
                label="Images", format="png", columns=4, object_fit="contain", elem_id=f"{mode}-gallery"
            )  # contain: an outpainted image whole, not cropped to a square
            text = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id=f"{mode}-info")
    names = list(c)

    def run(*values, progress=gr.Progress()):
        fields = dict(zip(names, values))
        rest = values[len(names) :]
        if mode == "txt2img":
            yield from generate(session, fields, progress)
        elif mode == "img2img":
            yield from generate(session, fields, progress, init_image=rest[0], strength=rest[1])
        elif mode == "outpaint":
            image, *padding, blur, strength = rest
            yield from generate(
                session, fields, progress, init_image=image, mask_blur=blur, strength=strength, padding=padding
            )
        else:
            drawn, image, mask, blur, strength = rest
            if image is None and drawn is not None and drawn.get("background") is not None:
                image = save_drawn(session, drawn["background"].convert("RGB"))
                layers = drawn.get("layers") or []
                mask = layers[0].getchannel("A").point(lambda a: 255 if a else 0) if layers else None
            if image is None or mask is None:
                raise gr.Error("inpainting needs an image and a mask: paint one on the image, or upload both")
            yield from generate(
                session, fields, progress, init_image=image, mask=mask, mask_blur=blur, strength=strength
            )

    go.click(
        run,
        list(c.values()) + extra,
        [preview, gallery, text],
        show_progress_on=text,  # the progress bar there: over the preview, it hid the preview until the run's end
        concurrency_id="generate",
        concurrency_limit=1,
    )
    stop.click(session.stop.set, queue=False)
    return c


def save_drawn(session: Session, image) -> str:
    """An image drawn on in the editor, written beside the images (the PNGs name it as their init image)."""
    folder = session.args.outdir / "masks"
    return str(save_png(image, folder / f"{next_number(folder):05}-image.png", None))


def png_info(path: str | None) -> tuple[str, dict | None]:
    """A PNG's A1111 `parameters` text and its `ldm` JSON chunk."""
    if not path:
        return "", None
    load_image(path)  # a broken file: its one-line error
    with Image.open(path) as png:
        text = getattr(png, "text", {})
    try:
        facts = json.loads(text["ldm"]) if "ldm" in text else None
    except json.JSONDecodeError:
        raise gr.Error(f"{path}: its ldm parameters chunk is not JSON", print_exception=False) from None
    return text.get("parameters", "(no parameters in this image)"), facts


def send_to_txt2img(facts: dict | None, fields: dict) -> dict:
    """The txt2img fields that remake the image: its batch's first seed and batch size, its position within it."""
    if not facts:
        raise gr.Error("this image has no ldm parameters (made by txt2img.py or this page) to send")
    values = {key: facts[key] for key in ("prompt", "negative_prompt", "sampler", "steps", "scale", "width", "height")}
    values |= {"seed": facts["seed"] - facts["batch_pos"], "batch_size": facts["batch_size"], "batch_count": 1}
    values |= {key: facts.get(key, default) for key, default in FIELD_DEFAULTS.items()}
    return {fields[key]: value for key, value in values.items()}


# what a PNG without these facts was made with: the Request's defaults
FIELD_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(Request)
    if f.name in ("schedule", "eta", "guidance_rescale", "cfg_end", "clip_skip", "prompt_syntax")
}


def guard(fn):
    """fn with bad input (ldm.LdmError) shown as its one line in the page."""

    def guarded(*args):
        try:
            return fn(*args)
        except LdmError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return guarded


def build(session: Session):
    with gr.Blocks(title="ldm") as demo:
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                fields = generation_tab(session, "txt2img")
            with gr.Tab("img2img", id="img2img"):
                generation_tab(session, "img2img")
            with gr.Tab("inpaint", id="inpaint"):
                generation_tab(session, "inpaint")
            with gr.Tab("outpaint", id="outpaint"):
                generation_tab(session, "outpaint")
            with gr.Tab("PNG info", id="png-info"):
                with gr.Row():
                    with gr.Column():
                        png = gr.File(label="PNG", file_types=[".png"], elem_id="png-file")
                        send = gr.Button("Send to txt2img", elem_id="png-send")
                    with gr.Column():
                        text = gr.Textbox(label="parameters (AUTOMATIC1111)", lines=4, elem_id="png-parameters")
                        facts = gr.JSON(label="ldm (JSON)")
                png.change(guard(png_info), png, [text, facts])
                targets = [fields[k] for k in FIELDS]
                send.click(lambda f: send_to_txt2img(f, fields), facts, targets).then(
                    lambda: gr.Tabs(selected="txt2img"), None, tabs
                )
            with gr.Tab("Models", id="models"):
                models_tab(session, guard)
            with gr.Tab("Diffusion explorer", id="explorer"):
                explorer_tab(session, guard)
    return demo


def models_tab(session: Session, guard) -> None:
    def current() -> str:
        return f"Loaded: **{session.model['model']}** ({session.pipe.cfg.image_size * session.pipe.vae_factor} px)"

    def load(choice):
        session.load(None if choice == EMBEDDED else Path(choice))
        return current()

    with gr.Row():
        choice = gr.Dropdown(
            session.models(), value=str(session.ckpt or EMBEDDED), label=f"Models in {session.args.models_dir}"
        )
        refresh = gr.Button("Refresh")
        button = gr.Button("Load", variant="primary")
    status = gr.Markdown(current())
    refresh.click(lambda: gr.Dropdown(choices=session.models()), None, choice)
    button.click(guard(load), choice, status, concurrency_id="generate", concurrency_limit=1)


def step_slider(last: int):
    return gr.Slider(0, last, value=last, step=1, label=f"step (0: z_T, pure noise; {last}: z_0)")


def explorer_tab(session: Session, guard) -> None:
    gr.Markdown(
        "**Forward process** q(x_t | x_0), a column per t; rows: the latent z_t (channels 1-3), its decoding, the "
        "same noise on the pixels."
    )
    with gr.Row():
        image = gr.Image(label="Image", type="filepath", height=200, elem_id="explorer-image")
        with gr.Column():
            timesteps = gr.Textbox("0, 100, 250, 400, 600, 800, 999", label="timesteps t")
            seed = gr.Number(0, precision=0, label="Seed")
            noise = gr.Button("Noise it", elem_id="explorer-noise")
    forward = gr.Image(label="q(x_t | x_0)", format="png", interactive=False, height=360, elem_id="explorer-forward")
    noise.click(
        guard(lambda *a: forward_process(session.pipe, *a)),
        [image, timesteps, seed],
        forward,
        concurrency_id="generate",
        concurrency_limit=1,
    )
    gr.Markdown("**Reverse process**: a generation's latents z_t, step by step; rows: the latent, its decoding.")
    with gr.Row():
        prompt = gr.Textbox("a red apple", label="Prompt", scale=2)
        reverse_seed = gr.Number(42, precision=0, label="Seed")
        steps = gr.Slider(1, 150, value=25, step=1, label="Steps")
        sampler = gr.Dropdown(SAMPLER_CHOICES, value="ddim", label="Sampler")
    run = gr.Button("Generate", elem_id="explorer-generate")
    overview = gr.Image(label="trajectory", format="png", interactive=False, height=240, elem_id="explorer-reverse")
    trajectory = gr.State([])
    with gr.Row():
        step = step_slider(1)
        frame = gr.Image(label="this step", format="png", interactive=False, height=240, elem_id="explorer-step")

    def reverse(*values):
        latents, picture = reverse_process(session.pipe, *values)
        last = len(latents) - 1
        return latents, picture, step_slider(last), step_view(session.pipe, latents, last)

    run.click(
        guard(reverse),
        [prompt, reverse_seed, steps, sampler],
        [trajectory, overview, step, frame],
        concurrency_id="generate",
        concurrency_limit=1,
    )
    step.change(lambda latents, k: step_view(session.pipe, latents, k), [trajectory, step], frame)
