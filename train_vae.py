r"""Train the KL autoencoder of ldm (SD v1's VAE) from scratch, or fine-tune one, on 1..N devices.

    python train_vae.py --config configs/train-vae-tiny.yaml data.path=my_images [--lpips-weights vgg16.pth vgg.pth]
    accelerate launch --num_processes 8 train_vae.py --config my.yaml [--resume latest] [--decoder-only] \
        [key.path=value ...]

Top to bottom: config -> the run (ldm.training.Run: output_dir, Accelerator) -> data, minus a held-out split -> models
(the VAE, a PatchGAN, the frozen LPIPS) -> two optimizers, EMA, resume -> the loop (generator step; from loss.disc_start
on, a discriminator step too; the run does EMA, logging, checkpoints) -> the latent scale factor, 1 / std of the latents
(kept from init_from with --decoder-only, so an existing UNet still fits) -> evaluation on the held-out images (PSNR,
SSIM, rFID, a grid) -> <output_dir>/model.safetensors: a whole StableDiffusion single file (the UNet and text encoder of
init_from, else fresh ones of the config) with the new VAE and scale factor: train_unet.py init_from=... and txt2img.py
read it as is. A fine-tune (init_from) stopped by Ctrl-C or SIGTERM writes that file too, with the weights of the step
it stopped at and init_from's scale factor (measured only at the end).

--tiny distils madebyollin's TAESD decoder (ldm.taesd) from the model's frozen VAE decoder instead, into
<output_dir>/taesd_decoder.safetensors for txt2img.py --taesd (with --tiny-encoder, its encoder from the VAE's
encoder too: taesd_encoder.safetensors beside it, for --taesd-encode). Any VAE: TAESD gets one 2x stage per 2x of the
VAE (three for SD's 8x, two for the embedded emoji model's 4x).
"""

import argparse
import json
import sys
from pathlib import Path

from ldm.cli import ArgumentParser
from ldm.cli import run as exit_code


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
        "--tiny",
        action="store_true",
        help="distil a TAESD decoder (madebyollin's tiny one) from the model's VAE decoder: taesd_decoder.safetensors",
    )
    p.add_argument(
        "--tiny-encoder",
        action="store_true",
        help="with --tiny: distil a TAESD encoder too (taesd_encoder.safetensors)",
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
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import load_model_or_vae
from ldm.config import ConfigError, TrainVAEConfig
from ldm.data import ImageCaptionDataset, holdout_split, rotate_hue
from ldm.eval_vae import evaluate, image_batches
from ldm.io import atomic_save, load_state_strict
from ldm.losses import GeneratorLoss, NLayerDiscriminator, discriminator_loss, load_lpips
from ldm.model import StableDiffusion
from ldm.run_files import list_checkpoints, read_train_config
from ldm.taesd import TAESD, tiny_decoder, tiny_encoder
from ldm.training import Run, Trainable, per_sample_generators, randn_like_per_sample
from ldm.vae import latent_scale_factor


def load_train_config(args) -> tuple[TrainVAEConfig, StableDiffusion | None]:
    """Defaults <- YAML <- flags <- overrides (see ldm.run_files.read_train_config)."""
    flags = ["decoder_only=true"] if args.decoder_only else []
    flags += ["tiny=true"] if args.tiny else []
    flags += ["tiny_encoder=true"] if args.tiny_encoder else []
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
    return exit_code(lambda: train(args))


def train(args) -> int:
    # ------------------------------------------------------------ config, run (output_dir, Accelerator), models
    cfg, init = load_train_config(args)
    check_sizes(cfg)
    run = Run(cfg, "train_vae", args.resume, fine_tune=bool(cfg.init_from), shown="loss" if cfg.tiny else "rec")
    device = run.device
    dataset = ImageCaptionDataset(
        cfg.data.path,
        cfg.data.resolution,
        cfg.data.center_crop,
        cfg.data.random_flip,
        cfg.data.image_column,
        cfg.data.caption_column,
        require_captions=False,
    )
    model = StableDiffusion(cfg.model)
    if init is not None:
        load_state_strict(model, init.state_dict(), cfg.init_from)
        del init
    train_set, held_out = holdout_split(dataset, cfg.holdout, cfg.seed)
    if cfg.tiny:
        return distil_tiny(run, model, train_set, len(held_out))
    vae = model.vae.to(device).train()
    if cfg.decoder_only:  # the encoder, hence the latents an existing UNet was trained on, stays as it is
        vae.encoder.requires_grad_(False), vae.quant_conv.requires_grad_(False)
    lpips = load_lpips(cfg.lpips_weights).to(device) if cfg.lpips_weights and cfg.loss.perceptual_weight > 0 else None
    if lpips is None and cfg.loss.perceptual_weight > 0:
        run.accelerator.print(
            "no LPIPS weights given (--lpips-weights vgg16.pth vgg.pth): training WITHOUT the perceptual term"
        )
    loss_fn = GeneratorLoss(cfg.loss).to(device)
    disc = NLayerDiscriminator(cfg.model.vae.out_ch, cfg.loss.disc_ndf, cfg.loss.disc_num_layers).to(device)
    latent_shape = cfg.model.vae.latent_shape(cfg.data.resolution, cfg.data.resolution)

    # ------------------------------------------------------------ what trains: the VAE (+ logvar), the PatchGAN
    g_params = [p for p in vae.parameters() if p.requires_grad] + ([loss_fn.logvar] if cfg.loss.learn_logvar else [])
    autoencoder, discriminator = Trainable(model, vae, g_params), Trainable(None, disc)
    run.prepare(autoencoder, discriminator, extra_state=(loss_fn,))

    # ------------------------------------------------------------ the loop
    for batch in run.batches(train_set, note=f" ({len(held_out)} held out)"):
        x = batch["pixels"].to(device)
        # z = mean + std * noise with each sample's own noise: the same whatever the process count, and on resume
        generators = per_sample_generators(batch["seed"])
        noise = randn_like_per_sample(generators, latent_shape).to(device)
        if cfg.hue_augment:  # an angle in [0, 360) from each sample's own generator, after its noise
            x = rotate_hue(x, torch.cat([torch.rand(1, generator=g) for g in generators]).to(device) * 360)
        gan = run.state.step >= cfg.loss.disc_start

        with run.accumulate():
            # generator step: encoder + decoder (+ logvar); the PatchGAN judges x̂ but is not trained here
            with run.accelerator.autocast():
                xrec, posterior = autoencoder(x, noise)
                g_loss, logs = loss_fn(x, xrec, posterior, vae.decoder.conv_out.weight, lpips, disc if gan else None)
            run.step(g_loss, logs)
            # discriminator step: real images against detached reconstructions (its LR schedule starts with it)
            if gan:
                with run.accelerator.autocast():
                    d_loss, d_logs = discriminator_loss(discriminator, x, xrec, cfg.loss.disc_loss)
                run.step(d_loss, d_logs, part=1)

    # ------------------------------------------------------------ the end: scale factor, evaluation, single-file model
    def finish() -> str:
        """After the last step, on the main process, from the EMA weights: the scale factor, the held-out evaluation.
        -> what stays intact if writing the model fails."""
        vae.eval()
        with run.ema_weights(), torch.no_grad(), run.accelerator.autocast():
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
                grid = run.output_dir / "reconstructions.png"
                results = evaluate(
                    vae, image_batches(held_out, len(held_out), cfg.batch_size), device, grid, rfid=cfg.rfid
                )
                (run.output_dir / "eval.json").write_text(json.dumps(results, indent=2))
                run.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=run.state.step)
                run.log_image("reconstructions", Image.open(grid))
                print(f"held-out reconstructions: {json.dumps(results)}; grid in {grid}")
        return (
            f"the last checkpoint {list_checkpoints(run.checkpoints)[-1]} is intact "
            f"(scale factor measured: {cfg.model.scale_factor:.5f})"
        )

    return run.end(finish)


