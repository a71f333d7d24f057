"""Checkpoint I/O: original SD v1 single files (our own format too), and diffusers folders.

Our modules carry the CompVis names, so a single file needs no renaming beyond the text model's
`text_model.` level (transformers 5 dropped it from CLIPTextModel's state dict; SD files have it).
Our own checkpoints are single files of that layout whose safetensors metadata holds our config
under "ldm_config", so they describe themselves. The diffusers folder layout is the one real
conversion (`unet_key_map` / `vae_key_map`), written here and checked against diffusers' own converters.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.config import (
    ConfigError,
    ModelConfig,
    SamplingConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    from_dict,
    to_dict,
)
from ldm.diffusion import PARAMETERIZATION_TO_DIFFUSERS, scheduler_config
from ldm.errors import CheckpointError
from ldm.model import StableDiffusion

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


# ---------------------------------------------------------------- single files (SD v1 layout)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, or of a PyTorch checkpoint read with weights_only=True (no code
    runs). The format is told by the file's first bytes: a safetensors header (8-byte length, then JSON), a zip
    archive (torch.save) or a pickle (torch.save's legacy format)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(10)
    if path.suffix == ".safetensors" or head[8:10] == b'{"':
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"{path} is not a safetensors file, a PyTorch checkpoint or a diffusers folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = torch_reason(e)
        if "Unsupported global" in reason:  # weights_only refuses every global but tensors and plain containers
            raise CheckpointError(f"{path}: refused to load, the pickle holds more than tensors ({reason})") from None
        detail = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state dict of tensors inside")
    return state, {}


def torch_reason(e: Exception) -> str:
    """What torch.load's error says went wrong, in one line, without its advice (never: set weights_only=False)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    sentences = [s.strip() for line in text.splitlines() for s in line.split(". ") if s.strip()]
    return next((s for s in sentences if not any(w in s for w in ("weights_only", "safe_globals", "allowlist"))), "")


def config_from_metadata(metadata: dict[str, str]) -> ModelConfig | None:
    if "ldm_config" not in metadata:
        return None
    try:
        return from_dict(ModelConfig, json.loads(metadata["ldm_config"]))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"the config stored in the checkpoint is invalid: {e}") from None


def from_sd_layout(state: dict[str, torch.Tensor], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """An SD v1 file's tensors -> our state dict: drop the known extras, strip `text_model.`, take EMA if asked."""
    ours = {}
    for key, value in state.items():
        if key in SCHEDULE_KEYS or key.startswith("model_ema."):
            continue
        if key.startswith(TEXT + "text_model."):
            key = TEXT + key[len(TEXT + "text_model.") :]
        ours[key] = value
    # EMA weights are EMA copies of the UNet's tensors; the counters alone (pruned "emaonly" files) mean no EMA
    ema = [k for k in state if k.startswith("model_ema.") and k not in SCHEDULE_KEYS]
    if use_ema and ema:
        for key in [k for k in ours if k.startswith(UNET)]:
            # CompVis LitEma stores model.diffusion_model.a.b as model_ema.diffusion_modelab
            ema_key = "model_ema." + key[len("model.") :].replace(".", "")
            if ema_key not in state:
                message = f"the file holds {len(ema)} EMA tensors but not '{ema_key}': an incomplete EMA set"
                raise CheckpointError(message)
            ours[key] = state[ema_key]
    return ours


def to_sd_layout(state: dict[str, torch.Tensor], clip: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict -> the original SD v1 file layout (a CLIP text model under `text_model.`; another text
    encoder, e.g. MiniLM, keeps its own transformers names under `cond_stage_model.transformer.`)."""
    if not clip:
        return dict(state)
    return {(TEXT + "text_model." + k[len(TEXT) :] if k.startswith(TEXT) else k): v for k, v in state.items()}


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), failing with one clear line naming the first offending key.

    Float tensors of another float dtype (fp16 files) are cast; non-finite values are loaded with a warning. A model
    with weights on the meta device (StableDiffusion(cfg, empty=True)) takes the tensors of `state` as its own
    (assign): they are cast in place in `state`, one at a time, so loading never holds two copies of the weights.
    """
    expected = model.state_dict()
    assign = any(v.is_meta for v in expected.values())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing and unexpected:
        raise CheckpointError(
            f"{source} does not fit the configured architecture: "
            f"missing tensor '{missing[0]}' ({len(missing)} in all), "
            f"unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all); pass the right --config"
        )
    if missing:
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    for key, value in state.items():
        want = expected[key]
        if value.shape != want.shape:
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {tuple(value.shape)}, the model expects {tuple(want.shape)}"
            )
        if value.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{key}' has dtype {value.dtype}, the model expects {want.dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            warnings.warn(f"{source}: tensor '{key}' contains NaN or Inf values", stacklevel=2)
        if assign and value.dtype != want.dtype:
            state[key] = value.to(want.dtype)
    model.load_state_dict(state, strict=True, assign=assign)


def load_single_file(path: str | Path, cfg: ModelConfig | None = None, use_ema: bool = True) -> StableDiffusion:
    """An original SD v1 file or one of ours. cfg: the architecture; default: stored in the file, else SD v1."""
    state, metadata = read_state_dict(path)
    cfg = copy.deepcopy(cfg or config_from_metadata(metadata) or ModelConfig())
    conv_in = state.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] != cfg.unet.in_channels:
        cfg.unet.in_channels = conv_in.shape[1]  # 9 for SD 1.5-inpainting: latent + mask + masked-image latent
    model = StableDiffusion(cfg, empty=True)
    state = from_sd_layout(state, use_ema)
    if cfg.text_encoder.pretrained and not any(k.startswith(TEXT) for k in state):  # saved with text_encoder=False
        state |= {TEXT + k: v for k, v in model.cond_stage_model.transformer.state_dict().items()}
    load_state_strict(model, state, str(path))
    return model


