r"""Train the KL autoencoder of ldm (SD v1's VAE) from scratch, or fine-tune one, on 1..N devices.

    python train_vae.py --config configs/train-vae-tiny.yaml data.path=my_images [--lpips-weights vgg16.pth vgg.pth]
    accelerate launch --num_processes 8 train_vae.py --config my.yaml [--resume latest] [--decoder-only] \
        [key.path=value ...]

Top to bottom: config -> Accelerator -> models (the VAE, a PatchGAN, the frozen LPIPS) -> data, minus a held-out
split -> two optimizers -> resume -> the loop (generator step; from loss.disc_start on, a discriminator step too;
EMA, logging, checkpoints) -> the latent scale factor, 1 / std of the latents (kept from init_from with
--decoder-only, so an existing UNet still fits) -> evaluation on the held-out images (PSNR, SSIM, rFID, a grid) ->
<output_dir>/model.safetensors: a whole StableDiffusion single file (the UNet and text encoder of init_from, else
fresh ones of the config) with the new VAE and scale factor: train_unet.py init_from=... and txt2img.py read it as is.
"""

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from ldm.cli import ArgumentParser, run


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="train_vae.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="training YAML (see configs/train-vae-tiny.yaml)")
    p.add_argument(
        "--resume", metavar="latest|PATH", help="continue from the newest checkpoint of output_dir, or from PATH"
    )
    p.add_argument(
        "--decoder-only", action="store_true", help="fine-tune only the decoder of init_from's VAE (its latents stay)"
    )
    p.add_argument(
        "--lpips-weights",
        nargs="+",
        metavar="PATH",
        help="torchvision's vgg16 weights and lpips' vgg.pth heads (one file or two)",
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

from ldm.checkpoint import load_model_or_vae, save_single_file
from ldm.config import ConfigError, TrainVAEConfig, to_dict
from ldm.data import ImageCaptionDataset, holdout_split, rotate_hue
from ldm.eval_vae import evaluate, image_batches
from ldm.io import load_state_strict
from ldm.losses import GeneratorLoss, NLayerDiscriminator, discriminator_loss, load_lpips
from ldm.model import StableDiffusion
from ldm.training import (
    EMA,
    Stop,
    TrainState,
    checkpoint_run,
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
from ldm.vae import latent_scale_factor


def load_train_config(args) -> tuple[TrainVAEConfig, StableDiffusion | None]:
    """Defaults <- YAML <- flags <- overrides (see ldm.training.read_train_config)."""
    flags = ["decoder_only=true"] if args.decoder_only else []
    flags += [f"lpips_weights={json.dumps(args.lpips_weights)}"] if args.lpips_weights else []
    return read_train_config(args.config, flags + args.overrides, TrainVAEConfig, load_model_or_vae)


def check_sizes(cfg: TrainVAEConfig) -> None:
    r, f, n = cfg.data.resolution, cfg.model.vae.factor, cfg.loss.disc_num_layers
    if r % f:
        raise ConfigError(f"data.resolution={r} is not a multiple of the VAE's downsampling factor {f}")
    if cfg.loss.disc_start < cfg.max_steps and r < 3 * 2**n:  # PatchGAN output: r / 2**n - 2 logits a side
        raise ConfigError(
            f"data.resolution={r} is too small for loss.disc_num_layers={n}: "
            f"the PatchGAN needs {3 * 2**n} pixels or more"
        )
    if cfg.lpips_weights and r < 16:
        raise ConfigError(f"data.resolution={r}: LPIPS (VGG16, 4 max-pools) needs 16 pixels or more")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: train(args))


def train(args) -> int:
    # ------------------------------------------------------------ config, Accelerator, models
    cfg, init = load_train_config(args)
    check_sizes(cfg)
    output_dir, checkpoints, resume = start_run(cfg, args.resume)
    dataset = ImageCaptionDataset(
        cfg.data.path,
        cfg.data.resolution,
        cfg.data.center_crop,
        cfg.data.random_flip,
        cfg.data.image_column,
        cfg.data.caption_column,
        require_captions=False,
    )
    train_set, held_out = holdout_split(dataset, cfg.holdout, cfg.seed)
    accelerator = make_accelerator(output_dir, cfg.mixed_precision, cfg.grad_accum, cfg.tracker, cfg.compile)
    device = accelerator.device
    set_seed(cfg.seed)  # the same fresh weights on every process

    model = StableDiffusion(cfg.model)
    if init is not None:
        load_state_strict(model, init.state_dict(), cfg.init_from)
        del init
    vae = model.vae.to(device).train()
    if cfg.decoder_only:  # the encoder, hence the latents an existing UNet was trained on, stays as it is
        vae.encoder.requires_grad_(False), vae.quant_conv.requires_grad_(False)
    lpips = load_lpips(cfg.lpips_weights).to(device) if cfg.lpips_weights and cfg.loss.perceptual_weight > 0 else None
    if lpips is None and cfg.loss.perceptual_weight > 0:
        accelerator.print(
            "no LPIPS weights given (--lpips-weights vgg16.pth vgg.pth): training WITHOUT the perceptual term"
        )
    loss_fn = GeneratorLoss(cfg.loss).to(device)
    disc = NLayerDiscriminator(cfg.model.vae.out_ch, cfg.loss.disc_ndf, cfg.loss.disc_num_layers).to(device)
    latent_shape = cfg.model.vae.latent_shape(cfg.data.resolution, cfg.data.resolution)

    # ------------------------------------------------------------ optimizers (VAE + logvar, discriminator), EMA, resume
    g_params = [p for p in vae.parameters() if p.requires_grad] + ([loss_fn.logvar] if cfg.loss.learn_logvar else [])
    opt_g, opt_d = (
        torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps
        )
        for params in (g_params, list(disc.parameters()))
    )
    sched_g, sched_d = (
        get_scheduler(
            cfg.optim.lr_scheduler, opt, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.max_steps
        )
        for opt in (opt_g, opt_d)
    )
    vae_ddp, disc_ddp, opt_g, opt_d = accelerator.prepare(vae, disc, opt_g, opt_d)
    ema = EMA(vae, cfg.ema.decay, cfg.ema.warmup, cfg.ema.start_step) if cfg.ema.enabled else None
    state = TrainState()
    accelerator.register_for_checkpointing(sched_g, sched_d, state, loss_fn, *([ema] if ema else []))
    resume_state(accelerator, resume, args.resume, checkpoints, state)
    state.skipped |= dict(dataset.skipped)  # found while listing the folder
    batches = stream_batches(train_set, cfg, accelerator, state.samples_seen)
    accelerator.print(
        f"{len(train_set)} training images ({len(held_out)} held out), "
        f"{accelerator.num_processes} process(es) on {device.type}"
    )

    def write_model(folder: Path) -> None:
        """The inference checkpoint: our single-file layout, EMA weights in the VAE, plus the run's config."""
        with ema.applied_to(vae) if ema else contextlib.nullcontext():
            save_single_file(model, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    # ------------------------------------------------------------ the loop
    accelerator.init_trackers("train_vae", config=flat_config(to_dict(cfg)))
    stop = Stop(accelerator, cfg.max_nan_skips)  # SIGTERM, Ctrl-C, too many non-finite steps
    progress = tqdm(
        total=cfg.max_steps, initial=state.step, disable=not accelerator.is_main_process, dynamic_ncols=True
    )
    window, window_images, window_start = {}, 0, time.perf_counter()
    while state.step < cfg.max_steps:
        batch = next(batches)
        state.samples_seen += cfg.batch_size * accelerator.num_processes
        state.skipped |= dict(batch["skipped"])
        x = batch["pixels"].to(device)
        # z = mean + std * noise with each sample's own noise: the same whatever the process count, and on resume
        generators = per_sample_generators(batch["seed"])
        noise = randn_like_per_sample(generators, latent_shape).to(device)
        if cfg.hue_augment:  # an angle in [0, 360) from each sample's own generator, after its noise
            x = rotate_hue(x, torch.cat([torch.rand(1, generator=g) for g in generators]).to(device) * 360)
        gan = state.step >= cfg.loss.disc_start

        with accelerator.accumulate(vae_ddp, disc_ddp):
            # generator step: encoder + decoder (+ logvar); the PatchGAN judges x̂ but is not trained here
            with accelerator.autocast():
                xrec, posterior = vae_ddp(x, noise)
                g_loss, logs = loss_fn(x, xrec, posterior, vae.decoder.conv_out.weight, lpips, disc if gan else None)
            accelerator.backward(g_loss)
            if accelerator.sync_gradients:
                if loss_fn.logvar.grad is not None:  # logvar is outside DDP: average it by hand
                    loss_fn.logvar.grad = accelerator.reduce(loss_fn.logvar.grad, "mean")
                grad_norm, skipped_step = optimizer_step(accelerator, opt_g, g_params, cfg.optim.max_grad_norm)
            # discriminator step: real images against detached reconstructions
            if gan:
                with accelerator.autocast():
                    d_loss, d_logs = discriminator_loss(disc_ddp, x, xrec, cfg.loss.disc_loss)
                accelerator.backward(d_loss)
                if accelerator.sync_gradients:
                    optimizer_step(accelerator, opt_d, disc_ddp.parameters(), cfg.optim.max_grad_norm)
                logs |= d_logs
        for name, value in logs.items():  # sums and counts: the GAN's terms join the window at disc_start
            total, count = window.get(name, (0.0, 0))
            window[name] = (total + value.item(), count + 1) if math.isfinite(value.item()) else (total, count)
        window_images += cfg.batch_size
        if not accelerator.sync_gradients:
            continue

        state.step += 1
        sched_g.step()
        if gan:  # the discriminator's schedule starts with its training
            sched_d.step()
        if ema and not skipped_step:
            ema.update(vae)
        progress.update(1)

        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            names = sorted(window)
            means = accelerator.reduce(
                torch.tensor([window[k][0] / max(window[k][1], 1) for k in names], device=device), "mean"
            )
            logs = dict(zip(names, means.tolist())) | {
                "lr": sched_g.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                "images_per_s_per_device": window_images / elapsed,
                "peak_memory_gib": peak_memory_gib(device),
            }
            accelerator.log(logs, step=state.step)
            progress.set_postfix(rec=f"{logs['rec']:.4f}", img_s=f"{logs['images_per_s_per_device']:.1f}")
            window, window_images, window_start = {}, 0, time.perf_counter()

        stopping = stop.after_step(state.step, skipped_step)
        if state.step % cfg.save_every == 0 or state.step == cfg.max_steps or stopping:
            checkpoint_run(accelerator, checkpoints, state, cfg.keep_last, write_model, progress)
        if stopping:
            del vae_ddp, disc_ddp  # before the process group goes (pytorch#56297: see ldm.training.end_training)
            return stop.end(progress)

    # ------------------------------------------------------------ the end: scale factor, evaluation, single-file model
    progress.close()  # the last step was saved above (or, resumed at max_steps, there was none to run)
    gather_skipped(state)
    if accelerator.is_main_process:
        vae.eval()
        with ema.applied_to(vae) if ema else contextlib.nullcontext(), torch.no_grad(), accelerator.autocast():
            if cfg.decoder_only:
                print(f"decoder only: the latents are init_from's, so is scale_factor {cfg.model.scale_factor:.5f}")
            else:  # CompVis' scale_by_std: SD v1's 0.18215 was measured so
                scale_images = image_batches(train_set, cfg.scale_images, cfg.batch_size)
                cfg.model.scale_factor = latent_scale_factor(
                    vae, (b.to(device) for b in scale_images), torch.Generator(device).manual_seed(cfg.seed)
                )
                print(
                    f"latent scale factor {cfg.model.scale_factor:.5f} "
                    f"(1 / std of the latents of {min(cfg.scale_images, len(train_set))} images)"
                )
            if len(held_out):
                results = evaluate(
                    vae,
                    image_batches(held_out, len(held_out), cfg.batch_size),
                    device,
                    output_dir / "reconstructions.png",
                    rfid=cfg.rfid,
                )
                (output_dir / "eval.json").write_text(json.dumps(results, indent=2))
                accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=state.step)
                log_image(accelerator, "reconstructions", Image.open(output_dir / "reconstructions.png"), state.step)
                print(f"held-out reconstructions: {json.dumps(results)}; grid in {output_dir / 'reconstructions.png'}")
        with writing(
            output_dir,
            output_dir / "model.safetensors",
            f"the last checkpoint {list_checkpoints(checkpoints)[-1]} is intact "
            f"(scale factor measured: {cfg.model.scale_factor:.5f})",
        ):
            write_model(output_dir)
        print(skipped_report(state.skipped))
        print(f"wrote {output_dir / 'model.safetensors'}")
    accelerator.wait_for_everyone()
    del vae_ddp, disc_ddp  # before the process group goes (pytorch#56297: see ldm.training.end_training)
    return stop.end(progress)


if __name__ == "__main__":
    sys.exit(main())
