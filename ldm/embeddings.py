"""Textual-inversion embeddings (Gal et al. 2022): new words whose token vectors were learned for a frozen text encoder.

Files read: AUTOMATIC1111 `.pt` (`string_to_param`, read with weights_only) and `.safetensors` (one tensor, or kohya's
`emb_params`), whose trigger word is the file's stem, and diffusers' `learned_embeds.safetensors` (`{token: tensor}`),
whose trigger word is its key; a token given by the caller overrides both. An n-vector embedding becomes the tokens
`tok`, `tok_1`, ... `tok_{n-1}` and the word `tok` in a prompt stands for all of them, as in diffusers (so a prompt
gives diffusers' token ids).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import torch

from ldm.errors import CheckpointError
from ldm.io import read_state_dict
from ldm.text_encoder import FrozenTextEncoder


def read_embedding(path: str | Path) -> tuple[str, torch.Tensor]:
    """(trigger word, (n, d) vectors) of an embedding file."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        data, _ = read_state_dict(path)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused to load, the pickle holds more than tensors ({str(e).splitlines()[0]})"
            ) from None
        except Exception as e:
            raise CheckpointError(
                f"{path} is not an embedding file: {type(e).__name__}: {str(e).splitlines()[0]}"
            ) from None
    word = path.stem
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # A1111 .pt
        data = data["string_to_param"]
    elif isinstance(data, dict) and "emb_params" in data:  # kohya / A1111 .safetensors
        data = {word: data["emb_params"]}
    if not isinstance(data, dict) or len(data) != 1 or not isinstance(next(iter(data.values())), torch.Tensor):
        raise CheckpointError(
            f"{path}: not a textual-inversion embedding (one tensor: string_to_param, emb_params or {{token: tensor}})"
        )
    key, vectors = next(iter(data.items()))
    if not isinstance(key, str) or key == "*":  # A1111's placeholder string: the trigger word is the file name
        key = word
    return key, vectors.reshape(-1, vectors.shape[-1])


def add_embedding_(text_encoder: FrozenTextEncoder, path: str | Path, token: str | None = None) -> list[str]:
    """Give the text encoder the embedding's tokens, in place; returns them. The text encoder gets its own copy of
    its tokenizer first (build_tokenizer's instance is shared), and its token-embedding table grows by n rows."""
    word, vectors = read_embedding(path)
    word = token or word
    tokens = [word] + [f"{word}_{i}" for i in range(1, len(vectors))]
    width = text_encoder.transformer.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        raise CheckpointError(
            f"{path}: a {vectors.shape[1]}-d embedding, but this model's text encoder takes {width}-d token vectors"
        )
    tokenizer = copy.deepcopy(text_encoder.tokenizer)
    known = [t for t in tokens if t in tokenizer.get_vocab()]
    if known:
        raise CheckpointError(f"{path}: the token '{known[0]}' is already in the vocabulary (give another: FILE:TOKEN)")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.transformer.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.transformer.get_input_embeddings().weight
    table.requires_grad_(False)
    with torch.no_grad():
        table[ids] = vectors.to(table)
    text_encoder.tokenizer = tokenizer
    return tokens
