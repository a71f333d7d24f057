r"""Train the text-conditioned UNet of ldm (Stable Diffusion v1) from scratch or from a checkpoint, on 1..N devices.

    python train_unet.py --config configs/train-unet-tiny.yaml data.path=my_images [key.path=value ...]
    accelerate launch --num_processes 8 train_unet.py --config my.yaml [--resume latest] [--cache-latents] \
        [--learn-sigma] [--lora RANK] [--controlnet]

Top to bottom: config -> Accelerator -> models -> data (or the latent cache) -> optimizer -> resume -> the loop
(noise, loss, optimizer step, EMA, logging, checkpoints) -> <output_dir>/model.safetensors, a single-file
checkpoint (EMA weights in the UNet) that txt2img.py --ckpt and python -m ldm.convert read. With --lora RANK
only a LoRA trains (the UNet stays frozen) -> <output_dir>/lora.safetensors, a kohya file that txt2img.py --lora,
AUTOMATIC1111, ComfyUI and diffusers read. With --controlnet only a ControlNet trains (the whole model of init_from
stays frozen; its control maps: the `conditioning_image` column of the data, or controlnet.preprocess=canny)
-> <output_dir>/controlnet.safetensors in lllyasviel's layout, which txt2img.py --controlnet and diffusers read.
"""

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from ldm.cli import ArgumentParser, run


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
        "overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. optim.lr=1e-4 data.path=images"
    )
    return p.parse_intermixed_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a mistyped flag answer here, before the imports below take seconds (torch, diffusers)

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from ldm.cache import LatentCache, build_cache, cache_key
from ldm.checkpoint import load_model, save_single_file
from ldm.config import ConfigError, TrainUNetConfig, to_dict
from ldm.controlnet import Control, ControlNet, load_controlnet, save_controlnet
from ldm.data import ImageCaptionDataset
from ldm.diffusion import Diffusion
from ldm.errors import CheckpointError
from ldm.io import load_state_strict
from ldm.lora import add_lora, save_lora
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.samplers import check_sampler
from ldm.training import (
    EMA,
    Stop,
    TrainState,
    checkpoint_run,
    checkpoint_trainable_only,
    flat_config,
    gather_skipped,
    list_checkpoints,
    log_image,
    make_accelerator,
    optimizer_step,
    peak_memory_gib,
    per_sample_generators,
    randn_like_per_sample,
    read_train_config,
    resume_state,
    skipped_report,
    start_run,
    stream_batches,
    writing,
)


def load_train_config(args) -> tuple[TrainUNetConfig, StableDiffusion | None]:
    """Defaults <- a ControlNet's lr 1e-5 (the ControlNet paper's) <- YAML <- flags <- overrides (see
    ldm.training.read_train_config), then --learn-sigma."""
    flags = (["cache_latents=true"] if args.cache_latents else []) + ([f"lora.rank={args.lora}"] if args.lora else [])
    overrides = flags + (["controlnet.enabled=true"] if args.controlnet else []) + args.overrides

    def mode_defaults(raw: dict) -> dict:
        controlnet = raw.get("controlnet")
        return {"optim": {"lr": 1e-5}} if isinstance(controlnet, dict) and controlnet.get("enabled") is True else {}

    cfg, init = read_train_config(
        args.config, overrides, TrainUNetConfig, lambda path, _: load_model(path), mode_defaults
    )
    if args.learn_sigma:
        cfg.model.learn_sigma, cfg.model.unet.out_channels = True, 2 * cfg.model.vae.embed_dim
    return cfg, init


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: train(args))


