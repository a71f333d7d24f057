"""Prompts as AUTOMATIC1111's web UI reads them: emphasis weights, BREAK, and prompts longer than 77 tokens.

The behaviour (not the code) is AUTOMATIC1111's stable-diffusion-webui: `parse_prompt_attention` in
modules/prompt_parser.py, `tokenize_line` and `process_tokens` in modules/sd_hijack_clip.py, `EmphasisOriginal` in
modules/sd_emphasis.py. The text encoder stays a model (ldm.text_encoder); this module turns prompts into its inputs
and weights its outputs:

    prompt --parse--> [(text, weight)] --token ids, chunks of 75--> (k, 77) ids --encoder--> (k, 77, d)
           --emphasis per chunk--> concatenated: a (77 k, d) context; the UNet's cross-attention takes any length

Syntax "a1111": `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by w, nesting
multiplies; `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters (a backslash before any other character is
dropped, as A1111 drops it); a bracket left open applies to the end of the prompt, a closing one without its opening
one is literal text; BREAK (the word, in capitals) ends the current chunk. `(x: 1.2)` (a blank after the colon) is
not a weight in A1111, so not here either: it reads as `(x: 1.2)` with x1.1 on the text inside.
Syntax "plain": every character is literal (A1111's "Emphasis: None"); long prompts are still chunked.
Training captions never come here: the trainers and the cache call the text encoder's own tokenize / encode.
`<lora:NAME:W>` tags are taken out of the prompt by `lora_tags` (txt2img.py loads their files: the --lora-dir's, else
the shipped add-ons').

Prompt editing and alternation change the prompt between steps: `schedule(prompt, steps)` reads them as A1111's
`get_learned_conditioning_prompt_schedules` (its lark grammar, read by hand) and gives [(last step, text)], step i
(0-based) taking the first entry whose last step is >= i:

    [from:to:when]  from until step `when`, then to     [to:when]  nothing, then to     [from::when]  from, then nothing
    when: with a decimal point a fraction of the steps (step int(when * steps)), else a step number; nesting allowed
    [a|b|c]         entries ending at steps 1..N, entry k holding option (k - 1) mod 3: steps 0 and 1 take a, then b...

Inside a bracket the grammar is strict: brackets balance, `:` only in `(x:y)` or an edit, `|` only in an alternation.
At the top level a bracket or colon that starts no such group is literal text; a prompt A1111's grammar cannot read
at all (a `|` outside an alternation, a lone backslash at the end) is one entry of its own text. The texts keep their
emphasis and BREAK, which `parse` reads afterwards. One difference: A1111's lark parser
picks among ambiguous readings in the order it found them, and reads a group closed right before a stray bracket (as
in `[[c:3]][`) as text, where ldm reads the group. `subprompts` splits a prompt at AND with its `:weight`s (A1111's
composable diffusion; ldm.denoiser combines them).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ldm import ASSETS
from ldm.errors import LdmError

if TYPE_CHECKING:
    import torch

# AUTOMATIC1111's prompt syntax, or every character literal (ldm.cli holds the flag's copy, checked by a test)
SYNTAX_NAMES = ("a1111", "plain")
CHUNK = 75  # prompt tokens per chunk: the encoder's 77 less its start and end tokens
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack: a comma this near the end of a full chunk splits it
BREAK = None  # the weight that marks a BREAK in parse()'s output

# One match per lexical element: an escape, an opening bracket, a weighted close `:1.3)`, a close, a run of text, a
# lone colon. The weight is a decimal number right after the colon and right before the bracket, as A1111's.
ELEMENT = re.compile(
    r"\\(?P<escaped>[()\[\]\\]?)|(?P<open>[(\[])|:(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\)"
    r"|(?P<close>[)\]])|(?P<text>[^\\()\[\]:]+|:)"
)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


# A1111's schedule grammar: plain text (an escape is a backslash and the character after it), the number that ends
# an edit (lark's SIGNED_NUMBER, blanks allowed around it), and its AND with a weight at the end of each sub-prompt.
PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
AND = re.compile(r"\bAND\b")
AND_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class Edit(NamedTuple):
    """`[before:after:when]` (before None: `[after:when]`); when: the number as written."""

    before: list | None
    after: list
    when: str


class Alternation(NamedTuple):
    """`[a|b|c]`: one option per step."""

    options: list[list]


class PromptError(LdmError):
    """A prompt's `<lora:...>` tag that cannot be followed; the message names it."""


