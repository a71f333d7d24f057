"""Textual-inversion embeddings (Gal et al. 2022): new words whose token vectors were learned for a frozen text encoder.

Files read: AUTOMATIC1111 `.pt` (`string_to_param`, read with weights_only) and `.safetensors` (one tensor, or kohya's
`emb_params`), whose trigger word is the file's stem, and diffusers' `learned_embeds.safetensors` (`{token: tensor}`),
whose trigger word is its key; a token given by the caller overrides both. An n-vector embedding becomes the tokens
`tok`, `tok_1`, ... `tok_{n-1}` and the word `tok` in a prompt stands for all of them, as in diffusers (so a prompt
gives diffusers' token ids). ldm.patcher adds them to the model's text encoder and removes them again.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ldm.errors import CheckpointError
from ldm.io import read_state_dict


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


def embedding_tokens(path: Path, word: str, vectors: torch.Tensor, vocab: set[str], width: int) -> list[str]:
    """The tokens of an embedding file's (n, d) vectors: `word`, `word_1`... `word_{n-1}`; CheckpointError when d is
    not the text encoder's width or a token is in the vocabulary already."""
    tokens = [word] + [f"{word}_{i}" for i in range(1, len(vectors))]
    if vectors.shape[1] != width:
        raise CheckpointError(
            f"{path}: a {vectors.shape[1]}-d embedding, but this model's text encoder takes {width}-d token vectors"
        )
    known = [t for t in tokens if t in vocab]
    if known:
        raise CheckpointError(f"{path}: the token '{known[0]}' is already in the vocabulary (give another: FILE:TOKEN)")
    return tokens
