r"""Train the text-conditioned UNet of ldm (Stable Diffusion v1) from scratch or from a checkpoint, on 1..N devices.

    python train_unet.py --config configs/train-unet-tiny.yaml data.path=my_images [key.path=value ...]
    accelerate launch --num_processes 8 train_unet.py --config my.yaml [--resume latest] [--cache-latents] \
        [--learn-sigma] [--lora RANK] [--controlnet] [--lcm | --lcm-full]

Top to bottom: config -> the run (ldm.training.Run: output_dir, Accelerator) -> models and what trains (a Trainable) ->
data (or the latent cache) -> optimizer, EMA, resume -> the loop (noise, loss; the run does the optimizer step, EMA,
logging, checkpoints) -> <output_dir>/model.safetensors, a single-file checkpoint (EMA weights in the UNet) that
txt2img.py --ckpt and python -m ldm.convert read. With --lora RANK only a LoRA trains (the UNet stays frozen) ->
<output_dir>/lora.safetensors, a kohya file that txt2img.py --lora, AUTOMATIC1111, ComfyUI and diffusers read. With
--controlnet only a ControlNet trains (the whole model of init_from stays frozen; its control maps: the
`conditioning_image` column of the data, or controlnet.preprocess=canny) -> <output_dir>/controlnet.safetensors in
lllyasviel's layout, which txt2img.py --controlnet and diffusers read. With --lcm the model of init_from is distilled
into a LoRA that samples in 1-4 steps with the lcm sampler (latent consistency distillation, ldm.consistency; lcm.*) ->
<output_dir>/lora.safetensors, an LCM-LoRA. With --lcm-full it is distilled into the whole UNet instead, given a
guidance embedding (unet.time_cond_proj_dim), against an EMA target network -> <output_dir>/model.safetensors, an
LCM that the lcm sampler runs with the guidance scale embedded, no unconditional batch. A fine-tune (init_from)
stopped by Ctrl-C or SIGTERM writes that file too, with the weights of the step it stopped at.
"""

import argparse
import sys
from pathlib import Path

from ldm.cli import ArgumentParser
from ldm.cli import run as exit_code


def rank(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"the LoRA rank must be a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="train_unet.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="training YAML (see configs/train-unet-tiny.yaml)")
    p.add_argument(
        "--resume", metavar="latest|PATH", help="continue from the newest checkpoint of output_dir, or from PATH"
    )
    p.add_argument(
        "--cache-latents",
        action="store_true",
        help="encode the dataset once (VAE posterior + text embeddings) and train from that",
    )
    p.add_argument(
        "--learn-sigma",
        action="store_true",
        help="also learn the variance (2x UNet output channels, improved-DDPM hybrid loss)",
    )
    p.add_argument(
        "--lora",
        type=rank,
        metavar="RANK",
        help="train a LoRA of this rank on the frozen UNet (lora.rank; see lora.alpha, lora.targets)",
    )
    p.add_argument(
        "--controlnet",
        action="store_true",
        help="train a ControlNet beside the frozen model of init_from (controlnet.*; optim.lr 1e-5 unless set)",
    )
    p.add_argument(
        "--lcm",
        action="store_true",
        help="distill the model of init_from into an LCM-LoRA for 1-4 step sampling (lcm.*; lora.rank 64, "
        "optim.lr 1e-4 and validation at 4 lcm steps unless set)",
    )
    p.add_argument(
        "--lcm-full",
        action="store_true",
        help="distill the model of init_from into a whole LCM UNet with a guidance embedding and an EMA target network "
        "(lcm.full; optim.lr 1e-4 and validation at 4 lcm steps, guidance 8, unless set)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. optim.lr=1e-4 data.path=images"
    )
    return p.parse_intermixed_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a mistyped flag answer here, before the imports below take seconds (torch, diffusers)

import torch
from tqdm.auto import tqdm