def train(args) -> int:
    # ------------------------------------------------------------ config, Accelerator, models
    cfg, init = load_train_config(args)
    diffusion = Diffusion(cfg.model)  # checks the objective fields first
    check_sampler(cfg.validation.sampler, cfg.model, ConfigError, "validation.sampler")
    output_dir, checkpoints, resume = start_run(cfg, args.resume)
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
    accelerator = make_accelerator(output_dir, cfg.mixed_precision, cfg.grad_accum, cfg.tracker, cfg.compile)
    device = accelerator.device
    set_seed(cfg.seed)  # the same fresh UNet on every process

    model = StableDiffusion(cfg.model)
    if init is not None:
        parts = ["first_stage_model", "cond_stage_model"] + ([] if cfg.reinit_unet else ["model"])
        for name in parts:
            hint = " (set reinit_unet=true to train a UNet of another shape)" if name == "model" else ""
            try:
                load_state_strict(getattr(model, name), getattr(init, name).state_dict(), f"{cfg.init_from}{hint}")
            except CheckpointError as e:
                raise CheckpointError(f"{e}{hint}") from None
        del init
    unet, vae, text_encoder = model.unet, model.vae, model.text_encoder
    vae.requires_grad_(False).eval()
    # what trains and what the EMA follows: the whole UNet, or only the LoRAs beside its frozen layers (and the text
    # encoder's with lora.text_encoder), or a ControlNet beside the frozen UNet
    controlnet = None
    if cfg.controlnet.enabled and cfg.controlnet.init_from:
        controlnet = load_controlnet(cfg.controlnet.init_from, cfg.model).train()
    elif cfg.controlnet.enabled:
        controlnet = ControlNet.from_unet(unet, cfg.model)
    if controlnet:
        unet.requires_grad_(False).to(device)
    trained = add_lora(model, cfg.lora) if cfg.lora.rank else controlnet or unet
    what = "LoRA" if cfg.lora.rank else "ControlNet" if controlnet else "model"
    output_name = f"{what.lower()}.safetensors"
    unet.train()
    latent_shape = cfg.model.vae.latent_shape(cfg.data.resolution, cfg.data.resolution)

    # ------------------------------------------------------------ data: images on the fly, or the latent cache
    if cfg.cache_latents:
        folder = Path(cfg.cache_dir).expanduser() / cache_key(dataset, vae, text_encoder)
        if accelerator.is_main_process and not folder.exists():
            accelerator.print(f"encoding {len(dataset)} images into the latent cache {folder}")
            vae.encoder.to(device), vae.quant_conv.to(device), text_encoder.to(device)
            with accelerator.autocast():
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
        accelerator.wait_for_everyone()
        # the VAE encoder stays on the CPU, unused; validation needs the decoder and the text encoder
        train_set = LatentCache(folder)
        empty_context = train_set.empty_context.to(device)
        if cfg.validation.every:
            vae.decoder.to(device), vae.post_quant_conv.to(device), text_encoder.to(device)
    else:
        train_set = dataset
        vae.to(device), text_encoder.to(device)

    # ------------------------------------------------------------ optimizer, schedule, EMA, resume
    optimizer = torch.optim.AdamW(
        trained.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
        eps=cfg.optim.eps,
    )
    lr_scheduler = get_scheduler(
        cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.max_steps
    )
    # the LR scheduler is stepped once per step by us, not per process
    net = controlnet or unet  # the network the gradient goes through, under DDP (checkpoints hold it alone)
    if cfg.lora.text_encoder:  # its LoRAs train: through DDP as the UNet, so their gradients are averaged too
        net_ddp, text_encoder_ddp, optimizer = accelerator.prepare(net, text_encoder, optimizer)
    else:
        (net_ddp, optimizer), text_encoder_ddp = accelerator.prepare(net, optimizer), text_encoder
    if cfg.lora.rank:  # checkpoints hold the LoRAs alone: on resume the frozen weights come from init_from again
        checkpoint_trainable_only(accelerator)
    ema = EMA(trained, cfg.ema.decay, cfg.ema.warmup, cfg.ema.start_step) if cfg.ema.enabled else None
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state, *([ema] if ema else []))
    resume_state(accelerator, resume, args.resume, checkpoints, state)
    state.skipped |= dict(train_set.skipped)  # found while listing the folder (or building the cache)
    batches = stream_batches(train_set, cfg, accelerator, state.samples_seen)
    accelerator.print(f"{len(train_set)} training images, {accelerator.num_processes} process(es) on {device.type}")

    def write_model(folder: Path) -> None:
        """The inference checkpoint with the EMA weights: our single-file layout, or the LoRA file; plus the config."""
        with ema.applied_to(trained) if ema else contextlib.nullcontext():
            if cfg.lora.rank:
                save_lora(trained, folder / output_name, f"{output_dir.name} (ldm train_unet.py)", state.step)
            elif controlnet:
                save_controlnet(controlnet, folder / output_name)
            else:
                save_single_file(model, folder / output_name)
        (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    def validate() -> None:
        """One image per validation prompt, each with its fixed seed, from the EMA weights: saved as a PNG row,
        logged. A ControlNet's: for prompt i the control map of training item i, then the image drawn with it."""
        v = cfg.validation
        options = dict(steps=v.steps, scale=v.guidance_scale, sampler=v.sampler, progress=False)
        options |= dict(height=cfg.data.resolution, width=cfg.data.resolution)
        unet.eval(), trained.eval()
        with ema.applied_to(trained) if ema else contextlib.nullcontext(), accelerator.autocast():
            if controlnet:
                images = []
                for i, prompt in enumerate(v.prompts):
                    hint = dataset[(i % len(dataset), v.seed)]["hint"]
                    control = Image.fromarray((hint * 255).round().byte().permute(1, 2, 0).numpy())
                    images += [
                        control,
                        *Pipeline(model).txt2img(
                            [prompt], seed=v.seed + i, **options, controls=[Control(controlnet, control)]
                        ),
                    ]
            else:
                images = Pipeline(model).txt2img(list(v.prompts), seed=v.seed, **options)
        unet.train(), trained.train()
        grid = Image.new("RGB", (sum(im.width for im in images), images[0].height))
        for i, im in enumerate(images):
            grid.paste(im, (i * im.width, 0))
        path = output_dir / "validation" / f"step-{state.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        log_image(accelerator, "validation", grid, state.step)

    # ------------------------------------------------------------ the loop
    accelerator.init_trackers("train_unet", config=flat_config(to_dict(cfg)))
    stop = Stop(accelerator, cfg.max_nan_skips)  # SIGTERM, Ctrl-C, too many non-finite steps
    progress = tqdm(
        total=cfg.max_steps, initial=state.step, disable=not accelerator.is_main_process, dynamic_ncols=True
    )
    window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.perf_counter()
    while state.step < cfg.max_steps:
        batch = next(batches)
        state.samples_seen += cfg.batch_size * accelerator.num_processes
        state.skipped |= dict(batch["skipped"])
        # Every random draw of a sample comes from its own generator, in a fixed order, so it does not depend
        # on the process count or on resuming: timestep, diffusion noise, posterior noise, caption dropout, offset.
        gens = per_sample_generators(batch["seed"])
        t = torch.stack([torch.randint(0, cfg.model.timesteps, (), generator=g) for g in gens]).to(device)
        noise = randn_like_per_sample(gens, latent_shape).to(device)
        posterior_noise = randn_like_per_sample(gens, latent_shape).to(device)
        drop = [bool(torch.rand((), generator=g) < cfg.caption_dropout) for g in gens]
        offset = randn_like_per_sample(gens, (latent_shape[0], 1, 1)).to(device)

        hint = batch["hint"].to(device) if controlnet else None  # the control maps, (B, 3, H, W) in [0, 1]
        with torch.no_grad(), accelerator.autocast():
            if cfg.cache_latents:
                mean, std, context = batch["mean"].to(device), batch["std"].to(device), batch["context"].to(device)
                context[torch.tensor(drop, device=device)] = empty_context
            else:
                posterior = vae.encode(batch["pixels"].to(device))
                mean, std = posterior.mean.float(), posterior.std.float()
                captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
                tokens = text_encoder.tokenize(captions).to(device)
            latents = model.get_first_stage_encoding(mean + std * posterior_noise)  # z ~ q(z | x), scaled
            noise = noise + cfg.offset_noise * offset  # offset noise: a per-channel constant shift (Guttenberg 2023)
            x_t = diffusion.q_sample(latents, t, noise)

        with accelerator.accumulate(net_ddp, text_encoder_ddp):
            if not cfg.cache_latents:  # the prompts' states, with their gradient when the text encoder's LoRAs train
                with torch.set_grad_enabled(cfg.lora.text_encoder), accelerator.autocast():
                    context = text_encoder_ddp(tokens)
            if controlnet:  # the frozen UNet, its skips and middle block plus the ControlNet's residuals
                with accelerator.autocast():
                    out = unet(x_t, t, context, control=net_ddp(x_t, hint, t, context))
            else:
                out = net_ddp(x_t, t, context)
            loss = diffusion.loss(out, latents, x_t, noise, t, cfg.min_snr_gamma, cfg.vlb_weight).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm, skipped_step = optimizer_step(
                    accelerator, optimizer, trained.parameters(), cfg.optim.max_grad_norm
                )
        window_loss += loss.item() if torch.isfinite(loss) else 0.0
        window_images += cfg.batch_size
        if not accelerator.sync_gradients:
            continue

        state.step += 1
        lr_scheduler.step()
        if ema and not skipped_step:
            ema.update(trained)
        window_steps += 1
        progress.update(1)

        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            mean_loss = accelerator.reduce(
                torch.tensor([window_loss / (window_steps * cfg.grad_accum)], device=device), "mean"
            ).item()
            logs = {
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                "images_per_s_per_device": window_images / elapsed,
                "peak_memory_gib": peak_memory_gib(device),
            }
            if ema:
                logs["ema_decay"] = ema.current_decay()
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{logs['images_per_s_per_device']:.1f}")
            window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.perf_counter()

        if cfg.validation.every and state.step % cfg.validation.every == 0:
            if accelerator.is_main_process:
                validate()
            accelerator.wait_for_everyone()
        stopping = stop.after_step(state.step, skipped_step)
        if state.step % cfg.save_every == 0 or state.step == cfg.max_steps or stopping:
            checkpoint_run(accelerator, checkpoints, state, cfg.keep_last, write_model, progress)
        if stopping:
            del (
                net_ddp,
                text_encoder_ddp,
            )  # before the process group goes (pytorch#56297: see ldm.training.end_training)
            return stop.end(progress)

    # ------------------------------------------------------------ the end: the single-file model, what was skipped
    progress.close()  # the last step was saved above (or, resumed at max_steps, there was none to run)
    gather_skipped(state)
    if accelerator.is_main_process:
        with writing(
            output_dir,
            output_dir / output_name,
            f"{list_checkpoints(checkpoints)[-1] / output_name} is the same {what}",
        ):
            write_model(output_dir)
        print(skipped_report(state.skipped))
        print(f"wrote {output_dir / output_name}")
    del net_ddp, text_encoder_ddp  # before the process group goes (pytorch#56297: see ldm.training.end_training)
    return stop.end(progress)


if __name__ == "__main__":
    sys.exit(main())
