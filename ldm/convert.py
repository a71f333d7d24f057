"""python -m ldm.convert SRC DST: between SD single files, our checkpoints and diffusers folders.

SRC: a .safetensors / .ckpt single file or a diffusers folder. DST ending in .safetensors: the original
SD v1 single-file layout, with our config in its metadata; any other DST: a diffusers folder that
diffusers.StableDiffusionPipeline.from_pretrained loads.

--vae FILE takes the VAE from FILE (a checkpoint, or a VAE-only file such as SD's
vae-ft-mse-840000-ema-pruned.safetensors): a fine-tuned decoder joins the UNet it was made for, whose latent scale
factor stays SRC's.

A ControlNet .safetensors (lllyasviel's `control_model.*` layout, as train_unet.py --controlnet writes) is copied
with --half casting its tensors to fp16 (names and metadata kept), as the shipped emoji ControlNet was made.
"""

import argparse
import sys
from pathlib import Path

from ldm.cli import ArgumentParser, run


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m ldm.convert", description=__doc__.split("\n\n")[1])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--config", type=Path, help="architecture YAML, for a single file that does not carry its config")
    p.add_argument("--no-ema", action="store_true", help="keep the raw UNet weights of a file that also has EMA ones")
    p.add_argument("--vae", type=Path, help="take the VAE's weights from this file (same VAE architecture)")
    p.add_argument("--half", action="store_true", help="write fp16 tensors (single-file output)")
    p.add_argument(
        "--no-text-encoder",
        action="store_true",
        help="leave out a pretrained text encoder's weights (loading takes them from its package)",
    )
    p.add_argument(
        "--sampling",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="the generation defaults DST carries (sampler=, steps=, scale=: txt2img.py's when no flag says)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a mistyped flag answer here, before the imports below take seconds (torch, diffusers)

import torch
from safetensors import SafetensorError, safe_open

from ldm.checkpoint import load_model, load_model_or_vae, save_diffusers_folder, save_single_file
from ldm.config import ModelConfig, apply_overrides, from_dict, load_config, to_dict
from ldm.controlnet import PREFIX
from ldm.errors import CheckpointError
from ldm.io import atomic_save, load_state_strict, read_state_dict


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: convert(args))


def convert(args) -> int:
    if args.dst.exists() and not args.overwrite:
        raise CheckpointError(f"{args.dst} exists; pass --overwrite to replace it")
    if args.dst.resolve() == args.src.resolve():
        raise CheckpointError("SRC and DST are the same path")
    if is_controlnet_file(args.src):
        return convert_controlnet(args)
    cfg = load_config(args.config) if args.config else None
    model = load_model(args.src, cfg, use_ema=not args.no_ema)
    if args.vae:  # the scale factor is the UNet's: it was trained on latents scaled by it
        vae = load_model_or_vae(args.vae, model.cfg).first_stage_model.state_dict()
        load_state_strict(model.first_stage_model, vae, str(args.vae))
    if args.sampling:  # only the sampling section: the architecture is the weights'
        raw = to_dict(model.cfg)
        apply_overrides(raw["sampling"], args.sampling)
        model.cfg = from_dict(ModelConfig, raw)
    if args.dst.suffix == ".safetensors":
        save_single_file(model, args.dst, torch.float16 if args.half else None, text_encoder=not args.no_text_encoder)
    else:
        save_diffusers_folder(model, args.dst)
    print(f"wrote {args.dst}")
    return 0


def is_controlnet_file(path: Path) -> bool:
    """A .safetensors file of `control_model.*` tensors only (its header read, not its tensors); an unreadable file
    is not, and load_model names what is wrong with it."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return False
    return bool(keys) and all(key.startswith(PREFIX) for key in keys)


def convert_controlnet(args) -> int:
    if args.dst.suffix != ".safetensors" or args.sampling or args.no_ema or args.config or args.vae:
        raise CheckpointError("a ControlNet converts to a .safetensors file, with --half only")
    tensors, metadata = read_state_dict(args.src)
    metadata = metadata or {"format": "pt"}
    dtype = torch.float16 if args.half else None
    atomic_save(
        {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in tensors.items()}, args.dst, metadata
    )
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
