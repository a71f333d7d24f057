"""Checkpoint formats: original SD v1 / v2 single files (our own format too), and diffusers folders, loaded and saved.

Our modules carry the CompVis names, so a single file needs no renaming beyond the text model's
`text_model.` level (transformers 5 dropped it from CLIPTextModel's state dict; SD files have it), or, for SD 2.x,
OpenCLIP's names of its text tower (ldm.openclip_names). Our own checkpoints are single files of that layout whose
safetensors metadata holds our config under "ldm_config", so they describe themselves. Other files are recognised
by their tensors (`file_config`): OpenCLIP's text tower or a 1024-wide context is SD 2.x, 9 input channels an
inpainting UNet; whether an SD 2.x UNet predicts v or eps, which no tensor says, comes from the first of: the config
stored in the file, a `.yaml` beside it (AUTOMATIC1111's convention), the config given (--config), AUTOMATIC1111's
check of the UNet itself. The diffusers folder layout is the one real conversion, through ldm.diffusers_names' key
maps; the files themselves are read and written by ldm.io.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError, safe_open

from ldm.config import ConfigError, ModelConfig, from_dict, load_yaml, sd2_config, to_dict
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
from ldm.openclip_names import OPENCLIP, from_openclip_layout, is_openclip_folder, to_openclip_layout
from ldm.text_encoder import load_tokenizer
from ldm.unet import UNetModel

# ---------------------------------------------------------------- single files (SD v1 layout)


def config_from_metadata(metadata: dict[str, str]) -> ModelConfig | None:
    if "ldm_config" not in metadata:
        return None
    try:
        return from_dict(ModelConfig, json.loads(metadata["ldm_config"]))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"the config stored in the checkpoint is invalid: {e}") from None


def from_sd_layout(
    state: dict[str, torch.Tensor], use_ema: bool = False, text_layers: int = 0
) -> dict[str, torch.Tensor]:
    """An SD file's tensors -> our state dict: drop the known extras, strip `text_model.` (SD v1) or rename OpenCLIP's
    text tower to a `text_layers`-layer CLIPTextModel's names (SD 2.x), take EMA if asked."""
    if any(k.startswith(OPENCLIP) for k in state):
        state = from_openclip_layout(state, text_layers)
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


def to_sd_layout(state: dict[str, torch.Tensor], clip: bool = True, open_clip: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict -> the original SD file layout: a CLIP text model under `text_model.` (SD v1), OpenCLIP's text
    tower under its own names (open_clip: SD 2.x); another text encoder, e.g. MiniLM, keeps its own transformers names
    under `cond_stage_model.transformer.`."""
    if open_clip:
        return to_openclip_layout(state)
    if not clip:
        return dict(state)
    return {(TEXT + "text_model." + k[len(TEXT) :] if k.startswith(TEXT) else k): v for k, v in state.items()}


def is_sd2(shapes: dict[str, tuple[int, ...]]) -> bool:
    """SD 2.x by its tensors' names and shapes: OpenCLIP's text tower, or a UNet attending to 1024-wide context."""
    to_k = shapes.get(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", ())
    return any(k.startswith(OPENCLIP) for k in shapes) or to_k[-1:] == (1024,)


def sidecar_prediction(path: Path) -> str | None:
    """The prediction a `.yaml` beside a single file names (AUTOMATIC1111's convention: Stability's config, e.g.
    v2-inference-v.yaml with `model.params.parameterization: "v"`; eps where it names none); None without one."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    params = load_yaml(sidecar).get("model", {})
    params = params.get("params", {}) if isinstance(params, dict) else {}
    prediction = params.get("parameterization", "eps") if isinstance(params, dict) else "eps"
    if prediction not in ("eps", "v", "x0"):
        raise CheckpointError(f"{sidecar}: model.params.parameterization must be eps, v or x0, got {prediction!r}")
    return prediction


def file_config(
    path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], cfg: ModelConfig | None
) -> tuple[ModelConfig, str | None]:
    """A single file's architecture and prediction, and the rule that decided the prediction; None: an SD 2.x file
    that nothing describes, whose UNet must be asked (v_prediction_check). The architecture: `cfg` (--config), else
    the config stored in the file, else detected from the tensors (SD 2.x or v1, the input channels of its UNet);
    the prediction: the stored config, a `.yaml` beside the file, `cfg`, else eps for SD v1."""
    stored = config_from_metadata(metadata)
    sd2 = stored is None and cfg is None and is_sd2(shapes)
    out = copy.deepcopy(cfg or stored or (sd2_config() if sd2 else ModelConfig()))
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight", ())
    if len(conv_in) == 4:
        out.unet.in_channels = conv_in[1]  # 9 for the inpainting models: latent + mask + masked-image latent
    cond_proj = shapes.get(UNET + "time_cond_proj.weight", ())
    out.unet.time_cond_proj_dim = cond_proj[1] if len(cond_proj) == 2 else None  # an LCM's guidance embedding
    sidecar = sidecar_prediction(path)
    if stored is not None:
        prediction, rule = stored.parameterization, "the config stored in the file"
    elif sidecar is not None:
        prediction, rule = sidecar, f"{path.with_suffix('.yaml').name} beside the file"
    elif cfg is not None:
        prediction, rule = cfg.parameterization, "the config given"
    elif sd2:
        return out, None
    else:
        prediction, rule = "eps", "an SD v1 file"
    set_prediction(out, prediction, detected=sd2)
    return out, rule


