"""ldm.patcher: a set of LoRAs and embeddings applied to a model and removed from backups, bit for bit; each file read
once; a version that moves exactly with the set (the OpenVINO backend keys on it); LoRAs merged under int8."""

import copy
import json
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

import ldm.lora
import ldm.outputs
import ldm.patcher
import txt2img
from conftest import PROMPT, tiny_model
from ldm.checkpoint import save_single_file
from ldm.patcher import Patcher, quantize_int8_
from ldm.pipeline import Pipeline
from ldm.text_encoder import build_tokenizer

RANK = 2


class Lora(NamedTuple):
    file: str
    weight: float = 1.0
    te_weight: float | None = None


class Embedding(NamedTuple):
    file: str
    token: str | None = None


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def lora_file(model, path, seed: int, text: bool = True):
    """A kohya file (CompVis names) with a random LoRA on every Linear and Conv2d of the UNet (and the text model)."""
    g, state = torch.Generator().manual_seed(seed), {}
    parts = [("lora_unet_", model.unet)] + [("lora_te_", model.text_encoder.transformer)] * text
    for prefix, module in parts:
        for name, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                key, w = prefix + name.replace(".", "_"), m.weight
                state[f"{key}.lora_down.weight"] = torch.randn(RANK, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
                state[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], RANK, *[1] * (w.ndim - 2), generator=g) * 0.1
    save_file(state, path)
    return str(path)


def embedding_file(model, path, n: int = 2):
    save_file({"emb_params": torch.randn(n, model.text_encoder.hidden_size)}, path)
    return str(path)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_and_remove_restore_bit_for_bit_and_version_moves_with_the_set(model, tmp_path):
    """Weights, tokenizer and embedding table are the model's own again after the empty set; the same set twice does
    nothing (no version change); a weight change is a change; embeddings and LoRAs move independently."""
    model = copy.deepcopy(model)
    before, tokenizer = weights(model), model.text_encoder.tokenizer
    a, b = lora_file(model, tmp_path / "a.safetensors", 1), lora_file(model, tmp_path / "b.safetensors", 2)
    emb = embedding_file(model, tmp_path / "mystyle.safetensors")
    patcher = Patcher(model)
    patcher.apply([Lora(a, 0.8)], [Embedding(emb)])
    assert patcher.version == 1 and patcher.tokens == (["mystyle", "mystyle_1"],)
    merged = weights(model)
    assert not same({k: v for k, v in merged.items() if "token_embedding" not in k}, before)
    patcher.apply([Lora(a, 0.8, 0.8)], [Embedding(emb)])  # te_weight = weight: the same set
    assert patcher.version == 1
    patcher.apply([Lora(a, 0.8), Lora(b, -0.5)], [Embedding(emb)])
    patcher.apply([Lora(a, 0.8)], [Embedding(emb)])
    assert patcher.version == 3 and same(weights(model), merged)
    patcher.apply([Lora(a, 0.7)], [Embedding(emb)])
    assert patcher.version == 4 and not same(weights(model), merged)
    patcher.apply()
    assert patcher.version == 5 and same(weights(model), before) and not patcher.backups
    assert model.text_encoder.tokenizer is tokenizer and len(tokenizer) == len(build_tokenizer())


def test_embedding_unload_restores_the_tokenizer_and_text_model(model, tmp_path):
    model = copy.deepcopy(model)
    pipe = Pipeline(model)
    table, ids = (
        model.text_encoder.transformer.get_input_embeddings().weight.clone(),
        model.text_encoder.tokenize("mystyle"),
    )
    reference = pipe.conditioner.embed([PROMPT])[0]
    assert pipe.load_embedding(embedding_file(model, tmp_path / "mystyle.safetensors")) == ["mystyle", "mystyle_1"]
    assert len(model.text_encoder.tokenizer) == len(build_tokenizer()) + 2
    assert not torch.equal(model.text_encoder.tokenize("mystyle"), ids)
    pipe.patcher.apply()
    assert torch.equal(model.text_encoder.transformer.get_input_embeddings().weight, table)
    assert torch.equal(model.text_encoder.tokenize("mystyle"), ids)
    assert torch.equal(pipe.conditioner.embed([PROMPT])[0], reference)
    assert pipe.load_embedding(tmp_path / "mystyle.safetensors", "mystyle") == [
        "mystyle",
        "mystyle_1",
    ]  # loadable again


