"""Tensor names and configs across layouts: the SD v1 single file's prefixes (CompVis names, which our modules
carry), the maps CompVis <-> diffusers (`unet_key_map` / `vae_key_map`, checked against diffusers' own converters),
and a diffusers folder's config.json files <-> ModelConfig. No model imports: LoRA and ControlNet files rename
through the same maps without sitting above the model stack.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import diffusers
import torch

from ldm.config import (
    ModelConfig,
    SamplingConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    from_dict,
)
from ldm.diffusion import PARAMETERIZATION_TO_DIFFUSERS, scheduler_config
from ldm.errors import CheckpointError
from ldm.samplers import SAMPLERS

TEXT = "cond_stage_model.transformer."
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SAMPLING_FILE = "ldm_sampling.json"  # a diffusers folder's generation defaults (ModelConfig.sampling), ours
# Keys that real SD v1 files carry beside the weights: the training schedule buffers, the EMA
# bookkeeping, the learned-logvar vector and the text model's position ids. Accepted and ignored.
SCHEDULE_KEYS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "model_ema.decay",
    "model_ema.num_updates",
    TEXT + "text_model.embeddings.position_ids",
}


def _resnet(ours: str, theirs: str, unet: bool) -> dict[str, str]:
    if not unet:  # the VAE's ResnetBlock differs only in its shortcut's name
        return {ours: theirs, f"{ours}.nin_shortcut": f"{theirs}.conv_shortcut"}
    parts = {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
    return {f"{ours}.{a}": f"{theirs}.{b}" for a, b in parts.items()}


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """Module-path prefixes, CompVis UNetModel -> diffusers UNet2DConditionModel."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    m = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
        "middle_block.1": "mid_block.attentions.0",
    }
    if cfg.time_cond_proj_dim is not None:  # LCM's guidance embedding (ldm.unet.UNetModel)
        m["time_cond_proj"] = "time_embedding.cond_proj"
    m |= _resnet("middle_block.0", "mid_block.resnets.0", True) | _resnet("middle_block.2", "mid_block.resnets.1", True)
    for i in range(levels):
        for j in range(n):
            block = 1 + i * (n + 1) + j
            m |= _resnet(f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}", True)
            if 2**i in cfg.attention_resolutions:
                m[f"input_blocks.{block}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i != levels - 1:
            m[f"input_blocks.{(i + 1) * (n + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    for u in range(levels):  # up block u works at the resolution of down level levels-1-u
        has_attn = 2 ** (levels - 1 - u) in cfg.attention_resolutions
        for j in range(n + 1):
            block = u * (n + 1) + j
            m |= _resnet(f"output_blocks.{block}.0", f"up_blocks.{u}.resnets.{j}", True)
            if has_attn:
                m[f"output_blocks.{block}.1"] = f"up_blocks.{u}.attentions.{j}"
        if u != levels - 1:
            m[f"output_blocks.{block}.{2 if has_attn else 1}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"
    return m


def vae_key_map(cfg: VAEConfig) -> dict[str, str]:
    """Module-path prefixes, CompVis AutoencoderKL -> diffusers AutoencoderKL."""
    levels = len(cfg.ch_mult)
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        m |= {
            f"{part}.conv_in": f"{part}.conv_in",
            f"{part}.conv_out": f"{part}.conv_out",
            f"{part}.norm_out": f"{part}.conv_norm_out",
            f"{part}.mid.attn_1.norm": f"{part}.mid_block.attentions.0.group_norm",
            f"{part}.mid.attn_1.proj_out": f"{part}.mid_block.attentions.0.to_out.0",
        }
        m |= {f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.to_{a}" for a in "qkv"}
        m |= _resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
        m |= _resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            m |= _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", False)
        for j in range(cfg.num_res_blocks + 1):
            m |= _resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{levels - 1 - i}.resnets.{j}", False)
        if i != levels - 1:
            m[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        if i != 0:
            m[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.conv"
    return m


def rename(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename each key by the longest module-path prefix found in key_map; unmapped keys are an error."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in key_map:
                out[".".join([key_map[prefix], *parts[cut:]])] = value
                break
        else:
            raise CheckpointError(f"no diffusers name for tensor '{key}'")
    return out


def vae_attn_shapes(state: dict[str, torch.Tensor], to_linear: bool) -> dict[str, torch.Tensor]:
    """The VAE's mid-block attention: 1x1 convs (CompVis) <-> linear layers (diffusers)."""
    names = (
        "attentions.0.to_q.weight",
        "attentions.0.to_k.weight",
        "attentions.0.to_v.weight",
        "attentions.0.to_out.0.weight",
    )
    fix = (lambda w: w[:, :, 0, 0]) if to_linear else (lambda w: w[:, :, None, None])
    return {k: (fix(v) if k.endswith(names) and v.ndim == (4 if to_linear else 2) else v) for k, v in state.items()}


def _heads_per_block(cfg: UNetConfig) -> list[int]:
    return [
        cfg.model_channels * m // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
        for m in cfg.channel_mult
    ]


def diffusers_configs(cfg: ModelConfig) -> dict[str, dict]:
    """config.json of unet/, vae/ and scheduler/ for a diffusers folder of this model. The scheduler is the model's
    own sampler (cfg.sampling.sampler, its class and options as ldm.samplers makes it), so a pipeline loaded from the
    folder samples as txt2img.py does; diffusers' own default steps and guidance are SD v1's (diffusers_readme)."""
    u, v = cfg.unet, cfg.vae
    if v.attn_resolutions:
        raise CheckpointError(
            "diffusers' AutoencoderKL has no attention in its resolution levels: vae.attn_resolutions must be []"
        )
    cross = [2**i in u.attention_resolutions for i in range(len(u.channel_mult))]
    heads = _heads_per_block(u)
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": cfg.image_size,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        "block_out_channels": [u.model_channels * m for m in u.channel_mult],
        "layers_per_block": u.num_res_blocks,
        "cross_attention_dim": u.context_dim,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,  # diffusers' name for the head count
        "transformer_layers_per_block": u.transformer_depth,
        "norm_num_groups": u.num_groups,
        "use_linear_projection": u.use_linear_in_transformer,
        "upcast_attention": u.upcast_attention,
    }
    if u.time_cond_proj_dim is not None:
        unet["time_cond_proj_dim"] = u.time_cond_proj_dim
    vae = {
        "_class_name": "AutoencoderKL",
        "sample_size": v.resolution,
        "in_channels": v.in_channels,
        "out_channels": v.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult),
        "block_out_channels": [v.ch * m for m in v.ch_mult],
        "latent_channels": v.embed_dim,
        "layers_per_block": v.num_res_blocks,
        "norm_num_groups": v.num_groups,
        "scaling_factor": cfg.scale_factor,
    }
    cls, options, _ = SAMPLERS[cfg.sampling.sampler]
    scheduler = scheduler_config(cfg) | {"_class_name": cls.__name__} | options
    return {"unet": unet, "vae": vae, "scheduler": scheduler}


def diffusers_readme(cfg: ModelConfig, name: str) -> str:
    """The README.md of an exported diffusers folder: diffusers' pipelines default to 50 steps at guidance 7.5 (SD
    v1's), which draws garbage with a model tuned for others, so it names the steps and guidance to pass."""
    s = cfg.sampling
    sampler_class = SAMPLERS[s.sampler][0].__name__
    version = "2.x" if cfg.text_encoder.open_clip else "v1"
    return f"""# {name}

A Stable Diffusion {version} model that ldm exported as a diffusers folder. Its `scheduler/` is the model's own sampler
({s.sampler}: diffusers' {sampler_class}); pass its steps and guidance, not diffusers' defaults (50 steps, 7.5):

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{name}")
image = pipe("a red apple", num_inference_steps={s.steps}, guidance_scale={s.scale}).images[0]
```

The same settings are in `{SAMPLING_FILE}` (sampler, steps, scale), which ldm reads back.
"""


def timestep_spacing(scheduler: dict) -> str:
    """A scheduler config's timestep_spacing where it differs from its class's default (SD-Turbo's Euler "trailing"),
    else "": SD's folders (PNDM or DDIM "leading", their default) leave each sampler its own, and a zero-terminal-SNR
    schedule implies "trailing" (ldm.diffusion.scheduler_config)."""
    cls = getattr(diffusers, scheduler.get("_class_name", ""), None)
    default = inspect.signature(cls.__init__).parameters.get("timestep_spacing") if cls else None
    spacing = scheduler.get("timestep_spacing", "")
    implied = default is None or spacing == default.default or scheduler.get("rescale_betas_zero_snr")
    return "" if implied else spacing


def config_from_diffusers(folder: Path) -> ModelConfig:
    """Our ModelConfig from a diffusers folder's unet/, vae/, text_encoder/ and scheduler/ config.json files."""

    def read(name):
        path = folder / name
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None

    u, v, t = read("unet/config.json"), read("vae/config.json"), read("text_encoder/config.json")
    s = read("scheduler/scheduler_config.json") if (folder / "scheduler/scheduler_config.json").exists() else {}
    if u.get("addition_embed_type") or u.get("class_embed_type"):
        raise CheckpointError(f"{folder}: only the SD v1 / v2 UNet layout is supported (extra embeddings found)")
    widths = u["block_out_channels"]
    mc = widths[0]
    heads = u.get("attention_head_dim", 8)
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    head_kw = {"num_heads": heads[0]} if len(set(heads)) == 1 else {"num_head_channels": widths[0] // heads[0]}
    depth = u.get("transformer_layers_per_block", 1)
    unet = UNetConfig(
        in_channels=u["in_channels"],
        out_channels=u["out_channels"],
        model_channels=mc,
        attention_resolutions=tuple(2**i for i, b in enumerate(u["down_block_types"]) if b.startswith("CrossAttn")),
        num_res_blocks=u["layers_per_block"],
        channel_mult=tuple(w // mc for w in widths),
        transformer_depth=depth if isinstance(depth, int) else depth[0],
        context_dim=u["cross_attention_dim"],
        num_groups=u.get("norm_num_groups", 32),
        use_linear_in_transformer=u.get("use_linear_projection", False),
        upcast_attention=u.get("upcast_attention", False),
        time_cond_proj_dim=u.get("time_cond_proj_dim"),
        **head_kw,
    )
    vae = VAEConfig(
        embed_dim=v["latent_channels"],
        z_channels=v["latent_channels"],
        resolution=v.get("sample_size", 256),
        in_channels=v["in_channels"],
        out_ch=v["out_channels"],
        ch=v["block_out_channels"][0],
        ch_mult=tuple(w // v["block_out_channels"][0] for w in v["block_out_channels"]),
        num_res_blocks=v["layers_per_block"],
        num_groups=v.get("norm_num_groups", 32),
    )
    if t.get("model_type", "clip_text_model") == "clip_text_model":
        text = TextEncoderConfig(**{k: t[k] for k in TextEncoderConfig.__dataclass_fields__ if k in t})
    elif "ldm_pretrained" in t:  # a local text encoder (e.g. MiniLM) of a folder that save_diffusers_folder wrote
        text = TextEncoderConfig(pretrained=t["ldm_pretrained"])
    else:
        raise CheckpointError(f"{folder}: a {t['model_type']} text encoder; ldm reads CLIP and the ones it exported")
    prediction = {b: a for a, b in PARAMETERIZATION_TO_DIFFUSERS.items()}[s.get("prediction_type", "epsilon")]
    # our generation defaults, beside diffusers' files (which have no place for them); SD's without the file
    sampling = read(SAMPLING_FILE) if (folder / SAMPLING_FILE).exists() else {}
    return ModelConfig(
        unet=unet,
        vae=vae,
        text_encoder=text,
        timesteps=s.get("num_train_timesteps", 1000),
        beta_schedule=s.get("beta_schedule", "scaled_linear"),
        linear_start=s.get("beta_start", 0.00085),
        linear_end=s.get("beta_end", 0.012),
        parameterization=prediction,
        scale_factor=v.get("scaling_factor", 0.18215),
        image_size=u.get("sample_size", 64),
        rescale_betas_zero_snr=s.get("rescale_betas_zero_snr", False),
        timestep_spacing=timestep_spacing(s),
        learn_sigma=s.get("variance_type") == "learned_range",
        sampling=from_dict(SamplingConfig, sampling, "sampling."),
    )