class TinyAutoencoder(Trainable):
    """madebyollin's TAESD (ldm.taesd.TAESD: its decoder, and with --tiny-encoder its encoder) learning the model's
    frozen VAE; saved as his taesd_decoder.safetensors (and taesd_encoder.safetensors beside it), which --taesd and
    ldm.taesd.load_taesd read."""

    what, file = "TAESD decoder", "taesd_decoder.safetensors"

    def save(self, path: Path, step: int) -> None:
        nets = {path: self.module.decoder, path.with_name("taesd_encoder.safetensors"): self.module.encoder}
        for file, net in nets.items():
            if net is not None:
                atomic_save(net.state_dict(), file, {"step": str(step)})


def distil_tiny(run: Run, model: StableDiffusion, train_set, held_out: int) -> int:
    """--tiny: z_0 = scale_factor * z, z ~ q(z | x) a posterior sample of the teacher's encoder (the UNet's latents,
    what TAESD decodes); loss = MSE(TAESD(z_0), clamp(D(z_0 / scale_factor) / 2 + 1/2, 0, 1)). madebyollin distils
    TAESD's decoder from the SD VAE's decoder on the same latents; his adversarial term is left out: the plain MSE
    to the teacher's image is the whole objective here. --tiny-encoder adds MSE(E_tiny(x / 2 + 1/2), scale_factor *
    mean of q(z | x)): TAESD encodes deterministically, so it learns the posterior's mean."""
    device, cfg = run.device, run.cfg
    model.vae.to(device).eval().requires_grad_(False)
    channels, stages = cfg.model.vae.embed_dim, len(cfg.model.vae.ch_mult) - 1  # one TAESD stage per 2x of the VAE
    encoder = tiny_encoder(channels, stages).to(device).train() if cfg.tiny_encoder else None
    taesd = TAESD(tiny_decoder(channels, stages).to(device).train(), encoder, "taesd")
    run.prepare(TinyAutoencoder(None, taesd, nets=[taesd.decoder] + ([encoder] if encoder else [])))
    latent_shape = cfg.model.vae.latent_shape(cfg.data.resolution, cfg.data.resolution)
    for batch in run.batches(train_set, note=f" ({held_out} held out)"):
        x = batch["pixels"].to(device)
        noise = randn_like_per_sample(per_sample_generators(batch["seed"]), latent_shape).to(device)
        with torch.no_grad(), run.accelerator.autocast():
            posterior = model.vae.encode(x)
            z0 = model.get_first_stage_encoding(posterior.mean + posterior.std * noise)
            target = (model.decode_first_stage(z0) / 2 + 0.5).clamp(0, 1)
        with run.accumulate():
            with run.accelerator.autocast():
                loss = dec = F.mse_loss(run.trained(z0), target)
                logs = {"dec": dec}
                if encoder is not None:
                    enc = F.mse_loss(run.trained.ddp[1](x / 2 + 0.5), model.get_first_stage_encoding(posterior.mean))
                    loss, logs = dec + enc, logs | {"enc": enc}
            run.step(loss, {"loss": loss} | logs)
    return run.end()


if __name__ == "__main__":
    sys.exit(main())
