"""LoRA files read for a model, which ldm.patcher merges: kohya / AUTOMATIC1111 (diffusers or CompVis names),
diffusers / PEFT; and the LoRA layers train_unet.py trains.

A LoRA (Hu et al. 2021, eq. 3) adds a low-rank update to the weight of a Linear or Conv2d layer:

    W' = W + weight * alpha / rank * up @ down         down: (rank, in[, k, k]), up: (out, rank[, 1, 1])

For a kxk conv (LoCon) `down` is a kxk conv with the layer's stride and padding and `up` a 1x1 conv, so the update
is (up.flatten(1) @ down.flatten(1)).reshape(W.shape). A missing alpha means alpha = rank (a PEFT adapter's: the
alpha its config gives).

Layer names in the files, all resolved against the model itself as AUTOMATIC1111 does (a table of every layer's name
with '.' written '_', so kohya's underscores are never guessed at):
    kohya / A1111    lora_unet_<diffusers or CompVis path>.{lora_down,lora_up}.weight, .alpha;
                     lora_te_text_model_<text model path>...; an OpenCLIP text encoder (SD 2.x) also under
                     kohya's CompVis names lora_te_model_transformer_resblocks_N_{attn_q_proj,...,mlp_c_fc,mlp_c_proj}
    diffusers / PEFT unet.<diffusers path>.{lora_A,lora_B}.weight (or .lora.down / .lora.up), .alpha;
                     text_encoder.[text_model.]<text model path>...
    PEFT adapter     base_model.model.<diffusers path>.{lora_A,lora_B}.weight (PEFT's save_pretrained of a UNet, e.g.
                     an LCM-LoRA), alphas in the adapter_config.json beside it (lora_alpha, alpha_pattern, use_rslora)
                     or, for diffusers' files, in their `lora_adapter_metadata` (save_lora_weights)
The UNet's diffusers names come from ldm.diffusers_names' one diffusers <-> CompVis mapping (unet_key_map).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPTextModel

from ldm.config import ConfigError, LoRAConfig, UNetConfig
from ldm.diffusers_names import TEXT, UNET, rename, unet_key_map
from ldm.errors import CheckpointError
from ldm.io import atomic_save, read_state_dict
from ldm.model import StableDiffusion
from ldm.openclip_names import openclip_module

PARTS = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".alpha": "alpha",
}
UNSUPPORTED = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "dora_scale": "DoRA",
    "lora_mid": "LoCon with a Tucker core (lora_mid)",
}
PREFIXES = {
    "lora_unet_": "unet_",
    "lora_te_": "te_",
    "unet.": "unet_",
    "text_encoder.": "te_",
    "base_model.model.": "unet_",
}
# the layers a LoRA changes: Linear and Conv2d, and Linear layers quantized to int8 (merged into their float weights)
INT8_LINEAR = torch.ao.nn.quantized.dynamic.Linear
LAYERS = (nn.Linear, nn.Conv2d, INT8_LINEAR)


def diffusers_layer_names(unet: nn.Module, cfg: UNetConfig) -> dict[str, str]:
    """{CompVis module path: diffusers module path} of every layer of the UNet a LoRA may change (LAYERS)."""
    layers = [n for n, m in unet.named_modules() if isinstance(m, LAYERS)]
    return {
        ours: theirs.removesuffix(".weight")
        for theirs, ours in rename({f"{n}.weight": n for n in layers}, unet_key_map(cfg)).items()
    }


def layer_table(model: StableDiffusion) -> dict[str, str]:
    """{layer name with '.' written '_', under each name a file may use: state-dict key of its weight}, for every
    Linear and Conv2d of the UNet (`unet_` + diffusers or CompVis path) and of the text model (`te_` + its path,
    with or without transformers 4's `text_model.` level, or OpenCLIP's `model.transformer.resblocks.N...`)."""
    table = {}
    for ours, theirs in diffusers_layer_names(model.unet, model.cfg.unet).items():
        for name in (theirs, ours):
            table["unet_" + name.replace(".", "_")] = f"{UNET}{ours}.weight"
    for n, m in model.text_encoder.transformer.named_modules():
        if isinstance(m, LAYERS):
            openclip = model.cfg.text_encoder.open_clip and openclip_module(n)
            for name in (n, "text_model." + n, *(["model." + openclip] if openclip else [])):
                table["te_" + name.replace(".", "_")] = f"{TEXT}{n}.weight"
    return table


def weight_shape(model: StableDiffusion, key: str) -> torch.Size:
    """The shape of the weight of a layer LAYERS lists, by state-dict key (an int8 Linear's weight is a method)."""
    layer = model.get_submodule(key.removesuffix(".weight"))
    return layer.weight().shape if isinstance(layer, INT8_LINEAR) else layer.weight.shape


def peft_scale(config: dict, layer: str, rank: int) -> float:
    """alpha / rank of a layer of a PEFT adapter as PEFT's LoraLayer scales it: the alpha of the first alpha_pattern
    entry that ends its module path (peft.utils.other.get_pattern_key), else lora_alpha, else the rank; over the
    square root of the rank with use_rslora."""
    patterns = config.get("alpha_pattern") or {}
    pattern = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", layer)), None)
    alpha = patterns[pattern] if pattern else config.get("lora_alpha", rank)
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def json_fields(text: str, source: Path) -> dict:
    """A JSON object's fields, or CheckpointError naming where the text came from."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: not a PEFT LoRA config ({e})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{source}: not a PEFT LoRA config (a JSON {type(fields).__name__}, not an object)")
    return fields


def peft_configs(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """{key prefix: PEFT LoraConfig fields} of a LoRA file: the adapter_config.json beside it (PEFT's save_pretrained,
    for base_model.model. keys) and diffusers' `lora_adapter_metadata` (save_lora_weights: fields under `unet.` and
    `text_encoder.`)."""
    configs, config_file = {}, path.parent / "adapter_config.json"
    if config_file.is_file():
        configs["base_model.model."] = json_fields(config_file.read_text(errors="replace"), config_file)
    packed = metadata.get("lora_adapter_metadata")
    for key, value in (json_fields(packed, path) if packed else {}).items():
        prefix, _, field = key.partition(".")
        configs.setdefault(prefix + ".", {})[field] = value
    return configs


def read_lora(path: Path, model: StableDiffusion) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """A LoRA file as [(state-dict key of the weight it changes, up, down, alpha / rank)], every layer checked against
    the model (CheckpointError naming the type, key or shapes otherwise): nothing is applied from a bad file."""
    state, metadata = read_state_dict(path)
    configs = peft_configs(Path(path), metadata)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        kind = next((kind for marker, kind in UNSUPPORTED.items() if marker in key), None)
        if kind is not None:
            raise CheckpointError(
                f"{path}: '{key}' is a {kind} tensor, a LyCORIS type ldm does not read (plain LoRA and LoCon only)"
            )
        part = next((p for p in PARTS if key.endswith(p)), None)
        if part is None:
            raise CheckpointError(
                f"{path}: '{key}' is not a LoRA tensor (lora_down / lora_up / lora_A / lora_B / alpha)"
            )
        layers.setdefault(key[: -len(part)], {})[PARTS[part]] = value
    if not layers:
        raise CheckpointError(f"{path}: no LoRA tensors inside")
    table, plan, unmatched = layer_table(model), [], []
    for layer, parts in layers.items():
        if "down" not in parts or "up" not in parts:
            raise CheckpointError(f"{path}: layer '{layer}' has no {'down' if 'down' not in parts else 'up'} weight")
        prefix = next((p for p in PREFIXES if layer.startswith(p)), None)
        target = prefix and table.get(PREFIXES[prefix] + layer[len(prefix) :].replace(".", "_"))
        if target is None:
            unmatched.append(layer)
            continue
        up, down, shape = parts["up"], parts["down"], weight_shape(model, target)
        rank = down.shape[0]
        fits = up.ndim >= 2 and up.shape[0] == shape[0] and up[0].numel() == rank and down.ndim >= 2
        if not (fits and down.shape[1] == shape[1] and down[0].numel() == shape[1:].numel()):
            raise CheckpointError(
                f"{path}: layer '{layer}' is up {tuple(up.shape)} x down {tuple(down.shape)}, "
                f"but the model's weight is {tuple(shape)} (a LoRA for another architecture?)"
            )
        config = configs.get(prefix, {})
        scale = float(parts["alpha"]) / rank if "alpha" in parts else peft_scale(config, layer[len(prefix) :], rank)
        plan.append((target, up, down, scale))
    if unmatched:
        key = next(k for k in state if k.startswith(unmatched[0] + "."))
        raise CheckpointError(f"{path}: '{key}' matches no layer of this model ({len(unmatched)} layers unmatched)")
    return plan


def a1111_hash(path: str | Path, addnet: bool = False) -> str:
    """AUTOMATIC1111's short hash of a LoRA or embedding file: the first 12 hex digits of its SHA-256; addnet (what
    A1111 uses for a .safetensors LoRA): of the tensor data only, after the safetensors header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if addnet:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()[:12]