def load_model_or_vae(path: str | Path, cfg: ModelConfig) -> StableDiffusion:
    """What load_model reads (with its own config), or a VAE-only file in CompVis names (`encoder.*`, `decoder.*`,
    `quant_conv.*`, `post_quant_conv.*`, as SD's vae-ft-mse-840000-ema-pruned; `loss.*`, `model_ema.*` ignored),
    put into a fresh model of `cfg`."""
    if not Path(path).is_dir():
        state, _ = read_state_dict(path)
        if not any(k.startswith((UNET, VAE, TEXT)) for k in state):
            model = StableDiffusion(copy.deepcopy(cfg))
            vae_state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
            load_state_strict(model.first_stage_model, vae_state, str(path))
            return model
    return load_model(path)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers never see a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); a saved model gets the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_single_file(
    model: StableDiffusion, path: str | Path, dtype: torch.dtype | None = None, text_encoder: bool = True
) -> None:
    """The original SD v1 layout with our config in the metadata (readable by every SD v1 tool).

    text_encoder=False leaves out the weights of a pretrained text encoder (`text_encoder.pretrained`), which
    loading then takes from its folder or package: 45 MB less for MiniLM in fp16.
    """
    pretrained = model.cfg.text_encoder.pretrained
    if not text_encoder and not pretrained:
        raise CheckpointError(
            "only a pretrained text encoder (text_encoder.pretrained) can be left out of a checkpoint"
        )
    state = {k: v for k, v in model.state_dict().items() if text_encoder or not k.startswith(TEXT)}
    state = to_sd_layout(state, clip=not pretrained)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_save(state, path, {"format": "pt", "ldm_config": json.dumps(to_dict(model.cfg))})


def peek_config(path: str | Path) -> ModelConfig:
    """The architecture of a checkpoint without reading its weights (for checks before loading): a safetensors
    header's `ldm_config`, a diffusers folder's configs, else SD v1's. A 9-channel inpainting UNet and a file that
    cannot be read are found by the real load."""
    path = Path(path)
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        return config_from_diffusers(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                return config_from_metadata(dict(f.metadata() or {})) or ModelConfig()
        except (SafetensorError, OSError, ValueError):
            pass
    return ModelConfig()


# ---------------------------------------------------------------- diffusers folders


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


def _vae_attn_shapes(state: dict[str, torch.Tensor], to_linear: bool) -> dict[str, torch.Tensor]:
    """The VAE's mid-block attention: 1x1 convs (CompVis) <-> linear layers (diffusers)."""
    names = (
        "attentions.0.to_q.weight",
        "attentions.0.to_k.weight",
        "attentions.0.to_v.weight",
        "attentions.0.to_out.0.weight",
    )
    fix = (lambda w: w[:, :, 0, 0]) if to_linear else (lambda w: w[:, :, None, None])
    return {k: (fix(v) if k.endswith(names) and v.ndim == (4 if to_linear else 2) else v) for k, v in state.items()}


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _heads_per_block(cfg: UNetConfig) -> list[int]:
    return [
        cfg.model_channels * m // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
        for m in cfg.channel_mult
    ]


def diffusers_configs(cfg: ModelConfig) -> dict[str, dict]:
    """config.json of unet/, vae/ and scheduler/ for a diffusers folder of this model."""
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
    }
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
    return {"unet": unet, "vae": vae, "scheduler": scheduler_config(cfg)}


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
    if u.get("use_linear_projection") or u.get("addition_embed_type") or u.get("class_embed_type"):
        raise CheckpointError(
            f"{folder}: only the SD v1 UNet layout is supported (linear projections / extra embeddings found)"
        )
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
        learn_sigma=s.get("variance_type") == "learned_range",
        sampling=from_dict(SamplingConfig, sampling, "sampling."),
    )


