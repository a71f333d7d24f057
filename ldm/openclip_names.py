"""OpenCLIP's text-tower names (SD 2.x single files) <-> transformers' CLIPTextModel names, which ours carry.

SD 2.x files hold OpenCLIP ViT-H/14's text tower (open_clip's `CLIP` with its image tower deleted: Stability's
FrozenOpenCLIPEmbedder) under `cond_stage_model.model.`; its blocks are pre-LN transformer blocks as CLIP's, with
exact GELU ("gelu"; OpenAI's CLIP has quick_gelu). Names and ViT-H shapes, OpenCLIP -> transformers:

    token_embedding.weight               (49408, 1024)  embeddings.token_embedding.weight
    positional_embedding                 (77, 1024)     embeddings.position_embedding.weight
    transformer.resblocks.N.ln_1.*       (1024,)        encoder.layers.N.layer_norm1.*
    transformer.resblocks.N.attn.in_proj_weight (3072, 1024), in_proj_bias (3072,)
                                                        encoder.layers.N.self_attn.{q,k,v}_proj.{weight,bias}:
                                                        nn.MultiheadAttention packs q, k, v in that order
    transformer.resblocks.N.attn.out_proj.*             encoder.layers.N.self_attn.out_proj.*
    transformer.resblocks.N.ln_2.*                      encoder.layers.N.layer_norm2.*
    transformer.resblocks.N.mlp.c_fc.*   (4096, 1024)   encoder.layers.N.mlp.fc1.*
    transformer.resblocks.N.mlp.c_proj.* (1024, 4096)   encoder.layers.N.mlp.fc2.*
    ln_final.*                           (1024,)        final_layer_norm.*
    text_projection                      (1024, 1024)   text_projection.weight, transposed (x @ P vs nn.Linear)
    logit_scale                          ()             logit_scale

SD 2 conditions the UNet on the penultimate block's output after ln_final (FrozenOpenCLIPEmbedder(layer=
"penultimate")), so ldm's text model holds 23 of the 24 blocks, as diffusers' SD 2 folders do, and takes its last
hidden state. `from_openclip_layout` drops what conditioning never reads: the file's last block, the projection and
the logit scale (CLIP's contrastive head). `to_openclip_layout` writes the blocks the model has, as diffusers' own
converter does: every reader builds ViT-H's 24 blocks and stops at the penultimate one, so it never reads the last.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ldm.diffusers_names import TEXT
from ldm.errors import CheckpointError

OPENCLIP = "cond_stage_model.model."  # the text tower's prefix in SD 2.x single files
UNUSED = ("text_projection.weight", "logit_scale")  # CLIP's contrastive head: no part of the UNet's conditioning
TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
}
BLOCK = {  # module paths inside block N: OpenCLIP -> transformers
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
TO_BLOCK = {hf: oc for oc, hf in BLOCK.items()}
OPENCLIP_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")
HF_BLOCK_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def from_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower tensors (keys without the file's prefix) -> transformers' CLIPTextModel names (the module
    docstring's table), every block kept; CheckpointError names a tensor that is not part of the tower."""
    out = {}
    for key, value in state.items():
        m = OPENCLIP_BLOCK_KEY.fullmatch(key)
        if m is None and key in TOP:
            out[TOP[key]] = value.T.contiguous() if key == "text_projection" else value
        elif m is not None and m[2] == "attn.in_proj":
            for name, part in zip(QKV, value.chunk(3)):
                out[f"encoder.layers.{m[1]}.{name}.{m[3]}"] = part.clone()  # own storage: files refuse shared tensors
        elif m is not None and m[2] in BLOCK:
            out[f"encoder.layers.{m[1]}.{BLOCK[m[2]]}.{m[3]}"] = value
        else:
            raise CheckpointError(f"'{OPENCLIP}{key}' is not a tensor of OpenCLIP's text tower")
    return out


def to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of from_openclip: transformers' CLIPTextModel names (with or without `text_projection.weight` and
    `logit_scale`; transformers' `embeddings.position_ids` buffer dropped) -> OpenCLIP's."""
    top = {hf: oc for oc, hf in TOP.items()}
    out = {}
    for key, value in state.items():
        m = HF_BLOCK_KEY.fullmatch(key)
        if key.endswith("position_ids"):
            continue
        if m is None and key in top:
            out[top[key]] = value.T.contiguous() if key == "text_projection.weight" else value
        elif m is not None and m[2] == QKV[0]:
            parts = [state[f"encoder.layers.{m[1]}.{name}.{m[3]}"] for name in QKV]
            out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(parts)
        elif m is not None and m[2] in TO_BLOCK:
            out[f"transformer.resblocks.{m[1]}.{TO_BLOCK[m[2]]}.{m[3]}"] = value
        elif m is None or m[2] not in QKV:
            raise CheckpointError(f"'{key}' is not a tensor of a CLIP text model")
    return out


def from_openclip_layout(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A single file's tensors with OpenCLIP's text tower (`cond_stage_model.model.*`) -> the same with our text model's
    (`cond_stage_model.transformer.*`) for a text model of `num_layers` layers: the file's unused last block (number
    `num_layers`, when the file has it), text_projection and logit_scale dropped; other keys as they are."""
    tower = from_openclip({k[len(OPENCLIP) :]: v for k, v in state.items() if k.startswith(OPENCLIP)})
    unused = f"encoder.layers.{num_layers}."
    ours = {TEXT + k: v for k, v in tower.items() if k not in UNUSED and not k.startswith(unused)}
    return {k: v for k, v in state.items() if not k.startswith(OPENCLIP)} | ours


def to_openclip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the SD 2.x single-file layout: the text model's tensors (`cond_stage_model.transformer.*`)
    under OpenCLIP's names and prefix (`cond_stage_model.model.*`); other keys as they are."""
    tower = to_openclip({k[len(TEXT) :]: v for k, v in state.items() if k.startswith(TEXT)})
    return {k: v for k, v in state.items() if not k.startswith(TEXT)} | {OPENCLIP + k: v for k, v in tower.items()}


def openclip_module(path: str) -> str | None:
    """A text-model module path in transformers' names -> OpenCLIP's (`encoder.layers.3.mlp.fc1` ->
    `transformer.resblocks.3.mlp.c_fc`; q/k/v_proj -> `attn.q_proj` ..., the slices of in_proj that AUTOMATIC1111's
    LoRA names use); None for a module outside the blocks."""
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", path)
    if m is None:
        return None
    name = TO_BLOCK.get(m[2]) or (m[2].replace("self_attn.", "attn.") if m[2] in QKV else None)
    return name and f"transformer.resblocks.{m[1]}.{name}"


def is_openclip_folder(folder: str | Path) -> bool:
    """Whether a diffusers folder's tokenizer pads with "!" (id 0), as OpenCLIP's (SD 2.x) does: its
    tokenizer/tokenizer_config.json or special_tokens_map.json says pad_token "!"."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(folder) / "tokenizer" / name
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            if pad is not None:
                return (pad["content"] if isinstance(pad, dict) else pad) == "!"
    return False
