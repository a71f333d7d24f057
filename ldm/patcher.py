"""The LoRAs and textual-inversion embeddings of a model as data, applied and removed from backups (in the style of
ComfyUI's ModelPatcher).

`Patcher(model).apply(loras, embeddings)` makes the model equal to the model it was given plus exactly that set:
- a LoRA (ldm.lora, W' = W + weight * alpha / rank * up @ down) is merged into the weights it changes, each backed up
  before its first change; another set puts the backups back, bit for bit, and merges its own files;
- an embedding's tokens (ldm.embeddings) are added to a copy of the model's own tokenizer and its vectors to new rows
  of the text model's token-embedding table; another set starts again from the tokenizer and rows the model had.
Applying the set that is applied does nothing, and a file is read once while it is among the last FILES_KEPT files
read (kept per path, modification time and size: a run that switches between a few LoRAs reads each once, a web
session that tries many keeps only the recent ones in memory). `version` changes exactly when the applied set does:
caches of prompt contexts and converted graphs (ldm.openvino) key on it.

`quantize_int8` makes the UNet's Linear layers dynamic int8 and keeps their float weights (1.0 GiB for SD v1's 270M
Linear weights): a LoRA is merged into those and the layer quantized again, the same as quantizing the merged float
model.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

from ldm.checkpoint import TEXT, UNET, CheckpointError
from ldm.embeddings import embedding_tokens, read_embedding
from ldm.lora import read_lora
from ldm.model import StableDiffusion

FILES_KEPT = 16  # what the patcher keeps of the files it read (an SD LoRA's plan: ~10-150 MB)


class LoraPatch(NamedTuple):
    """A LoRA file merged at `weight`, the text encoder's layers at `te_weight`."""

    file: Path
    weight: float
    te_weight: float


class EmbeddingPatch(NamedTuple):
    """A textual-inversion file whose trigger word is `token` (None: the file's own)."""

    file: Path
    token: str | None