from ldm.cache import LatentCache, build_cache, cache_key
from ldm.checkpoint import load_model
from ldm.config import ConfigError, TrainUNetConfig
from ldm.consistency import FullForm, LatentConsistency, LoRAForm
from ldm.controlnet import ControlNet, load_controlnet
from ldm.data import ImageCaptionDataset
from ldm.diffusion import Diffusion
from ldm.errors import CheckpointError
from ldm.io import load_state_strict
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.run_files import read_train_config
from ldm.samplers import check_sampler
from ldm.shards import Shards, is_shards, open_index
from ldm.stream import Stream
from ldm.training import (
    ControlNetTrainable,
    LoRATrainable,
    Run,
    UNetTrainable,
    per_sample_generators,
    randn_like_per_sample,
)


def load_train_config(args) -> tuple[TrainUNetConfig, StableDiffusion | None]:
    """Defaults <- a ControlNet's lr 1e-5 (the ControlNet paper's) or LCM-LoRA's settings <- YAML <- flags <- overrides
    (see ldm.run_files.read_train_config), then --learn-sigma."""
    flags = (["cache_latents=true"] if args.cache_latents else []) + ([f"lora.rank={args.lora}"] if args.lora else [])
    modes = (["controlnet.enabled=true"] if args.controlnet else []) + (["lcm.enabled=true"] if args.lcm else [])
    modes += ["lcm.enabled=true", "lcm.full=true"] if args.lcm_full else []
    overrides = flags + modes + args.overrides

    def mode_defaults(raw: dict) -> dict:
        controlnet, lcm = raw.get("controlnet"), raw.get("lcm")
        if isinstance(controlnet, dict) and controlnet.get("enabled") is True:
            return {"optim": {"lr": 1e-5}}
        if isinstance(lcm, dict) and lcm.get("full") is True:  # the full LCM's lr, no caption dropout
            validation = {"steps": 4, "sampler": "lcm", "guidance_scale": 8.0}
            return {"optim": {"lr": 1e-4}, "caption_dropout": 0.0, "validation": validation}
        if isinstance(lcm, dict) and lcm.get("enabled") is True:  # LCM-LoRA's rank and lr, no caption dropout
            validation = {"steps": 4, "sampler": "lcm", "guidance_scale": 1.0}
            return {"lora": {"rank": 64}, "optim": {"lr": 1e-4}, "caption_dropout": 0.0, "validation": validation}
        return {}

    cfg, init = read_train_config(
        args.config, overrides, TrainUNetConfig, lambda path, _: load_model(path), mode_defaults
    )
    if args.learn_sigma:
        cfg.model.learn_sigma, cfg.model.unet.out_channels = True, 2 * cfg.model.vae.embed_dim
    if cfg.lcm.full and cfg.model.unet.time_cond_proj_dim is None:  # the student gets the w-embedding
        cfg.model.unet.time_cond_proj_dim = cfg.lcm.time_cond_proj_dim
    return cfg, init


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: train(args))


