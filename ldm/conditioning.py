"""Prompts -> the UNet's text context: each prompt read by ldm.prompts (A1111's syntax or plain, chunks of 75
tokens), encoded by the text encoder, cached, and stacked into one batch with the negative prompt's in front.

The context is asked for per step (`Conditioning.context(step)`), so a prompt schedule can change it mid-run; today
every step sees the same one. The cache keys on the weights' version (the LoRAs and embeddings merged: a new version
when they change), so a change of text-encoder weights never serves a stale context and nothing clears it by hand.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ldm.prompts import SYNTAX_NAMES, prompt_contexts
from ldm.request import InputError

EMBEDDING_CACHE = 32  # prompts whose text-encoder states a Conditioner keeps


class Conditioning:
    """The text context of one sub-batch: (n, 77 k, d), or (2n, 77 k, d) with the negative prompt's half in front
    when guided."""

    def __init__(self, context: torch.Tensor, guided: bool):
        self.tensor, self.guided = context, guided

    def context(self, step: int) -> torch.Tensor:
        """The context of step `step` (0-based): the same for every step."""
        return self.tensor


class Conditioner:
    """A text encoder with a cache of the states of the last EMBEDDING_CACHE prompts (keyed on prompt, syntax, clip
    skip, device, dtype and the weights' version)."""

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __call__(self, prompts, negative_prompt, guided, prompt_syntax="a1111", clip_skip=1, version=0) -> Conditioning:
        return Conditioning(
            self.encode_prompts(prompts, negative_prompt, guided, prompt_syntax, clip_skip, version), guided
        )

    def encode_prompts(
        self,
        prompts: list[str],
        negative_prompt: str,
        guided: bool,
        prompt_syntax: str = "a1111",
        clip_skip: int = 1,
        version: int = 0,
    ) -> torch.Tensor:
        """Text context for the UNet, a prompt per image: (n, 77 k, d); the negative prompt's in front when guided.
        Contexts of fewer chunks than the longest get the empty prompt's chunk appended (A1111's pad_cond_uncond), so
        guidance stays one batched UNet call."""
        if prompt_syntax not in SYNTAX_NAMES:
            raise InputError(f"unknown prompt syntax '{prompt_syntax}' (known: {', '.join(SYNTAX_NAMES)})")
        layers = self.text_encoder.num_layers
        if not 1 <= clip_skip <= layers:
            raise InputError(f"clip skip must be from 1 to {layers} (the text encoder's layers), got {clip_skip}")
        states = self.embed(prompts, prompt_syntax, clip_skip, version)
        states += self.embed([negative_prompt], prompt_syntax, clip_skip, version) if guided else []
        length = max(len(s) for s in states)
        if any(len(s) < length for s in states):
            empty = self.embed([""], prompt_syntax, clip_skip, version)[0]
            states = [torch.cat([s, empty.repeat((length - len(s)) // len(empty), 1)]) for s in states]
        cond = torch.stack(states[: len(prompts)])
        if not guided:
            return cond
        return torch.cat([states[-1].expand_as(cond), cond])

    def embed(
        self, prompts: list[str], prompt_syntax: str = "a1111", clip_skip: int = 1, version: int = 0
    ) -> list[torch.Tensor]:
        """Each prompt's context (77 k, d) by ldm.prompts.prompt_contexts; uncached ones are encoded as one batch."""
        weight = next(self.text_encoder.parameters())
        keys = [(p, prompt_syntax, clip_skip, weight.device, weight.dtype, version) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            contexts = prompt_contexts(self.text_encoder, [k[0] for k in missing], prompt_syntax, clip_skip)
            self.cache.update(zip(missing, contexts))
        for k in keys:
            self.cache.move_to_end(k)
        states = [self.cache[k] for k in keys]
        while len(self.cache) > EMBEDDING_CACHE:
            self.cache.popitem(last=False)
        return states