def quantize_int8_(unet: nn.Module) -> None:
    """PyTorch's dynamic int8 quantization of the UNet's Linear layers, in place (CPU, fp32, inference only): int8
    weights with one scale per tensor, activations quantized at each call from their own range. Conv2d stays fp32:
    torch.ao's dynamic conv is off by ~50% on the post-SiLU (non-negative) inputs of the ResBlock convs
    (pytorch/pytorch#70480; left out of its default mapping for that reason)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that eager-mode quantization moves to torchao
        quantize_dynamic(unet, {nn.Linear}, dtype=torch.qint8, inplace=True)


class Patcher:
    """The set of LoRAs and embeddings applied to a StableDiffusion model (module docstring)."""

    def __init__(self, model: StableDiffusion):
        self.model = model
        self.loras: tuple[LoraPatch, ...] = ()
        self.embeddings: tuple[EmbeddingPatch, ...] = ()
        self.tokens: tuple[list[str], ...] = ()  # each embedding's tokens, as its trigger word and word_1, word_2...
        self.version = 0
        self.backups: dict[str, torch.Tensor] = {}  # state-dict key -> the weight before the LoRAs changed it
        self.floats: dict[str, torch.Tensor] = {}  # state-dict key -> the float weight of an int8 Linear layer
        self.files: OrderedDict[tuple, object] = OrderedDict()  # (reader, args, path, mtime, size) -> what it made
        self.tokenizer = model.text_encoder.tokenizer
        self.rows = model.text_encoder.transformer.get_input_embeddings().weight.shape[0]

    def read(self, path: Path, reader: Callable, *args) -> object:
        """reader(path, *args), once per version of the file (its absolute path, modification time and size) for the
        same reader and (hashable) args while it is among the FILES_KEPT most recently used."""
        path = Path(path).absolute()
        try:
            stat = path.stat()
        except OSError:
            raise CheckpointError(f"file not found: {path}") from None
        key = (reader, args, path, stat.st_mtime_ns, stat.st_size)
        if key not in self.files:
            self.files[key] = reader(path, *args)
        self.files.move_to_end(key)
        while len(self.files) > FILES_KEPT:
            self.files.popitem(last=False)
        return self.files[key]

    def apply(self, loras=(), embeddings=()) -> None:
        """Make the model its own weights plus exactly these LoRAs (objects with .file .weight .te_weight; te_weight
        None: weight) and embeddings (.file .token; token None: the file's own word). Every file is read and checked
        first (CheckpointError naming it): a bad one changes nothing."""
        loras = tuple(
            LoraPatch(Path(x.file).absolute(), float(x.weight), float(x.weight if x.te_weight is None else x.te_weight))
            for x in loras
        )
        embeddings = tuple(EmbeddingPatch(Path(x.file).absolute(), x.token) for x in embeddings)
        if (loras, embeddings) == (self.loras, self.embeddings):
            return
        plans = [self.read(lora.file, read_lora, self.model) for lora in loras]
        vectors = [self.read(e.file, read_embedding) for e in embeddings]
        vocab, width, tokens = set(self.tokenizer.get_vocab()), self.model.text_encoder.hidden_size, []
        for e, (word, v) in zip(embeddings, vectors):
            tokens.append(embedding_tokens(e.file, e.token or word, v, vocab, width))
            vocab.update(tokens[-1])
        if loras != self.loras:
            self.merge(loras, plans)
        if embeddings != self.embeddings:
            self.add_tokens(tokens, [v for _, v in vectors])
        self.loras, self.embeddings, self.tokens = loras, embeddings, tuple(tokens)
        self.version += 1

    def weight(self, key: str) -> torch.Tensor:
        """The float weight of a layer by its state-dict key (an int8 layer's kept float weight)."""
        return self.floats[key] if key in self.floats else self.model.get_parameter(key)

    @torch.no_grad()
    def merge(self, loras: tuple[LoraPatch, ...], plans: list) -> None:
        """The backed-up weights put back, then W += weight * alpha / rank * up @ down for each layer of each LoRA
        (read_lora's plans); the int8 layers changed are quantized again."""
        changed = set(self.backups)
        for key, backup in self.backups.items():
            self.weight(key).copy_(backup)
        self.backups = {}
        for lora, plan in zip(loras, plans):
            for key, up, down, scale in plan:
                w = self.weight(key)
                self.backups.setdefault(key, w.detach().clone())
                delta = up.to(w.device, torch.float32).flatten(1) @ down.to(w.device, torch.float32).flatten(1)
                layer_weight = lora.te_weight if key.startswith(TEXT) else lora.weight
                w += (layer_weight * scale * delta).reshape(w.shape).to(w.dtype)
        for key in (changed | set(self.backups)) & set(self.floats):
            self.requantize(key)

    def add_tokens(self, tokens: list[list[str]], vectors: list[torch.Tensor]) -> None:
        """The model's own tokenizer and token-embedding rows, then (on a copy of the tokenizer) the embeddings'
        tokens and vectors as new rows."""
        text = self.model.text_encoder
        text.tokenizer = self.tokenizer
        if tokens:
            text.tokenizer = copy.deepcopy(self.tokenizer)
            text.tokenizer.add_tokens([t for ts in tokens for t in ts])
        text.transformer.resize_token_embeddings(len(text.tokenizer) if tokens else self.rows, mean_resizing=False)
        table = text.transformer.get_input_embeddings().weight
        table.requires_grad_(False)
        with torch.no_grad():
            for ts, v in zip(tokens, vectors):
                table[text.tokenizer.convert_tokens_to_ids(ts)] = v.to(table)

    def quantize_int8(self) -> None:
        """quantize_int8_ on the model's UNet, keeping the float weight of each Linear layer for LoRAs to merge into."""
        unet = self.model.unet
        self.floats |= {
            f"{UNET}{n}.weight": m.weight.detach() for n, m in unet.named_modules() if isinstance(m, nn.Linear)
        }
        quantize_int8_(unet)

    def requantize(self, key: str) -> None:
        """The int8 weight of a quantized Linear layer from its float weight, as quantize_dynamic makes it (one scale
        per tensor, symmetric: default_dynamic_qconfig)."""
        layer = self.model.get_submodule(key.removesuffix(".weight"))
        w = self.floats[key].float()
        observer = default_dynamic_qconfig.weight()
        observer(w)
        scale, zero_point = observer.calculate_qparams()
        layer.set_weight_bias(torch.quantize_per_tensor(w, float(scale), int(zero_point), torch.qint8), layer.bias())