def train(args) -> int:
    # ------------------------------------------------------------ config, run (output_dir, Accelerator), models
    cfg, init = load_train_config(args)
    diffusion = Diffusion(cfg.model)  # checks the objective fields first
    lcm = LatentConsistency(diffusion, cfg.lcm) if cfg.lcm.enabled else None
    check_sampler(cfg.validation.sampler, cfg.model, ConfigError, "validation.sampler")
    run = Run(cfg, "train_unet", args.resume, fine_tune=bool(cfg.init_from) and not cfg.reinit_unet)
    device = run.device
    if cfg.data.streaming:  # a datasets streaming source, split over the processes (ldm.stream)
        if cfg.cache_latents or cfg.controlnet.enabled or cfg.data.buckets:
            raise ConfigError(
                "data.streaming trains the UNet or a LoRA at one size: not with cache_latents, a "
                "ControlNet or data.buckets"
            )
        rank, world = run.accelerator.process_index, run.accelerator.num_processes
        dataset = Stream(cfg.data, cfg.batch_size, rank, world, cfg.seed)
    elif is_shards(cfg.data.path):  # webdataset shards, indexed by all processes together (ldm.shards)
        if cfg.cache_latents or cfg.controlnet.enabled:
            raise ConfigError("webdataset shards train the UNet or a LoRA: not with cache_latents or a ControlNet")
        index = open_index(cfg.data, run.output_dir, run.accelerator)
        rank, world = run.accelerator.process_index, run.accelerator.num_processes
        dataset = Shards(index, cfg.data, cfg.batch_size, rank, world, cfg.seed)
    else:
        if cfg.data.buckets:
            raise ConfigError("data.buckets needs webdataset shards in data.path (python -m ldm.shards writes them)")
        if cfg.data.record_order and cfg.cache_latents:
            raise ConfigError("data.record_order names the images of the stream: not with cache_latents")
        dataset = ImageCaptionDataset(
            cfg.data.path,
            cfg.data.resolution,
            cfg.data.center_crop,
            cfg.data.random_flip,
            cfg.data.image_column,
            cfg.data.caption_column,
            control=(
                cfg.controlnet.preprocess if cfg.controlnet.preprocess != "none" else cfg.controlnet.conditioning_column
            )
            if cfg.controlnet.enabled
            else "",
        )
    model, teacher = StableDiffusion(cfg.model), None
    if init is not None:
        parts = ["first_stage_model", "cond_stage_model"] + ([] if cfg.reinit_unet else ["model"])
        for name in parts:
            hint = " (set reinit_unet=true to train a UNet of another shape)" if name == "model" else ""
            state = getattr(init, name).state_dict()
            if name == "model" and cfg.lcm.full:  # the student: the teacher with its new w-embedding at zero
                state = {"diffusion_model.time_cond_proj.weight": model.unet.time_cond_proj.weight} | state
            try:
                load_state_strict(getattr(model, name), state, f"{cfg.init_from}{hint}")
            except CheckpointError as e:
                raise CheckpointError(f"{e}{hint}") from None
        teacher = init.unet if cfg.lcm.full else None  # the frozen UNet of init_from
        del init
    vae, text_encoder = model.vae, model.text_encoder
    vae.requires_grad_(False).eval()
    # what trains and what the EMA follows: the whole UNet, or only the LoRAs beside its frozen layers (and the text
    # encoder's with lora.text_encoder), or a ControlNet beside the frozen UNet
    if cfg.lora.rank:
        trainable = LoRATrainable(model, cfg.lora, f"{run.output_dir.name} (ldm train_unet.py)")
    elif cfg.controlnet.enabled:
        start = cfg.controlnet.init_from
        controlnet = load_controlnet(start, cfg.model).train() if start else ControlNet.from_unet(model.unet, cfg.model)
        trainable = ControlNetTrainable(model, controlnet, device)
    else:
        trainable = UNetTrainable(model)
    model.unet.train()
    if lcm:  # the student, teacher and target networks of the distillation
        nets = FullForm(trainable, teacher, cfg.lcm.target_decay, device) if cfg.lcm.full else LoRAForm(trainable)

    # ------------------------------------------------------------ data: images on the fly, or the latent cache
    if cfg.cache_latents:
        folder = Path(cfg.cache_dir).expanduser() / cache_key(dataset, vae, text_encoder)
        if run.accelerator.is_main_process and not folder.exists():
            print(f"encoding {len(dataset)} images into the latent cache {folder}")
            vae.encoder.to(device), vae.quant_conv.to(device), text_encoder.to(device)
            with run.accelerator.autocast():
                build_cache(
                    dataset,
                    vae,
                    text_encoder,
                    folder,
                    cfg.batch_size,
                    cfg.data.num_workers,
                    lambda it: tqdm(it, "caching"),
                )
            vae.to("cpu"), text_encoder.to("cpu")
        run.accelerator.wait_for_everyone()
        # the VAE encoder stays on the CPU, unused; validation needs the decoder and the text encoder
        train_set = LatentCache(folder)
        empty_context = train_set.empty_context.to(device)
        if cfg.validation.every:
            vae.decoder.to(device), vae.post_quant_conv.to(device), text_encoder.to(device)
    else:
        train_set = dataset
        vae.to(device), text_encoder.to(device)
        with torch.no_grad():
            empty_context = text_encoder(text_encoder.tokenize([""]).to(device))

    def draw() -> list:
        """The validation images: one per prompt, each with its fixed seed (see Trainable.samples)."""
        v = cfg.validation
        options = dict(steps=v.steps, scale=v.guidance_scale, sampler=v.sampler, progress=False)
        width, height = dataset.common_size() if isinstance(dataset, Shards) else (cfg.data.resolution,) * 2
        options |= dict(height=height, width=width)
        return trainable.samples(Pipeline(model), list(v.prompts), v.seed, options, dataset)

    # ------------------------------------------------------------ optimizer, schedule, EMA, resume; the loop
    run.prepare(trainable, extra_state=(nets.target_unet,) if cfg.lcm.full else ())
    for batch in run.batches(train_set, draw=draw, every=cfg.validation.every):
        # Every random draw of a sample comes from its own generator, in a fixed order, so it does not depend
        # on the process count or on resuming: timestep, diffusion noise, posterior noise, caption dropout, offset.
        gens = per_sample_generators(batch["seed"])
        latent_shape = (  # each batch of aspect-ratio buckets has its own size
            tuple(batch["mean"].shape[1:])
            if "mean" in batch
            else cfg.model.vae.latent_shape(*batch["pixels"].shape[-2:])
        )
        if lcm:  # t_{n+k} on the consistency solver's grid, and the teacher's guidance w
            t, w = (v.to(device) for v in lcm.draw(gens))
        else:
            t = torch.stack([torch.randint(0, cfg.model.timesteps, (), generator=g) for g in gens]).to(device)
        noise = randn_like_per_sample(gens, latent_shape).to(device)
        posterior_noise = randn_like_per_sample(gens, latent_shape).to(device)
        drop = [bool(torch.rand((), generator=g) < cfg.caption_dropout) for g in gens]
        offset = randn_like_per_sample(gens, (latent_shape[0], 1, 1)).to(device)

        with torch.no_grad(), run.accelerator.autocast():
            if cfg.cache_latents:
                mean, std, context = batch["mean"].to(device), batch["std"].to(device), batch["context"].to(device)
                context[torch.tensor(drop, device=device)] = empty_context
            else:  # from the images, or from shards of their precomputed posteriors (ldm.precompute)
                if "mean" in batch:
                    mean, std = batch["mean"].to(device), batch["std"].to(device)
                else:
                    posterior = vae.encode(batch["pixels"].to(device))
                    mean, std = posterior.mean.float(), posterior.std.float()
                if "ids" in batch:  # precomputed token ids; a dropped caption's are those of ""
                    dropped = torch.tensor(drop)[:, None]
                    tokens = torch.where(dropped, text_encoder.tokenize([""]), batch["ids"]).to(device)
                else:
                    tokens = text_encoder.tokenize(["" if d else c for c, d in zip(batch["caption"], drop)]).to(device)
            latents = model.get_first_stage_encoding(mean + std * posterior_noise)  # z ~ q(z | x), scaled
            noise = noise + cfg.offset_noise * offset  # offset noise: a per-channel constant shift (Guttenberg 2023)
            x_t = diffusion.q_sample(latents, t, noise)

        with run.accumulate():
            with run.accelerator.autocast():  # the prompts' states, with a gradient if the text encoder's LoRAs train
                context = context if cfg.cache_latents else trainable.encode(tokens)
                if lcm:
                    uncond = empty_context.expand(len(gens), -1, -1)
                    loss = lcm.loss(nets, x_t, t, w, context, uncond)
                else:
                    out = trainable.predict(x_t, t, context, batch.get("hint"))
                    loss = diffusion.loss(out, latents, x_t, noise, t, cfg.min_snr_gamma, cfg.vlb_weight).mean()
            run.step(loss, {"loss": loss})
            if cfg.lcm.full and run.accelerator.sync_gradients:  # the target network follows the stepped student
                nets.update()

    # ------------------------------------------------------------ the end: the inference file, what was skipped
    return run.end()


if __name__ == "__main__":
    sys.exit(main())
