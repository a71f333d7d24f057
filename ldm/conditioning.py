"""Prompts -> the UNet's text context: each prompt read by ldm.prompts (A1111's syntax or plain, chunks of 75
tokens), encoded by the text encoder, cached, and stacked into one batch with the negative prompt's in front.

The context is asked for per step (`Conditioning.context(step)`): A1111's prompt editing and alternation
(ldm.prompts.schedule, in the prompts and the negative prompt) change it between steps, and AND splits a prompt into
sub-prompts with weights, one row of the context each, which ldm.denoiser combines. Each distinct text is encoded once
(the cache); a prompt without that syntax gives one context for every step, as it always did. The cache keys on the
weights' version (the LoRAs and embeddings merged: a new version when they change), so a change of text-encoder
weights never serves a stale context and nothing clears it by hand.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ldm.prompts import SYNTAX_NAMES, prompt_contexts, schedule, subprompts
from ldm.request import InputError

EMBEDDING_CACHE = 32  # prompts whose text-encoder states a Conditioner keeps


class Conditioning:
    """The text contexts of one sub-batch over the steps: schedule = [(last step, context)], step i taking the first
    entry whose last step is >= i. A context is (n, 77 k, d), or (2n, 77 k, d) with the negative prompt's half in front
    when guided. weights (AND): None, or each image's sub-prompt weights; the context then holds the negative
    prompt's n rows, then a row per sub-prompt, image by image."""

    def __init__(
        self,
        schedule: list[tuple[int, torch.Tensor]],
        guided: bool,
        weights: list[list[float]] | None = None,
    ):
        self.schedule, self.guided, self.weights = schedule, guided, weights

    def context(self, step: int) -> torch.Tensor:
        """The context of step `step` (0-based); past the last entry, the first (A1111's reconstruct_cond_batch)."""
        return next((context for end, context in self.schedule if step <= end), self.schedule[0][1])


class Conditioner:
    """A text encoder with a cache of the states of the last EMBEDDING_CACHE prompts (keyed on prompt, syntax, clip
    skip, device, dtype and the weights' version)."""

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __call__(
        self,
        prompts: list[str],
        negative_prompt: str,
        guided: bool,
        prompt_syntax: str = "a1111",
        clip_skip: int = 1,
        version: int = 0,
        *,
        steps: int,
        first_pass: int | None = None,
    ) -> Conditioning:
        """The contexts of a prompt per image over `steps` steps, which the denoiser's calls count from 0 (A1111's
        total_steps: the request's steps, twice that for a second-order sampler; img2img runs the last of them but
        counts from 0 too; first_pass: the first pass's, for a hires fix's second pass, ldm.prompts.edit_step).
        Syntax "a1111":
        each prompt split at AND (ldm.prompts.subprompts; the negative prompt is not, as in A1111), each text and the
        negative prompt scheduled (ldm.prompts.schedule), and a context per distinct set of texts; AND needs the
        negative prompt's prediction, so it is guided at any scale. Syntax "plain": one context, every character
        literal."""
        if prompt_syntax != "a1111":
            context = self.encode_prompts(prompts, negative_prompt, guided, prompt_syntax, clip_skip, version)
            return Conditioning([(steps, context)], guided)
        parts = [subprompts(p) for p in prompts]
        weights = [[weight for _, weight in part] for part in parts]
        composed = any(w != [1.0] for w in weights)
        guided = guided or composed
        schedules = [schedule(text, steps, first_pass) for part in parts for text, _ in part]
        schedules += [schedule(negative_prompt, steps, first_pass)] if guided else []
        texts = sum(len(part) for part in parts)  # the sub-prompts' schedules, before the negative prompt's
        contexts: dict[tuple[str, ...], torch.Tensor] = {}
        picked = []
        for end in sorted({end for entries in schedules for end, _ in entries}):
            at = tuple(next(text for last, text in entries if end <= last) for entries in schedules)
            if at not in contexts:
                negative = at[-1] if guided else ""
                context = self.encode_prompts(list(at[:texts]), negative, guided, prompt_syntax, clip_skip, version)
                # the negative prompt's row for each image, then each sub-prompt's
                contexts[at] = torch.cat([context[: len(prompts)], context[texts:]]) if composed else context
            picked.append((end, contexts[at]))
        return Conditioning(picked, guided, weights if composed else None)

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
