"""Checkpoint formats: original SD v1 single files (our own format too), and diffusers folders, loaded and saved.

Our modules carry the CompVis names, so a single file needs no renaming beyond the text model's
`text_model.` level (transformers 5 dropped it from CLIPTextModel's state dict; SD files have it).
Our own checkpoints are single files of that layout whose safetensors metadata holds our config
under "ldm_config", so they describe themselves. The diffusers folder layout is the one real
conversion, through ldm.diffusers_names' key maps; the files themselves are read and written by ldm.io.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError, safe_open
from transformers import CLIPTokenizer

from ldm.config import ConfigError, ModelConfig, from_dict, to_dict
from ldm.diffusers_names import (
    SAMPLING_FILE,
    SCHEDULE_KEYS,
    TEXT,
    UNET,
    VAE,
    config_from_diffusers,
    diffusers_configs,
    diffusers_readme,
    rename,
    unet_key_map,
    vae_attn_shapes,
    vae_key_map,
)
from ldm.errors import CheckpointError
from ldm.io import atomic_save, load_state_strict, read_state_dict
from ldm.model import StableDiffusion

# ---------------------------------------------------------------- single files (SD v1 layout)


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


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


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
            tensors = rename(vae_attn_shapes(tensors, to_linear=False), {b: a for a, b in key_map.items()})
        state |= {prefix + k: v for k, v in tensors.items()}
    load_state_strict(model, state, str(folder))
    tokenizer_dir = folder / "tokenizer"  # a CLIP tokenizer's own: SD 2.x's pads with "!" where SD v1's pads with EOS
    if not cfg.text_encoder.pretrained and any((tokenizer_dir / n).exists() for n in ("vocab.json", "tokenizer.json")):
        model.cond_stage_model.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return model


def save_diffusers_folder(model: StableDiffusion, folder: str | Path) -> None:
    """The folder that diffusers.StableDiffusionPipeline.from_pretrained loads (no safety checker), with a CLIP text
    model or a local one (MiniLM: BertModel + BertTokenizer, its padding masked as ours), the model's own sampler as
    its scheduler, and a README.md naming the steps and guidance to pass."""
    folder = Path(folder)
    cfg = model.cfg
    configs = diffusers_configs(cfg)
    state = model.state_dict()
    for sub, prefix, key_map in (("unet", UNET, unet_key_map(cfg.unet)), ("vae", VAE, vae_key_map(cfg.vae))):
        tensors = vae_attn_shapes(rename(_sub(state, prefix), key_map), to_linear=True)
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
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],  # the model's sampler
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / SAMPLING_FILE).write_text(json.dumps(to_dict(cfg.sampling), indent=2))
    (folder / "README.md").write_text(diffusers_readme(cfg, folder.name))


def load_model(path: str | Path, cfg: ModelConfig | None = None, use_ema: bool = True) -> StableDiffusion:
    """A single file (SD v1 or ours) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").exists() and not (path / "unet" / "config.json").exists():
            raise CheckpointError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        return load_diffusers_folder(path)
    return load_single_file(path, cfg, use_ema)