def set_prediction(cfg: ModelConfig, prediction: str, detected: bool) -> None:
    """cfg predicts `prediction`; a detected SD 2.x v-model is the 768-v one: 768x768 images (96x96 latents)."""
    cfg.parameterization = prediction
    if detected and prediction == "v":
        cfg.image_size = 96


@torch.no_grad()
def v_prediction_check(unet: UNetModel) -> bool:
    """AUTOMATIC1111's test of an SD 2.x UNet (is_using_v_parameterization_for_sd2): at t = 999 on latents x = 0.5
    with a context of 0.5, the output of a v-model (v = sqrt(a) eps - sqrt(1 - a) x0, about -x0 there) lies far below
    x where an eps-model's does not: v if mean(out - x) < -1."""
    p = next(unet.parameters())
    x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    context = torch.full((1, 2, unet.cfg.context_dim), 0.5, dtype=p.dtype, device=p.device)
    return (unet(x, torch.tensor([999], device=p.device), context) - 0.5).float().mean().item() < -1


def load_single_file(path: str | Path, cfg: ModelConfig | None = None, use_ema: bool = True) -> StableDiffusion:
    """An original SD v1 / v2 file or one of ours; `file_config` says which model it is. cfg: the architecture (and
    prediction, unless the file or a `.yaml` beside it says)."""
    path = Path(path)
    state, metadata = read_state_dict(path)
    cfg, rule = file_config(path, {k: tuple(v.shape) for k, v in state.items()}, metadata, cfg)
    model = StableDiffusion(cfg, empty=True)
    state = from_sd_layout(state, use_ema, cfg.text_encoder.num_hidden_layers)
    if cfg.text_encoder.pretrained and not any(k.startswith(TEXT) for k in state):  # saved with text_encoder=False
        state |= {TEXT + k: v for k, v in model.cond_stage_model.transformer.state_dict().items()}
    load_state_strict(model, state, str(path))
    if rule is None:
        set_prediction(cfg, "v" if v_prediction_check(model.unet) else "eps", detected=True)
        rule = "AUTOMATIC1111's check of the UNet at t = 999"
    if cfg.text_encoder.open_clip or rule.endswith("beside the file"):
        kind = {"eps": "an epsilon", "v": "a v-prediction", "x0": "an x0"}[cfg.parameterization]
        print(f"note: {path.name}: {kind} model ({rule})", file=sys.stderr)
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
    state = to_sd_layout(state, clip=not pretrained, open_clip=model.cfg.text_encoder.open_clip)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_save(state, path, {"format": "pt", "ldm_config": json.dumps(to_dict(model.cfg))})


def peek_config(path: str | Path) -> ModelConfig:
    """The architecture of a checkpoint without reading its weights (for checks before loading): a diffusers folder's
    configs, what `file_config` makes of a safetensors header (an SD 2.x file that nothing describes is loaded: only
    its UNet tells v from eps, and so 768 from 512 pixels), else SD v1's. A file that cannot be read is found by the
    real load."""
    path = Path(path)
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        return folder_config(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError):
            return ModelConfig()
        cfg, rule = file_config(path, shapes, metadata, None)
        return cfg if rule is not None else load_single_file(path).cfg
    return ModelConfig()


# ---------------------------------------------------------------- diffusers folders


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def folder_config(folder: Path) -> ModelConfig:
    """A diffusers folder's ModelConfig; its text model is OpenCLIP's (SD 2.x) when its tokenizer pads with "!"."""
    cfg = config_from_diffusers(folder)
    cfg.text_encoder.open_clip = is_openclip_folder(folder)
    return cfg


def load_diffusers_folder(folder: str | Path) -> StableDiffusion:
    folder = Path(folder)
    cfg = folder_config(folder)
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
    tokenizer_dir = folder / "tokenizer"  # a CLIP tokenizer's own vocab (with added words), padding as ours
    if not cfg.text_encoder.pretrained and any((tokenizer_dir / n).exists() for n in ("vocab.json", "tokenizer.json")):
        model.cond_stage_model.tokenizer = load_tokenizer(tokenizer_dir, cfg.text_encoder.open_clip)
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