class LoRA(nn.Module):
    """The trainable update beside a frozen Linear or Conv2d layer, added to its output by a forward hook:
    y = W x + alpha / rank * up(down(x)), `down` with the layer's kernel, stride and padding, `up` zero at the start
    (Hu et al. 2021, eq. 3) so training begins from the base model."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.zeros_(self.up.weight)
        self.alpha, self.scale = alpha, alpha / rank
        layer.register_forward_hook(lambda _, inputs, output: output + self.scale * self.up(self.down(inputs[0])))


# The text encoder's attention projections: CLIP's (q/k/v/out_proj) and BERT's (MiniLM: query/key/value and the
# attention's output dense layer), by the end of their module path
TEXT_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)


def add_lora(model: StableDiffusion, cfg: LoRAConfig) -> nn.ModuleDict:
    """A LoRA on every UNet layer whose module path ends with one of cfg.targets and, with cfg.text_encoder, on the
    text encoder's attention projections (TEXT_TARGETS), each registered as its layer's child `lora` (so DDP and
    checkpoints see it); the base weights are frozen. -> the LoRAs by their kohya layer name, what EMA, the optimizer
    and save_lora work on: `lora_unet_` + diffusers path, `lora_te_` + text model path, both with '_' for '.'
    (CLIP's path as kohya and diffusers write it, with transformers 4's `text_model.` level)."""
    model.unet.requires_grad_(False)
    diffusers_names, found = diffusers_layer_names(model.unet, model.cfg.unet), {}
    for target in cfg.targets:
        names = [n for n in diffusers_names if n == target or n.endswith("." + target)]
        if not names:
            raise ConfigError(f"lora.targets: {target!r} is the end of no Linear or Conv2d layer path of the UNet")
        found |= {"lora_unet_" + diffusers_names[n].replace(".", "_"): model.unet.get_submodule(n) for n in names}
    if cfg.text_encoder:
        text = model.text_encoder.transformer
        names = [n for n, m in text.named_modules() if isinstance(m, nn.Linear) and n.endswith(TEXT_TARGETS)]
        if not names:
            raise ConfigError(f"lora.text_encoder: {type(text).__name__} has no attention projection ldm knows")
        prefix = "lora_te_text_model_" if isinstance(text, CLIPTextModel) else "lora_te_"
        found |= {prefix + n.replace(".", "_"): text.get_submodule(n) for n in names}
    layers = nn.ModuleDict()
    for name, layer in found.items():
        layer.lora = layers[name] = LoRA(layer, cfg.rank, cfg.alpha or cfg.rank)
    return layers


def save_lora(layers: nn.ModuleDict, path: str | Path, title: str, steps: int) -> None:
    """add_lora's LoRAs as a kohya file (<name>.lora_down.weight, .lora_up.weight, .alpha) with kohya's `ss_*` and
    Stability's `modelspec.*` metadata, which AUTOMATIC1111, ComfyUI and diffusers read."""
    tensors, first = {}, next(iter(layers.values()))
    for name, lora in layers.items():
        tensors[f"{name}.lora_down.weight"] = lora.down.weight.detach().float().contiguous()
        tensors[f"{name}.lora_up.weight"] = lora.up.weight.detach().float().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(lora.alpha))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(first.down.weight.shape[0]),
        "ss_network_alpha": str(first.alpha),
        "ss_base_model_version": "sd_v1",
        "ss_steps": str(steps),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
    }
    atomic_save(tensors, path, metadata)