LORA_TAG = re.compile(r"<lora:([^:<>]+)((?::[^:<>]*){0,2})>")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def lora_tags(prompt: str, lora_dir: str | Path) -> tuple[str, list[tuple[Path, float, float]]]:
    """AUTOMATIC1111's LoRA tags: `<lora:NAME:W>` (W for the text encoder and the UNet; no W: 1) and
    `<lora:NAME:TE_W:UNET_W>`. -> the prompt without its tags, and [(the file, text-encoder weight, UNet weight)]: the
    file is lora_dir/NAME.safetensors (or .pt, .ckpt), else a shipped add-on's ldm/assets/*/NAME.safetensors (so
    `<lora:emoji-gameboy:1>` needs no flag). PromptError names a tag whose file or weight is not there."""
    found = []
    for m in LORA_TAG.finditer(prompt):
        name, numbers = m[1].strip(), [w.strip() for w in m[2].split(":")[1:]]
        try:
            weights = [float(w) for w in numbers] or [1.0]
        except ValueError:
            raise PromptError(f"{m[0]}: the weights after the name must be numbers") from None
        if not all(math.isfinite(w) for w in weights):
            raise PromptError(f"{m[0]}: the weights must be finite numbers")
        candidates = [Path(lora_dir) / f"{name}{suffix}" for suffix in LORA_SUFFIXES]
        candidates += [folder / f"{name}.safetensors" for folder in sorted(ASSETS.iterdir())]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            raise PromptError(
                f"{m[0]}: no {name}.safetensors (or .pt, .ckpt) in the LoRA folder {lora_dir} nor among the shipped "
                f"add-ons ({ASSETS})"
            )
        found.append((path, weights[0], weights[-1]))
    return LORA_TAG.sub("", prompt), found


