"""OpenCLIP ViT-H/14's text tower (SD 2.x) against oracles nobody here wrote: transformers' CLIPTokenizer and
CLIPTextModel, diffusers' single-file converter, loaders and pipelines, and OpenCLIP's published token ids."""

import copy
import functools
import gc
import html
import json
import re

import ftfy
import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import save_file
from test_text_encoder import BOS, EOS, OpenAITokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import PROMPT, randomize_, tiny_model
from ldm.checkpoint import save_diffusers_folder
from ldm.config import TextEncoderConfig
from ldm.diffusers_names import TEXT
from ldm.errors import CheckpointError
from ldm.io import load_state_strict
from ldm.openclip_names import (
    OPENCLIP,
    from_openclip,
    from_openclip_layout,
    is_openclip_folder,
    to_openclip,
    to_openclip_layout,
)
from ldm.pipeline import Pipeline
from ldm.prompts import prompt_contexts
from ldm.text_encoder import FrozenCLIPEmbedder, build_tokenizer, load_tokenizer

TINY = TextEncoderConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu", open_clip=True
)
SD2_OVERRIDES = ("text_encoder.open_clip=true", "text_encoder.hidden_act=gelu")

# ---------------------------------------------------------------- the tokenizer

SUBJECTS = [
    "a cat",
    "An astronaut riding a horse on the moon",
    "a lighthouse on a cliff at sunset",
    "café au lait, naïve façade, jalapeño, Ångström",
    "日本の石灯籠と中文字符",
    "한국어 텍스트",
    "русский пейзаж зимой",
    "ελληνικός ναός στη θάλασσα",
    "a \U0001f431 wearing a \U0001f3a9",
    "العربية والخط",
    "हिन्दी कविता",
    "עברית ומים",
    "emoji family \U0001f468\u200d\U0001f469\u200d\U0001f467 and \U0001f44d\U0001f3fd",
    "don't stop, you're 'quoted' \"double\" it'll we've I'm",
    "35mm photography, f/1.8, ISO-400, 1/250s, 4k 8K 1920x1080 3.14159 -42 +7",
    "a/b\\c @user #hashtag $5 100% a&b ~tilde~ `code` {x} <tag>",
    "   extra    spaces\tand\ttabs\nand newlines   ",
    "(masterpiece), [blurry], (red:1.3) apple BREAK table",
    "ß straße İstanbul",
    "",
]
STYLES = [
    "oil painting",
    "by greg rutkowski and alphonse mucha",
    "trending on artstation, unreal engine, octane render",
    "highly detailed, sharp focus, 8k",
    "watercolor on paper",
    "cinematic lighting; volumetric fog; ???",
    "pixel art 16x16",
    "",
    "ukiyo-e woodblock print",
    "studio photo -- soft box ... bokeh",
]
LONG = " and a lighthouse on a cliff at sunset with seagulls over the waves" * 8
PROMPTS = [
    SUBJECTS[i % len(SUBJECTS)] + (", " + STYLES[(7 * i) % len(STYLES)]) * (i % 3) + LONG * (i % 9 == 0)
    for i in range(200)
]


@functools.cache
def bpe() -> OpenAITokenizer:
    return OpenAITokenizer()


