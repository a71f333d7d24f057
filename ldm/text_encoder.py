"""The frozen CLIP text encoder of Stable Diffusion v1 and its tokenizer, built offline.

The tokenizer is transformers' `CLIPTokenizer` made from OpenAI's BPE vocabulary
(`assets/clip/bpe_simple_vocab_16e6.txt.gz`, MIT licence, Copyright (c) 2021 OpenAI, LICENSE beside it),
so nothing is fetched from a model hub. The model is transformers' `CLIPTextModel`; SD v1 conditions the
UNet on its last hidden state (after the final layer norm), 77 tokens x 768.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import warnings
from pathlib import Path

import ftfy
import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.config import TextEncoderConfig

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
def build_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer from the packaged BPE file, exactly as OpenAI's simple_tokenizer.py builds its vocab.

    The vocab is the 256 byte symbols, the same with "</w>", the 48,894 merges joined, then
    <|startoftext|> (49406) and <|endoftext|> (49407): 49,408 entries. Pads with <|endoftext|> to 77 as SD v1.
    Cached: every caller shares one instance, so don't mutate it (e.g. add tokens) in place.
    """
    lines = gzip.decompress(BPE_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        pad_token="<|endoftext|>",
        model_max_length=MAX_LENGTH,
    )


def clean_text(text: str) -> str:
    """OpenAI's clean-up before BPE: fix mojibake and curly quotes (ftfy), unescape HTML twice, lowercase.

    Lowercasing here (as OpenAI does) and not only in the Rust normalizer matters for Greek: Python
    writes a word-final sigma as "ς", the normalizer as "σ", and they are different tokens.
    """
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip().lower()


def tokenize(tokenizer: CLIPTokenizer, prompts: str | list[str]) -> torch.LongTensor:
    """Prompts -> (B, 77) token ids, truncated and padded with <|endoftext|>; warns about what is cut off."""
    texts = [clean_text(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
    for ids in tokenizer(texts, verbose=False).input_ids:
        if len(ids) > MAX_LENGTH:
            dropped = ids[MAX_LENGTH - 1 : -1]
            warnings.warn(
                f"The following part of your input was truncated because CLIP can only handle sequences up to "
                f"{MAX_LENGTH} tokens ({len(dropped)} tokens dropped): {tokenizer.decode(dropped)!r}",
                stacklevel=2,
            )
    batch = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return batch.input_ids


class FrozenCLIPEmbedder(nn.Module):
    """CLIP text transformer with frozen weights: prompts -> (B, 77, hidden_size) context for the UNet."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        # bos/eos/pad ids as in openai/clip-vit-large-patch14's config.json: eos_token_id=2 selects the
        # original pooling (argmax over ids = first <|endoftext|>); SD v1 uses no pooling anyway.
        config = CLIPTextConfig(**dataclasses.asdict(cfg), pad_token_id=1, bos_token_id=0, eos_token_id=2)
        self.transformer = CLIPTextModel(config)
        self.tokenizer = build_tokenizer()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenCLIPEmbedder:
        """Stays in eval mode whatever a parent module asks (CompVis's disabled_train)."""
        return super().train(False)

    def forward(self, tokens: torch.LongTensor) -> torch.Tensor:
        return self.transformer(input_ids=tokens).last_hidden_state

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        return self(tokenize(self.tokenizer, prompts).to(self.transformer.device))