def load_diffusers_folder(folder: str | Path) -> StableDiffusion:
    folder = Path(folder)
    cfg = config_from_diffusers(folder)
    model = StableDiffusion(cfg)
    state = {}
    for sub, prefix, key_map in (
        ("unet", UNET, unet_key_map(cfg.unet)),
        ("vae", VAE, vae_key_map(cfg.vae)),
        ("text_encoder", TEXT, None),
    ):
        tensors = {}
        for f in sorted((folder / sub).glob("*.safetensors")) or sorted((folder / sub).glob("*.bin")):
            tensors |= read_state_dict(f)[0]
        if not tensors:
            raise CheckpointError(f"{folder / sub}: no weights (.safetensors or .bin) found")
        if sub == "text_encoder":  # folders from older transformers keep the `text_model.` level
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items() if not k.endswith("position_ids")}
        else:
            tensors = rename(_vae_attn_shapes(tensors, to_linear=False), {b: a for a, b in key_map.items()})
        state |= {prefix + k: v for k, v in tensors.items()}
    load_state_strict(model, state, str(folder))
    tokenizer_dir = folder / "tokenizer"
    if (tokenizer_dir / "vocab.json").exists():
        from transformers import CLIPTokenizer

        model.cond_stage_model.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return model


def save_diffusers_folder(model: StableDiffusion, folder: str | Path) -> None:
    """The folder that diffusers.StableDiffusionPipeline.from_pretrained loads (no safety checker), with a CLIP text
    model or a local one (MiniLM: BertModel + BertTokenizer, its padding masked as ours)."""
    folder = Path(folder)
    cfg = model.cfg
    configs = diffusers_configs(cfg)
    state = model.state_dict()
    for sub, prefix, key_map in (("unet", UNET, unet_key_map(cfg.unet)), ("vae", VAE, vae_key_map(cfg.vae))):
        tensors = _vae_attn_shapes(rename(_sub(state, prefix), key_map), to_linear=True)
        (folder / sub).mkdir(parents=True, exist_ok=True)
        atomic_save(tensors, folder / sub / "diffusion_pytorch_model.safetensors", {"format": "pt"})
        (folder / sub / "config.json").write_text(json.dumps(configs[sub], indent=2))
    text = model.cond_stage_model
    text.transformer.save_pretrained(str(folder / "text_encoder"))
    text.tokenizer.save_pretrained(str(folder / "tokenizer"))
    if cfg.text_encoder.pretrained:
        # diffusers masks the padding only when the text model's config says use_attention_mask, as FrozenHFEmbedder
        # always does; ldm_pretrained tells load_diffusers_folder which text encoder this is
        path = folder / "text_encoder" / "config.json"
        extra = {"use_attention_mask": True, "ldm_pretrained": cfg.text_encoder.pretrained}
        path.write_text(json.dumps(json.loads(path.read_text()) | extra, indent=2))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", type(text.transformer).__name__],  # CLIPTextModel, or e.g. BertModel
        "tokenizer": ["transformers", type(text.tokenizer).__name__],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / SAMPLING_FILE).write_text(json.dumps(to_dict(cfg.sampling), indent=2))


def load_model(path: str | Path, cfg: ModelConfig | None = None, use_ema: bool = True) -> StableDiffusion:
    """A single file (SD v1 or ours) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").exists() and not (path / "unet" / "config.json").exists():
            raise CheckpointError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        return load_diffusers_folder(path)
    return load_single_file(path, cfg, use_ema)
