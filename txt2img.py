r"""txt2img.py: text-to-image, img2img and inpainting with a Stable Diffusion v1 checkpoint.

    python txt2img.py --prompt "a red apple"   # the embedded 32x32 emoji model
    python txt2img.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a lighthouse at dusk" \
        --sampler dpmpp_2m_karras --steps 25
    python txt2img.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "an oil painting" \
        --init-image photo.png --strength 0.6
    python txt2img.py --ckpt sd-v1-5-inpainting.ckpt --prompt "a vase of tulips" --init-image room.png --mask mask.png
    python txt2img.py --ckpt sd15.safetensors --prompt "a fox, in mystyle" \
        --lora detail.safetensors:0.6 --embedding mystyle.pt
    python txt2img.py --ckpt sd15.safetensors --prompt "a house" \
        --controlnet control_v11p_sd15_canny.pth --control-image photo.png --control-preprocess canny

Writes one PNG per image into --outdir, numbered after the PNGs already there (nothing is overwritten), and a
grid when a run makes more than one image. Each PNG carries its generation parameters: AUTOMATIC1111's
"parameters" text chunk and the same facts as JSON in an "ldm" chunk (--no-metadata leaves both out).
Image k of a run has seed --seed + k; the same parameters (batch size included) give the same image bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--sampler", choices=cli.SAMPLER_NAMES, help="default: the model's (SD v1: ddim)")
    p.add_argument(
        "--schedule",
        choices=cli.SCHEDULE_NAMES,
        default="default",
        help="where the sampler's steps fall (A1111's schedule type): default, the sampler's own; karras, exponential "
        "and sgm_uniform for the samplers that take them",
    )
    p.add_argument("--steps", "--ddim_steps", type=int, help="sampling steps (default: the model's; SD v1: 50)")
    p.add_argument(
        "--scale", type=float, help="classifier-free guidance scale; 1: none (default: the model's; SD v1: 7.5)"
    )
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
    p.add_argument(
        "--cfg-end",
        type=float,
        default=1.0,
        metavar="F",
        help="CFG truncation: guidance on the first F of the steps only, none after (default: 1, every step)",
    )
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
        "--outpaint",
        metavar="LEFT,TOP,RIGHT,BOTTOM",
        help="extend the init image by these pixels (rounded up to the VAE factor) and inpaint the new area",
    )
    p.add_argument("--mask-blur", type=int, help="outpainting: the mask's feathered border in pixels (default: 4)")
    hires = p.add_argument_group("hires fix", "txt2img in two passes, as AUTOMATIC1111's: draw small, upscale, img2img")
    hires.add_argument("--hires-scale", type=float, help="upscale the first pass's images by this factor (e.g. 2)")
    hires.add_argument("--hires-size", metavar="WxH", help="or upscale them to WxH (the same aspect ratio)")
    hires.add_argument("--hires-steps", type=int, help="steps of the second pass (default: 0, as --steps)")
    hires.add_argument("--hires-denoise", type=float, help="the second pass's denoising strength (default: 0.7)")
    hires.add_argument(
        "--hires-upscaler",
        choices=cli.HIRES_UPSCALER_NAMES,
        metavar="NAME",
        help=f"{', '.join(cli.HIRES_UPSCALER_NAMES)} (default: Latent, bilinear on the latents; Lanczos: pixels)",
    )
    hires.add_argument("--hires-prompt", help="the second pass's prompt (default: the prompt)")
    hires.add_argument(
        "--hires-sampler", choices=cli.SAMPLER_NAMES, help="the second pass's sampler (default: --sampler)"
    )
    p.add_argument(
        "--xyz",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="an X/Y/Z plot axis over a setting (steps, scale, seed, sampler, prompt S/R, lora weight...): X, then Y, "
        "then Z; one image per cell and a labelled grid, as AUTOMATIC1111's script",
    )
    cli.add_speed_arguments(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda when there is one, else cpu)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (the first image pays the compile time)"
    )
    p.add_argument(
        "--taesd",
        type=Path,
        metavar="PATH",
        help="decode with TAESD, the tiny autoencoder (much faster, a close image): madebyollin's taesd_decoder "
        ".safetensors / .pth or a diffusers AutoencoderTiny folder",
    )
    p.add_argument(
        "--taesd-encode", action="store_true", help="img2img / inpainting: encode the init image with TAESD too"
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
    control = p.add_argument_group(
        "ControlNet", "repeat the group for several ControlNets; a setting given once per --controlnet, in order"
    )
    control.add_argument(
        "--controlnet", action="append", default=[], metavar="FILE", help="a ControlNet file or folder"
    )
    control.add_argument("--control-image", action="append", default=[], type=Path, metavar="IMG", help="its image")
    control.add_argument(
        "--control-preprocess",
        action="append",
        default=[],
        choices=cli.CONTROL_PREPROCESS_NAMES,
        help="none (default): the image is the control map; canny: its edges (OpenCV, thresholds 100/200)",
    )
    control.add_argument("--control-scale", action="append", default=[], type=float, help="residual scale (1)")
    control.add_argument("--control-start", action="append", default=[], type=float, help="first step, 0..1 (0)")
    control.add_argument("--control-end", action="append", default=[], type=float, help="last step, 0..1 (1)")
    control.add_argument(
        "--guess-mode", action="store_true", help="the ControlNets see the conditional half only, scaled 0.1..1"
    )
    control.add_argument("--save-control", action="store_true", help="also save the control maps used")
    return p.parse_args(argv)


# how the command line calls the request's settings, in its error messages (ldm.request.NAMES)
NAMES = {
    "steps": "--steps",
    "schedule": "--schedule",
    "scale": "--scale",
    "eta": "--eta",
    "guidance_rescale": "--guidance-rescale",
    "cfg_end": "--cfg-end",
    "strength": "--strength",
    "height": "--H",
    "width": "--W",
    "seed": "--seed",
    "init_image": "--init-image",
    "mask": "--mask",
    "outpaint": "--outpaint",
    "mask_blur": "--mask-blur",
    "controlnet": "--controlnet",
    "control_preprocess": "--control-preprocess",
    "deepcache": "--deepcache",
    "deepcache_branch": "--deepcache-branch",
    "n_iter": "--n-iter",
    "hires_scale": "--hires-scale",
    "hires_size": "--hires-size",
    "hires_steps": "--hires-steps",
    "hires_denoise": "--hires-denoise",
    "hires_upscaler": "--hires-upscaler",
    "hires_prompt": "--hires-prompt",
    "hires_sampler": "--hires-sampler",
}


if __name__ == "__main__":
    parse_args(None)  # --help and a mistyped flag answer here, before anything else is imported

from ldm.request import Control, EmbeddingSpec, InputError, LoraSpec, OutputSpec, Request  # noqa: E402


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


def outpaint_padding(value: str | None) -> tuple[int, ...] | None:
    """--outpaint LEFT,TOP,RIGHT,BOTTOM as whole pixels."""
    if value is None:
        return None
    try:
        return tuple(int(number) for number in value.split(","))
    except ValueError:
        raise InputError(f"--outpaint takes LEFT,TOP,RIGHT,BOTTOM in whole pixels, got '{value}'") from None


def hires_size(value: str | None) -> tuple[int, int] | None:
    """--hires-size WxH as whole pixels."""
    if value is None:
        return None
    try:
        width, height = (int(side) for side in value.lower().split("x"))
    except ValueError:
        raise InputError(f"--hires-size takes WIDTHxHEIGHT in whole pixels, got '{value}'") from None
    return width, height


def control_units(args) -> tuple[Control, ...]:
    """The --controlnet groups (one --control-image per --controlnet, each other setting given never or once per
    --controlnet), in order."""
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
    return tuple(
        Control(
            path,
            args.control_image[k],
            args.control_preprocess[k] if args.control_preprocess else "none",
            args.control_scale[k] if args.control_scale else 1.0,
            args.control_start[k] if args.control_start else 0.0,
            args.control_end[k] if args.control_end else 1.0,
        )
        for k, path in enumerate(args.controlnet)
    )


def request_of(args) -> tuple[Request, OutputSpec]:
    """The command line as a Request and an OutputSpec, checked as far as they can be without a model (nothing
    heavy is imported for it: a bad flag value answers at once)."""
    request = Request(
        tuple(read_prompts(args)),
        negative_prompt=args.negative_prompt,
        n_samples=args.n_samples,
        seed=args.seed,
        sampler=args.sampler,
        schedule=args.schedule,
        steps=args.steps,
        scale=args.scale,
        height=args.H,
        width=args.W,
        eta=args.eta,
        guidance_rescale=args.guidance_rescale,
        cfg_end=args.cfg_end,
        prompt_syntax=args.prompt_syntax,
        clip_skip=args.clip_skip,
        init_image=args.init_image,
        mask=args.mask,
        strength=args.strength,
        outpaint=outpaint_padding(args.outpaint),
        mask_blur=args.mask_blur,
        controls=control_units(args),
        guess_mode=args.guess_mode,
        loras=tuple(LoraSpec(*cli.file_spec(value, "--lora", weight=True)) for value in args.lora),
        embeddings=tuple(EmbeddingSpec(*cli.file_spec(value, "--embedding", weight=False)) for value in args.embedding),
        deepcache=args.deepcache,
        deepcache_branch=args.deepcache_branch,
        hires_scale=args.hires_scale,
        hires_size=hires_size(args.hires_size),
        hires_steps=args.hires_steps,
        hires_denoise=args.hires_denoise,
        hires_upscaler=args.hires_upscaler,
        hires_prompt=args.hires_prompt,
        hires_sampler=args.hires_sampler,
    )
    spec = OutputSpec(
        args.outdir, args.n_iter, not args.skip_grid, not args.no_metadata, args.save_intermediates, args.save_control
    )
    spec.check(request, NAMES)
    check_writable(args.outdir)
    return request, spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: generate(args))


def precheck(argv: list[str] | None) -> int:
    """0 when the command line makes a request that passes the checks needing no model, else its exit code (the error
    said by cli.run)."""

    def work() -> int:
        request_of(parse_args(argv))
        return 0

    return cli.run(work)


if __name__ == "__main__" and (code := precheck(None)):  # a bad value: before the seconds of imports below
    sys.exit(code)

from ldm import DEFAULT_MODEL, load_pipeline  # noqa: E402
from ldm.checkpoint import peek_config  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.memory import check_memory  # noqa: E402
from ldm.outputs import make_images, model_facts  # noqa: E402
from ldm.prompts import lora_tags  # noqa: E402
from ldm.runtime import runtime  # noqa: E402
from ldm.xyz import cells, make_xyz, parse_axis  # noqa: E402


def show_note(message, *_):
    print(f"note: {message}", file=sys.stderr)


def generate(args) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = show_note  # warnings (an image resized, a prompt truncated) as one-line notes
        written = execute(args)
    print("\n".join(map(str, written)))
    return 0


def execute(args) -> list[Path]:
    """Check the input, load the model, generate and write the images; return the paths written."""
    request, spec = request_of(args)
    axes = [parse_axis(text) for text in args.xyz]
    requests = cells(request, axes, spec.n_iter) if axes else [request]  # the X/Y/Z plot's cells
    # A1111's <lora:NAME:W> tags: taken out of each prompt, their files found now (before loading the model)
    prompts = {p for r in requests for p in r.prompts}
    tagged = {p: lora_tags(p, args.lora_dir) for p in prompts} if args.prompt_syntax == "a1111" else {}
    ckpt = DEFAULT_MODEL if args.ckpt is None else args.ckpt
    run = runtime(args.device, args.dtype, args.quantize, args.backend, args.compile, args.taesd, args.taesd_encode)
    config = load_config(args.config) if args.config else None
    model_config = config or peek_config(ckpt)
    for cell in requests:  # before loading: no loading time lost
        check_memory(cell.resolved(model_config, NAMES), model_config, run.device, run.options()["dtype"])
    pipe = load_pipeline(ckpt, config=config, **run.options())
    if args.compile:
        print("note: compiling the UNet on its first call (~2-3 min on a CPU, less on a GPU)...", file=sys.stderr)
    model = model_facts(ckpt, run, args.no_metadata)
    if axes:
        return list(make_xyz(pipe, requests, axes, spec, model, tagged))
    return list(make_images(pipe, request, spec, model, tagged))


if __name__ == "__main__":
    sys.exit(main())