def openclip_ids(text: str) -> list[int]:
    """OpenCLIP's `tokenize` (open_clip/tokenizer.py, the BPE of OpenAI's simple_tokenizer.py): start, the text's ids,
    end, cut to 77 with the end token last, then zeros."""
    ids = [BOS] + bpe().content(text) + [EOS]
    ids = ids[:76] + [EOS] if len(ids) > 77 else ids
    return ids + [0] * (77 - len(ids))


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """A diffusers SD 2 folder's tokenizer/ as stabilityai/stable-diffusion-2-1 has it: vocab.json and merges.txt
    (written here from the same BPE file), special_tokens_map.json and tokenizer_config.json with pad_token "!"."""
    folder = tmp_path_factory.mktemp("sd2")
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir()
    oracle = bpe()
    (tokenizer / "vocab.json").write_text(json.dumps(oracle.encoder))
    merges = sorted(oracle.bpe_ranks, key=oracle.bpe_ranks.get)
    (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (tokenizer / "special_tokens_map.json").write_text(json.dumps(special | {"pad_token": "!"}))
    config = special | {"pad_token": "!", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference_tokenizer(sd2_folder):
    """transformers' CLIPTokenizer(pad_token="!") of that folder, as diffusers reads it."""
    tokenizer = CLIPTokenizer.from_pretrained(str(sd2_folder / "tokenizer"))
    assert tokenizer.pad_token == "!" and tokenizer.model_max_length == 77
    return tokenizer


def test_ids_match_transformers_with_pad_token_bang(reference_tokenizer):
    """200 prompts (unicode, emoji, long ones cut to 77): the ids of transformers' CLIPTokenizer(pad_token="!")."""
    assert len(PROMPTS) == 200 and sum(p.endswith(LONG) for p in PROMPTS) >= 20
    assert all(ftfy.fix_text(p) == p and html.unescape(p) == p and "!" not in p for p in PROMPTS)  # see below for "!"
    encoder = FrozenCLIPEmbedder(TINY)
    assert encoder.tokenizer.pad_token_id == 0 and encoder.tokenizer.convert_ids_to_tokens(0) == "!"
    want = reference_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    with pytest.warns(UserWarning, match="truncated"):
        ids = encoder.tokenize(PROMPTS)
    assert ids.tolist() == want
    assert PROMPTS[60] == "a cat" and ids[60].tolist() == [BOS, 320, 2368, EOS] + [0] * 73  # padded with "!" (0)
    assert [row.count(EOS) for row in ids.tolist()] == [1] * 200  # one end token each, no end-token padding
    assert all(row == openclip_ids(p) for row, p in zip(ids.tolist(), PROMPTS))


def test_exclamation_marks_are_words_as_in_openclip(reference_tokenizer):
    """OpenCLIP's tokenizer keeps "!" a word; transformers' with pad_token="!" (diffusers' SD 2 tokenizers) turns each
    one into padding. open_clip.tokenize("! !! !!!") as printed in diffusers issue 4153: 49406, 256, 748, 995, 49407."""
    encoder = FrozenCLIPEmbedder(TINY)
    ids = encoder.tokenize(["! !! !!!", "wow!!! a cat!"]).tolist()
    assert ids[0] == [BOS, 256, 748, 995, EOS] + [0] * 72
    assert ids[1] == openclip_ids("wow!!! a cat!")
    theirs = reference_tokenizer("! !! !!!").input_ids
    assert theirs == [BOS] + [0] * 6 + [EOS]  # the difference ldm does not copy


def test_v1_tokenizer_unchanged():
    tokenizer = build_tokenizer()
    ids = tokenizer("a cat!", padding="max_length", max_length=8).input_ids
    assert tokenizer.pad_token_id == EOS and ids == [BOS, 320, 2368, 256, EOS, EOS, EOS, EOS]
    assert build_tokenizer(True) is not tokenizer and build_tokenizer(True).pad_token_id == 0


def test_diffusers_folder_tokenizer_keeps_openclip_padding(tmp_path, sd2_folder, reference_tokenizer):
    """A diffusers SD 2 folder's tokenizer (as the hub's, and as transformers 5 saves one with added words) read with
    its added words, padding with 0 and "!" still a word; is_openclip_folder tells such a folder from an SD v1 one."""
    (tmp_path / "sd2").symlink_to(sd2_folder)
    build_tokenizer().save_pretrained(str(tmp_path / "sd1" / "tokenizer"))
    assert is_openclip_folder(tmp_path / "sd2") and not is_openclip_folder(tmp_path / "sd1")
    reference_tokenizer = copy.deepcopy(reference_tokenizer)
    reference_tokenizer.add_tokens(["<word>", "<word>_1"])
    reference_tokenizer.save_pretrained(str(tmp_path / "sd2+ti" / "tokenizer"))
    for sub in ("sd2", "sd2+ti"):
        tokenizer = load_tokenizer(tmp_path / sub / "tokenizer", open_clip=True)
        ids = tokenizer("wow!!! <word>", padding="max_length", max_length=7).input_ids
        word = [49408, EOS, 0, 0] if sub == "sd2+ti" else [283, 2653, 285, EOS]  # the added word, or "<", "word", ">"
        assert ids == [BOS, 2781, 995, *word]
    v1 = load_tokenizer(tmp_path / "sd1" / "tokenizer")
    assert v1("wow!!!", padding="max_length", max_length=6).input_ids == [BOS, 2781, 995, EOS, EOS, EOS]


def reference_model(encoder: FrozenCLIPEmbedder, layers: int) -> CLIPTextModel:
    cfg = encoder.transformer.config
    fields = ("hidden_size", "intermediate_size", "num_attention_heads", "hidden_act", "max_position_embeddings")
    return CLIPTextModel(CLIPTextConfig(num_hidden_layers=layers, **{f: getattr(cfg, f) for f in fields})).eval()


def test_long_prompts_chunk_with_zero_padding(reference_tokenizer):
    """A1111's chunks of 75 tokens framed by start / end tokens and padded with 0 (its id_pad for OpenCLIP), each
    encoded by the text model: transformers' model on transformers' ids of each chunk."""
    encoder = randomize_(FrozenCLIPEmbedder(TINY))
    reference = reference_model(encoder, 2)
    reference.load_state_dict(encoder.transformer.state_dict())
    prompt = "a lighthouse on a cliff with seagulls " * 14  # 98 tokens, no comma: chunks of 75 and 23
    ids = reference_tokenizer(prompt, add_special_tokens=False).input_ids
    rows = [[BOS, *ids[:75], EOS], [BOS, *ids[75:], EOS] + [0] * (75 - len(ids[75:]))]
    [context] = prompt_contexts(encoder, [prompt])
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(rows)).last_hidden_state.flatten(0, 1)
    assert context.shape == (154, 32)
    torch.testing.assert_close(context, want, rtol=0, atol=0)
    assert encoder.frame([[320]]).tolist() == [[BOS, 320, EOS] + [0] * 74]


# ---------------------------------------------------------------- OpenCLIP single-file names


def openclip_file(reference: CLIPTextModel) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel written as OpenCLIP's text tower is in SD 2 files (open_clip's names: q, k, v
    packed into nn.MultiheadAttention's in_proj, text_projection (width, embed_dim) multiplied from the right),
    with the projection and logit scale real files carry, under the file's prefix."""
    sd = reference.state_dict()
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": torch.randn(reference.config.hidden_size, 24),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(reference.config.num_hidden_layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{p}"] = torch.cat([sd[f"{hf}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for theirs, ours in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{oc}{theirs}.{p}"] = sd[f"{hf}{ours}.{p}"]
    return {OPENCLIP + k: v for k, v in out.items()}


def test_single_file_tower_conditions_on_the_penultimate_layer():
    """OpenCLIP names with one more block than ours (as SD 2 files carry the 24th): loaded strictly, ours = the full
    tower's hidden_states[-2] then its final layer norm (FrozenOpenCLIPEmbedder(layer="penultimate")); the names
    agree with diffusers' convert_open_clip_checkpoint; clip skip 2 = hidden_states[-3]."""
    torch.manual_seed(0)
    encoder = FrozenCLIPEmbedder(TINY)
    reference = randomize_(reference_model(encoder, 3), seed=1)
    unet_key = "model.diffusion_model.out.2.bias"
    state = openclip_file(reference) | {unet_key: torch.ones(4)}

    tower = from_openclip({k[len(OPENCLIP) :]: v for k, v in state.items() if k.startswith(OPENCLIP)})
    # diffusers' converter, under SDXL's prefix where it skips neither text_projection nor a block 23
    sdxl = "conditioner.embedders.1.model."
    theirs = sfu.convert_open_clip_checkpoint(reference, {sdxl + k[len(OPENCLIP) :]: v for k, v in state.items()}, sdxl)
    diffusers_names = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assert set(diffusers_names) == set(tower) - {"logit_scale"}
    assert all(torch.equal(diffusers_names[k], tower[k]) for k in diffusers_names)

    ours = from_openclip_layout(state, num_layers=2)
    assert torch.equal(ours.pop(unet_key), state[unet_key])
    load_state_strict(encoder, {k[len("cond_stage_model.") :]: v for k, v in ours.items()}, "file")
    tokens = encoder.tokenize(["a photo of a cat", "A photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        hidden = reference(input_ids=tokens, output_hidden_states=True).hidden_states
        want = reference.final_layer_norm(hidden[-2])
        skip2 = reference.final_layer_norm(hidden[-3])
    torch.testing.assert_close(encoder(tokens), want, rtol=0, atol=0)
    torch.testing.assert_close(encoder(tokens, clip_skip=2), skip2, rtol=0, atol=0)
    assert encoder.num_layers == 2 and want.std() > 0.1


def test_names_round_trip():
    """OpenCLIP -> ours -> OpenCLIP is the identity (every block, the projection, the logit scale); ours -> OpenCLIP
    writes the tower without the unused head; a stray tensor is named."""
    state = openclip_file(randomize_(reference_model(FrozenCLIPEmbedder(TINY), 3)))
    tower = {k[len(OPENCLIP) :]: v for k, v in state.items()}
    back = to_openclip(from_openclip(tower))
    assert back.keys() == tower.keys() and all(torch.equal(back[k], tower[k]) for k in tower)

    ours = from_openclip_layout(state, num_layers=3)
    assert all(k.startswith(TEXT) for k in ours) and len(ours) == len(state) - 2 + 2 * 3 * 2
    written = to_openclip_layout(ours | {TEXT + "embeddings.position_ids": torch.arange(77)[None]})
    assert written.keys() == state.keys() - {OPENCLIP + "text_projection", OPENCLIP + "logit_scale"}
    assert all(torch.equal(written[k], state[k]) for k in written)
    with pytest.raises(CheckpointError, match=r"'cond_stage_model.model.visual.proj' is not a tensor of OpenCLIP"):
        from_openclip({"visual.proj": torch.ones(1)})


@pytest.mark.slow
def test_full_size_vit_h_tower_loads_strictly_from_real_names():
    """OpenCLIP ViT-H/14's text tower at full size, every tensor of an SD 2.1 file's `cond_stage_model.model.*`
    under its real name and shape (random weights): loads strictly into the SD 2 text encoder (23 layers) and equals
    transformers' 24-layer CLIPTextModel's penultimate hidden state after its final layer norm."""
    width, ffn, layers = 1024, 4096, 24
    shapes = {
        "token_embedding.weight": (49408, width),
        "positional_embedding": (77, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, 1024),
        "logit_scale": (),
    }
    for i in range(layers):
        block = {
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "mlp.c_fc.weight": (ffn, width),
            "mlp.c_fc.bias": (ffn,),
            "mlp.c_proj.weight": (width, ffn),
            "mlp.c_proj.bias": (width,),
        }
        shapes |= {f"transformer.resblocks.{i}.{k}": s for k, s in block.items()}
    assert len(shapes) == 6 + 24 * 12  # 294 tensors, as in v2-1_768-ema-pruned.safetensors
    g = torch.Generator().manual_seed(0)
    state = {OPENCLIP + k: torch.randn(s, generator=g) * 0.02 + (k.endswith("ln_1.weight")) for k, s in shapes.items()}
    cfg = TextEncoderConfig(
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        open_clip=True,
    )
    with init_empty_weights():
        encoder = FrozenCLIPEmbedder(cfg)
    ours = from_openclip_layout(state, num_layers=23)
    load_state_strict(encoder, {k[len("cond_stage_model.") :]: v for k, v in ours.items()}, "v2-1 file")
    tokens = encoder.tokenize(["a professional photograph of an astronaut riding a horse"])
    with torch.no_grad():
        out = encoder(tokens)
    del encoder, ours
    gc.collect()
    reference = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=width, intermediate_size=ffn, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"
        )
    ).eval()
    converted = sfu.convert_open_clip_checkpoint(reference, state)  # diffusers skips block 23 by its name
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if k != "text_projection.weight"}
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and {k.split(".")[2] for k in missing} == {"23"}  # the block conditioning never reads
    with torch.no_grad():
        want = reference.final_layer_norm(reference(input_ids=tokens, output_hidden_states=True).hidden_states[-2])
    assert out.shape == (1, 77, 1024)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- textual inversion and LoRA on the OpenCLIP encoder


@pytest.fixture(scope="module")
def sd2_text(tmp_path_factory):
    """A tiny model with OpenCLIP's text encoder (gelu, "!" padding), its diffusers folder and diffusers' pipeline."""
    model = tiny_model(overrides=SD2_OVERRIDES)
    folder = tmp_path_factory.mktemp("sd2text")
    save_diffusers_folder(model, folder)
    assert is_openclip_folder(folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert ref.tokenizer.pad_token_id == 0
    return model, ref


def contexts(pipe: Pipeline, prompt: str) -> torch.Tensor:
    return pipe.conditioner.encode_prompts([prompt], "", guided=False, version=pipe.patcher.version)[0]


def theirs(ref: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    return ref.encode_prompt(prompt, "cpu", 1, False)[0][0]


def test_textual_inversion_matches_diffusers(sd2_text, tmp_path):
    """An embedding of the OpenCLIP encoder's width (1024 for SD 2, 32 here), as diffusers' load_textual_inversion
    reads it: the same ids (padded with 0), the same states."""
    model, ref = sd2_text
    pipe, ref = Pipeline(copy.deepcopy(model)), copy.deepcopy(ref)
    width = pipe.text_encoder.hidden_size
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(5))
    save_file({"<sd2style>": vectors}, tmp_path / "learned_embeds.safetensors")
    assert pipe.load_embedding(tmp_path / "learned_embeds.safetensors") == ["<sd2style>", "<sd2style>_1"]
    ref.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    prompt = "a <sd2style> apple"
    expected = ref.tokenizer(ref.maybe_convert_prompt(prompt, ref.tokenizer), padding="max_length", max_length=77)
    assert pipe.text_encoder.tokenize(prompt).tolist() == [expected.input_ids]
    assert expected.input_ids[6:] == [0] * 71
    torch.testing.assert_close(contexts(pipe, prompt), theirs(ref, prompt), rtol=1e-5, atol=1e-5)
    assert (contexts(pipe, prompt) - contexts(pipe, "a apple")).abs().max() > 0.1


@pytest.mark.parametrize("spelling", ["text_model_encoder_layers", "model_transformer_resblocks"])
def test_kohya_text_lora_matches_diffusers(sd2_text, spelling, tmp_path):
    """kohya's text-encoder names on the OpenCLIP encoder, `lora_te_text_model_encoder_layers_N_self_attn_q_proj` and
    its CompVis spelling `lora_te_model_transformer_resblocks_N_attn_q_proj` (mlp_c_fc, mlp_c_proj): diffusers'
    load_lora_weights of the first."""
    model, ref = sd2_text
    pipe, ref = Pipeline(copy.deepcopy(model)), copy.deepcopy(ref)
    g, state = torch.Generator().manual_seed(7), {}
    for name, m in ref.text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear):
            key = "lora_te_text_model_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g) / m.in_features**0.5
            state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g) * m.weight.std() * 0.6
            state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, tmp_path / "te.safetensors")
    compvis = {"self_attn": "attn", "mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj"}
    renamed = {
        re.sub(
            r"text_model_encoder_layers_(\d+)_(self_attn|mlp_fc1|mlp_fc2)",
            lambda m: f"model_transformer_resblocks_{m[1]}_{compvis[m[2]]}",
            k,
        ): v
        for k, v in state.items()
    }
    assert len(renamed) == len(state) and any("resblocks_1_mlp_c_proj" in k for k in renamed)
    save_file(renamed, tmp_path / "resblocks.safetensors")
    before = contexts(pipe, PROMPT)
    pipe.load_lora(tmp_path / ("te.safetensors" if spelling.startswith("text") else "resblocks.safetensors"), 0.8)
    ref.load_lora_weights(str(tmp_path / "te.safetensors"), adapter_name="te")
    assert sum(hasattr(m, "lora_A") for m in ref.text_encoder.modules()) == len(state) // 3  # every layer taken
    ref.set_adapters(["te"], adapter_weights=[0.8])
    ours = contexts(pipe, PROMPT)
    torch.testing.assert_close(ours, theirs(ref, PROMPT), rtol=1e-4, atol=1e-4)
    assert np.abs((ours - before).numpy()).max() > 0.05