def test_a_bad_file_changes_nothing(model, tmp_path):
    model = copy.deepcopy(model)
    a, emb = lora_file(model, tmp_path / "a.safetensors", 1), embedding_file(model, tmp_path / "mystyle.safetensors")
    patcher = Patcher(model)
    patcher.apply([Lora(a)], [Embedding(emb)])
    applied = weights(model)
    save_file({"lora_unet_nowhere.lora_down.weight": torch.ones(1, 1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ldm.lora.CheckpointError, match="bad.safetensors"):
        patcher.apply([Lora(a), Lora(tmp_path / "bad.safetensors")], [Embedding(emb)])
    with pytest.raises(ldm.lora.CheckpointError, match="the token 'mystyle' is already in the vocabulary"):
        patcher.apply([], [Embedding(emb), Embedding(emb)])
    assert patcher.version == 1 and same(weights(model), applied) and len(model.text_encoder.tokenizer) == 49410


def test_a_lora_switch_between_prompts_reads_each_file_once(model, tmp_path, monkeypatch):
    """Three prompts of one txt2img run, two with <lora:> tags and a --lora on all: each file is read (and hashed)
    once, and each image is the one its prompt's LoRAs make alone."""
    save_single_file(model, tmp_path / "tiny.safetensors")
    (tmp_path / "Lora").mkdir()
    for i, name in enumerate(("a", "b", "base")):
        lora_file(model, tmp_path / "Lora" / f"{name}.safetensors", i, text=name != "b")
    prompts = [f"{PROMPT} <lora:a:0.8>", f"{PROMPT} <lora:b:0.6>", f"{PROMPT} <lora:a:0.8>"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    reads = Counter()

    def counted(path, *args, **kwargs):
        reads[Path(path).name] += 1
        return read_state_dict(path, *args, **kwargs)

    def counted_hash(path, *args, **kwargs):
        reads[f"hash {Path(path).name}"] += 1
        return a1111_hash(path, *args, **kwargs)

    read_state_dict, a1111_hash = ldm.lora.read_state_dict, ldm.outputs.a1111_hash
    monkeypatch.setattr(ldm.lora, "read_state_dict", counted)
    monkeypatch.setattr(ldm.outputs, "a1111_hash", counted_hash)
    common = ["--ckpt", tmp_path / "tiny.safetensors", "--steps", 2, "--lora-dir", tmp_path / "Lora"]
    args = common + [
        "--seed",
        0,
        "--from-file",
        tmp_path / "prompts.txt",
        "--lora",
        tmp_path / "Lora" / "base.safetensors",
    ]
    assert txt2img.main([str(a) for a in args + ["--outdir", tmp_path / "out"]]) == 0
    assert set(reads.values()) == {1} and len(reads) == 6, reads
    for i, prompt in enumerate(prompts[:2]):
        alone = [
            "--prompt",
            prompt,
            "--seed",
            i,
            "--lora",
            tmp_path / "Lora" / "base.safetensors",
            "--outdir",
            tmp_path / f"{i}",
        ]
        assert txt2img.main([str(a) for a in common + alone]) == 0
        with Image.open(tmp_path / "out" / f"{i:05}.png") as a, Image.open(tmp_path / f"{i}" / "00000.png") as b:
            assert a.tobytes() == b.tobytes()
            assert [f["name"] for f in json.loads(a.info["ldm"])["loras"]] == ["base", "ab"[i]]


def test_a_lora_merges_into_an_int8_unet_as_into_its_float_weights(model, tmp_path):
    """quantize then merge == merge the float weights then quantize, bit for bit; removing it gives the plain int8
    UNet back."""
    path = lora_file(model, tmp_path / "a.safetensors", 1)
    merged_first = copy.deepcopy(model)
    Patcher(merged_first).apply([Lora(path, 0.9)])
    quantize_int8_(merged_first.unet)
    plain = copy.deepcopy(model)
    quantize_int8_(plain.unet)
    pipe = Pipeline(copy.deepcopy(model), quantize="int8")
    pipe.load_lora(path, 0.9)

    def int8_layers(m) -> dict[str, torch.Tensor]:
        """Every tensor of the model: int8 weights with their scales, float biases, the other weights."""
        out = {k: v for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
        for name, layer in m.named_modules():
            if isinstance(layer, torch.ao.nn.quantized.dynamic.Linear):
                q, bias = layer.weight(), layer.bias()
                out |= {f"{name}.int8": q.int_repr(), f"{name}.scale": torch.tensor(q.q_scale())}
                out |= {} if bias is None else {f"{name}.bias": bias}
        return out

    assert len(int8_layers(plain)) > 100
    assert same(int8_layers(pipe.model), int8_layers(merged_first))
    assert not same(int8_layers(pipe.model), int8_layers(plain))
    pipe.unload_loras()
    assert same(int8_layers(pipe.model), int8_layers(plain))
    assert pipe.txt2img(PROMPT, steps=2, seed=0, progress=False)  # it runs


def test_openvino_hashes_the_weights_only_when_the_patch_version_moves(model, tmp_path, monkeypatch):
    """A second generate with the same patch version hashes nothing; a LoRA (a new version) hashes and converts."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino: pip install 'ldm[openvino]'")
    import ldm.openvino

    hashed = []
    weights_hash = ldm.openvino.weights_hash
    monkeypatch.setattr(ldm.openvino, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(ldm.openvino, "weights_hash", lambda module: hashed.append(1) or weights_hash(module))
    pipe = Pipeline(copy.deepcopy(model), backend="openvino")
    pipe.txt2img(PROMPT, steps=1, seed=0, progress=False)
    assert len(hashed) == 2  # the UNet and the decoder
    pipe.txt2img(PROMPT, steps=1, seed=0, progress=False)
    assert len(hashed) == 2
    pipe.load_lora(lora_file(model, tmp_path / "a.safetensors", 1))
    pipe.txt2img(PROMPT, steps=1, seed=0, progress=False)
    assert len(hashed) == 4 and len(list((tmp_path / "cache").glob("unet-*.xml"))) == 2


def test_the_patcher_keeps_only_the_files_it_read_last(model, tmp_path, monkeypatch):
    """A web session that tries many LoRAs does not keep them all in memory: past FILES_KEPT files the least recently
    used is read again when it comes back, the others are not."""
    monkeypatch.setattr(ldm.patcher, "FILES_KEPT", 2)
    patcher, reads = Patcher(copy.deepcopy(model)), Counter()
    paths = [lora_file(model, tmp_path / f"{i}.safetensors", i, text=False) for i in range(3)]
    monkeypatch.setattr(ldm.patcher, "read_lora", lambda path, m: reads.update([Path(path).name]) or [])
    for i in (0, 1, 0, 2, 0, 1):  # 1 is the least recently used when 2 comes in
        patcher.apply([Lora(paths[i])])
    assert reads == {"0.safetensors": 1, "1.safetensors": 2, "2.safetensors": 1}