def parse(prompt: str) -> list[tuple[str, float | None]]:
    """A1111 prompt -> [(text, weight)], runs of equal weight merged; ("BREAK", BREAK) where a chunk ends.

    >>> parse("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight]
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open bracket's scope starts in `pieces`

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not BREAK:
                piece[1] *= factor

    for m in ELEMENT.finditer(prompt):
        if m["escaped"] is not None:
            pieces.append([m["escaped"], 1.0])
        elif m["open"]:
            opened[m["open"]].append(len(pieces))
        elif m["weight"] is not None and opened["("]:
            multiply(opened["("].pop(), float(m["weight"]))
        elif m["close"] == ")" and opened["("]:
            multiply(opened["("].pop(), 1.1)
        elif m["close"] == "]" and opened["["]:
            multiply(opened["["].pop(), 1 / 1.1)
        else:  # text, or a close that matches no open bracket: literal, split at each BREAK
            for i, text in enumerate(BREAK_WORD.split(m[0])):
                if i:
                    pieces.append(["BREAK", BREAK])
                pieces.append([text, 1.0])
    for start in opened["("]:
        multiply(start, 1.1)
    for start in opened["["]:
        multiply(start, 1 / 1.1)
    merged: list[list] = []
    for text, weight in pieces or [["", 1.0]]:
        if merged and weight is not BREAK and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def subprompts(prompt: str) -> list[tuple[str, float]]:
    """A1111's AND (get_multicond_prompt_list): the sub-prompts between the capitalised word AND, each with the weight
    written at its end (`a cat :1.2`; none: 1), the text without it and without trailing blanks.

    >>> subprompts("a cat AND a dog:0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    parts = [AND_WEIGHT.match(part).groups() for part in AND.split(prompt)]
    return [(text, 1.0 if weight is None else float(weight)) for text, weight in parts]


def schedule(prompt: str, steps: int, first_pass: int | None = None) -> list[tuple[int, str]]:
    """The prompt's texts over `steps` steps, as A1111 schedules prompt editing and alternation: [(last step, text)],
    sorted; step i (0-based) takes the first entry whose last step is >= i. A prompt without edits: [(steps, prompt)].
    first_pass: the first pass's steps when these are a hires fix's second pass (see edit_step).

    >>> schedule("a [cat:dog:0.5]", 10)
    [(5, 'a cat'), (10, 'a dog')]
    """
    try:
        nodes = top_level(prompt)
    except RecursionError:  # brackets nested hundreds deep: read as text (so are the edits among them)
        nodes = None
    if nodes is None:
        return [(steps, prompt)]
    ends = {steps}

    def collect(nodes: list) -> None:
        for node in nodes:
            if isinstance(node, Edit):
                when = edit_step(node.when, steps, first_pass)
                if when >= 1:
                    ends.add(when)
                collect(node.before or [])
                collect(node.after)
            elif isinstance(node, Alternation):
                ends.update(range(1, steps + 1))
                for option in node.options:
                    collect(option)

    def text(nodes: list, step: int) -> str:
        out = []
        for node in nodes:
            if isinstance(node, Edit):
                out.append(
                    text(node.before or [], step)
                    if step <= edit_step(node.when, steps, first_pass)
                    else text(node.after, step)
                )
            elif isinstance(node, Alternation):
                out.append(text(node.options[(step - 1) % len(node.options)], step))
            else:
                out.append(node)
        return "".join(out)

    collect(nodes)
    return [(end, text(nodes, end)) for end in sorted(ends)]


def edit_step(number: str, steps: int, first_pass: int | None = None) -> int:
    """An edit's `when` as a step: with a decimal point a fraction of the steps, else a step number; at most `steps`
    (and below 1: no step, the edit's second text from the start). In a hires fix's second pass (first_pass: the
    first pass's steps) A1111 counts a step number from the first pass's start and a fraction from 1, the first
    pass's end: `[a:b:1.5]` switches halfway through the second pass, `[a:b:0.5]` uses b all through it."""
    value = float(number)
    if "." in number:
        value = (value - (first_pass is not None)) * steps
    else:
        value -= first_pass or 0
    return int(max(min(value, steps), 0))


def top_level(prompt: str) -> list | None:
    """The prompt as a list of texts, Edits and Alternations; None where A1111's grammar reads none (its lark parse
    fails). A bracket or colon that starts no group is literal here, as A1111's grammar allows at its top level."""
    nodes, i = [], 0
    while i < len(prompt):
        read, i = sequence(prompt, i)
        nodes += read
        if i < len(prompt):
            if prompt[i] not in "[]():":
                return None
            nodes.append(prompt[i])
            i += 1
    return nodes


def sequence(prompt: str, i: int) -> tuple[list, int]:
    """Texts and groups from prompt[i] on, up to the first character that continues neither: (nodes, where)."""
    nodes = []
    while i < len(prompt):
        if m := PLAIN.match(prompt, i):
            nodes.append(m[0])
            i = m.end()
        elif read := group(prompt, i):
            nodes += read[0]
            i = read[1]
        else:
            break
    return nodes, i


def group(prompt: str, i: int) -> tuple[list, int] | None:
    """The bracketed group that opens at prompt[i]: `(x)`, `(x:y)` and `[x]` (literal: emphasis, read by parse), an
    Edit or an Alternation -> ([nodes], the index after it); None when none closes."""
    opening = prompt[i]
    if opening not in "([":
        return None
    first, j = sequence(prompt, i + 1)
    end = prompt[j : j + 1]
    if opening == "(":
        if end == ":":
            second, j = sequence(prompt, j + 1)
            first, end = [*first, ":", *second], prompt[j : j + 1]
        return (["(", *first, ")"], j + 1) if end == ")" else None
    if end == "]":
        return ["[", *first, "]"], j + 1
    if end == "|":
        options = [first]
        while prompt[j : j + 1] == "|":
            option, j = sequence(prompt, j + 1)
            options.append(option)
        return ([Alternation(options)], j + 1) if prompt[j : j + 1] == "]" else None
    if end != ":":
        return None
    if m := WHEN.match(prompt, j + 1):
        return [Edit(None, first, m[1])], m.end()
    second, k = sequence(prompt, j + 1)
    m = WHEN.match(prompt, k + 1) if prompt[k : k + 1] == ":" else None
    return ([Edit(first, second, m[1])], m.end()) if m else None


def chunk(
    pieces: list[tuple[str, float | None]], token_ids, comma: int, embeddings: dict[int, int] | None = None
) -> list[tuple[list[int], list[float]]]:
    """Pack the tokens of parsed pieces into chunks of at most CHUNK (ids, weights), as A1111's tokenize_line.

    token_ids(texts) gives each text's ids without start/end tokens. A chunk that fills up while a comma lies within
    its last COMMA_BACKTRACK tokens moves the tokens after that comma to the next chunk; BREAK closes the chunk (an
    empty one too). embeddings: {first id: vectors} of multi-vector textual inversions, whose vectors are never split
    across chunks (one that does not fit in the current chunk starts the next). A prompt gives at least one chunk
    (the empty prompt: one empty chunk).
    """
    embeddings = embeddings or {}
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for (_, weight), piece in zip(pieces, token_ids([text for text, _ in pieces])):
        if weight is BREAK:
            close()
            continue
        for token in piece:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma >= 0 and CHUNK - last_comma <= COMMA_BACKTRACK:
                moved = ids[last_comma + 1 :], weights[last_comma + 1 :]
                del ids[last_comma + 1 :], weights[last_comma + 1 :]
                close()
                ids, weights = moved
            if len(ids) + embeddings.get(token, 1) > CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on chunk states z (k, 77, d) with token weights (k, 77), chunk by chunk:

        z_w = z * w                            each token's states scaled by its weight
        z'  = z_w * mean(z) / mean(z_w)        the chunk's mean (over tokens and channels) restored

    (EmphasisOriginal.after_transformers in A1111's modules/sd_emphasis.py; A1111 takes the mean over the batch it
    encodes, one prompt's chunk). A chunk whose weights are all 1 is returned unchanged, bit for bit.
    """
    w = weights.to(z.dtype)[..., None]
    weighted = z * w
    rescaled = weighted * (z.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    return z.where((w == 1).all(dim=1, keepdim=True), rescaled)


def prompt_contexts(text_encoder, prompts: list[str], syntax: str = "a1111", clip_skip: int = 1) -> list[torch.Tensor]:
    """Each prompt's context (77 k, d): its k chunks encoded in one batch with all the others', then emphasised.

    text_encoder: an ldm.text_encoder.FrozenTextEncoder (token_ids, frame, forward with clip_skip).
    """
    comma = text_encoder.token_ids([","])[0][0]
    embeddings = text_encoder.embedding_lengths()
    per_prompt = [
        chunk(parse(p) if syntax == "a1111" else [(p, 1.0)], text_encoder.token_ids, comma, embeddings) for p in prompts
    ]
    flat = [c for chunks in per_prompt for c in chunks]
    ids = text_encoder.frame([ids for ids, _ in flat]).to(text_encoder.transformer.device)
    z = text_encoder(ids, clip_skip=clip_skip)
    states = emphasize(z, z.new_tensor([[1.0, *w] + [1.0] * (CHUNK + 1 - len(w)) for _, w in flat]))
    return [s.flatten(0, 1) for s in states.split([len(chunks) for chunks in per_prompt])]
