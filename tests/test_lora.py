"""LoRA and textual-inversion files against diffusers' own loaders, run here on the same random tiny model.

The files are written from diffusers' modules (their names, their shapes) with random non-zero weights; diffusers'
load_lora_weights + set_adapters (and load_textual_inversion) on diffusers' StableDiffusionPipeline are the
reference: our Pipeline must make the same image (mean |difference| <= 1/255).
"""

import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import StableDiffusionPipeline
from diffusers.loaders import single_file_utils as sfu
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

import txt2img
from conftest import LATENT_ATOL, PROMPT, compvis_original_config, tiny_model
from ldm.checkpoint import UNET, CheckpointError, save_diffusers_folder, save_single_file
from ldm.diffusers_names import rename, unet_key_map
from ldm.pipeline import Pipeline
from ldm.samplers import make_scheduler
from ldm.text_encoder import build_tokenizer

STEPS, SEED, RANK = 4, 3, 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny model, its diffusers folder and our image of PROMPT without any add-on."""
    model = tiny_model()
    folder = tmp_path_factory.mktemp("sd")
    save_diffusers_folder(model, folder)
    return model, folder, ours(Pipeline(model))


@pytest.fixture
def pipe(base):
    """Our pipeline on the shared model; its LoRAs are unloaded afterwards."""
    pipe = Pipeline(base[0])
    yield pipe
    pipe.unload_loras()


def reference(folder, pipe) -> StableDiffusionPipeline:
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.scheduler = make_scheduler("ddim", pipe.cfg)
    ref.set_progress_bar_config(disable=True)
    return ref


def ours(pipe, prompt=PROMPT) -> tuple[np.ndarray, torch.Tensor]:
    """Our image of the prompt, and its final latents."""
    trajectory = []
    image = pipe.txt2img(prompt, steps=STEPS, seed=SEED, progress=False, trajectory=trajectory)[0]
    return np.asarray(image, dtype=np.float64), trajectory[-1]


def theirs(ref, prompt=PROMPT) -> tuple[np.ndarray, torch.Tensor]:
    final = {}

    def keep(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    image = ref(
        prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), callback_on_step_end=keep
    ).images[0]
    return np.asarray(image, dtype=np.float64), final["latents"]


def assert_same_image(a: tuple, b: tuple, base: tuple) -> None:
    """Same image (mean |difference| <= 1/255 of the range) and latents; the add-on moved the latents far more."""
    assert np.abs(a[0] - b[0]).mean() <= 1, np.abs(a[0] - b[0]).mean()
    assert (a[1] - b[1]).abs().max() <= LATENT_ATOL, (a[1] - b[1]).abs().max()
    assert (a[1] - base[1]).abs().max() > 100 * LATENT_ATOL, (a[1] - base[1]).abs().max()


def layers(module: nn.Module) -> dict[str, torch.Tensor]:
    """{module path: weight} of every Linear and Conv2d (LoRA's targets)."""
    return {n: m.weight for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def random_lora(weights: dict[str, torch.Tensor], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{path: (up, down, alpha)}: down (RANK, in[, k, k]), up (out, RANK[, 1, 1]), sized so that each layer's
    update is ~0.2-0.4x its weight; alphas from 1 to 8."""
    g, out = torch.Generator().manual_seed(seed), {}
    for i, (name, w) in enumerate(weights.items()):
        down = torch.randn(RANK, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], RANK, *[1] * (w.ndim - 2), generator=g) * w.detach().std() * 0.6
        out[name] = (up, down, float(2 ** (i % 4)))
    return out


def kohya(lora: dict, prefix: str, alpha: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for name, (up, down, a) in lora.items():
        key = prefix + name.replace(".", "_")
        out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up} | (
            {f"{key}.alpha": torch.tensor(a)} if alpha else {}
        )
    return out


def peft(lora: dict, prefix: str, down: str = "lora_A.weight", up: str = "lora_B.weight") -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}.{part}": t for name, (u, d, _) in lora.items() for part, t in ((down, d), (up, u))}


def alphas(lora: dict, prefix: str) -> dict[str, float]:
    """diffusers' network_alphas of a LoRA."""
    return {f"{prefix}{name}.alpha": a for name, (_, _, a) in lora.items()}


def no_alpha(lora: dict) -> dict:
    return {name: (up, down, down.shape[0]) for name, (up, down, _) in lora.items()}


def kohya_alphas(lora: dict) -> dict:
    """The alphas kohya's trainer writes: network_alpha (here 2) on every layer, conv_alpha (8) on the kxk convs.
    (diffusers reads per-layer alphas of attention layers under wrong names, so a kohya file with alphas that vary
    inside an attention block is no oracle; the PEFT test with network alphas varies them on every layer.)"""
    return {
        name: (up, down, 8.0 if down.shape[-1] > 1 and down.ndim == 4 else 2.0) for name, (up, down, _) in lora.items()
    }


@pytest.fixture(scope="module")
def ref(base):
    return reference(base[1], Pipeline(base[0]))


@pytest.fixture(scope="module")
def loras(ref):
    """Two random LoRAs on every Linear and Conv2d of diffusers' UNet (attention, 1x1 and 3x3 convs with stride 1 and
    2, time embedding) and text encoder."""
    unet, text = layers(ref.unet), layers(ref.text_encoder)
    return [(random_lora(unet, 2 * i), random_lora(text, 2 * i + 1)) for i in range(2)]


def load_reference(ref, name: str, unet: dict, text: dict, with_alphas: bool) -> None:
    """diffusers' PEFT-format load of a LoRA (the kohya text-encoder keys are not all read by diffusers with
    transformers 5), with network alphas when asked; every layer must have taken it."""
    if with_alphas:
        ref.load_lora_into_unet(peft(unet, "unet."), alphas(unet, "unet."), ref.unet, adapter_name=name, _pipeline=ref)
        ref.load_lora_into_text_encoder(
            peft(text, "text_encoder."),
            alphas(text, "text_encoder."),
            ref.text_encoder,
            adapter_name=name,
            _pipeline=ref,
        )
    else:
        ref.load_lora_weights(peft(unet, "unet.") | peft(text, "text_encoder."), adapter_name=name)
    for model, lora in ((ref.unet, unet), (ref.text_encoder, text)):
        assert sum(name in getattr(m, "lora_A", {}) for m in model.modules()) == len(lora)


@pytest.mark.parametrize("with_alpha", [False, True])
def test_kohya_file_matches_diffusers(base, pipe, ref, loras, with_alpha, tmp_path):
    """A kohya file on every layer: diffusers' own kohya loader for the UNet part, its PEFT load for the text part."""
    unet, text = (kohya_alphas(part) for part in loras[0])
    save_file(
        kohya(unet, "lora_unet_", with_alpha) | kohya(text, "lora_te_text_model_", with_alpha),
        tmp_path / "k.safetensors",
    )
    pipe.load_lora(tmp_path / "k.safetensors", 0.7)
    try:
        ref.load_lora_weights(kohya(unet, "lora_unet_", with_alpha), adapter_name="unet")
        assert sum(hasattr(m, "lora_A") for m in ref.unet.modules()) == len(unet)  # diffusers took every layer
        load_reference(ref, "text", {}, text if with_alpha else no_alpha(text), with_alphas=True)
        ref.set_adapters(["unet", "text"], adapter_weights=[0.7, 0.7])
        assert_same_image(ours(pipe), theirs(ref), base[2])
    finally:
        ref.unload_lora_weights()


@pytest.mark.parametrize("style", ["lora_A", "lora.down with alphas"])
def test_peft_file_matches_diffusers(base, pipe, ref, loras, style, tmp_path):
    unet, text = loras[0]
    if style == "lora_A":
        state = peft(unet, "unet.") | peft(text, "text_encoder.text_model.")  # transformers 4's names, as files have
    else:
        state = peft(unet, "unet.", "lora.down.weight", "lora.up.weight") | peft(
            text, "text_encoder.", "lora.down.weight", "lora.up.weight"
        )
        state |= {k: torch.tensor(v) for k, v in (alphas(unet, "unet.") | alphas(text, "text_encoder.")).items()}
    save_file(state, tmp_path / "p.safetensors")
    pipe.load_lora(tmp_path / "p.safetensors", 1.3)
    try:
        if style == "lora_A":
            unet, text = no_alpha(unet), no_alpha(text)
        load_reference(ref, "p", unet, text, with_alphas=style != "lora_A")
        ref.set_adapters(["p"], adapter_weights=[1.3])
        assert_same_image(ours(pipe), theirs(ref), base[2])
    finally:
        ref.unload_lora_weights()


def compvis_names(model) -> dict[str, str]:
    """{diffusers module path: CompVis module path} of the UNet's layers, found by diffusers' own single-file converter
    (each weight tagged with its index)."""
    names = list(model.unet.state_dict())
    tagged = {UNET + k: torch.full(v.shape, float(i)) for i, (k, v) in enumerate(model.unet.state_dict().items())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = sfu.create_unet_diffusers_config_from_ldm(compvis_original_config(model.cfg), tagged)
    converted = sfu.convert_ldm_unet_checkpoint(tagged, config)
    return {
        k.removesuffix(".weight"): names[int(v.flatten()[0])].removesuffix(".weight")
        for k, v in converted.items()
        if k.endswith(".weight")
    }


def test_compvis_named_kohya_file_equals_diffusers_named(base, pipe, loras, tmp_path):
    unet, text = loras[0]
    to_compvis = compvis_names(base[0])
    save_file(kohya(unet, "lora_unet_") | kohya(text, "lora_te_text_model_"), tmp_path / "diffusers-names.safetensors")
    compvis = {to_compvis[name]: value for name, value in unet.items()}
    save_file(kohya(compvis, "lora_unet_") | kohya(text, "lora_te_text_model_"), tmp_path / "compvis-names.safetensors")
    pipe.load_lora(tmp_path / "diffusers-names.safetensors", 0.8)
    expected = copy.deepcopy(pipe.model.state_dict())
    pipe.unload_loras()
    pipe.load_lora(tmp_path / "compvis-names.safetensors", 0.8)
    changed = [k for k, v in pipe.model.state_dict().items() if not torch.equal(v, expected[k])]
    assert not changed and len(pipe.patcher.backups) == len(unet) + len(text)


def current_contexts(pipe) -> list:
    """The prompt cache's entries for the weights as they are now (it keys on the pipeline's weights version)."""
    return [key for key in pipe.conditioner.cache if key[-1] == pipe.version]


def test_two_loras_stack_and_unload_restores_bit_for_bit(base, pipe, ref, loras, tmp_path):
    """Their image is diffusers' with both adapters; the prompt cache, filled before, is emptied by each change."""
    before = copy.deepcopy(pipe.model.state_dict())
    ours(pipe)
    for i, (unet, text) in enumerate(loras):
        save_file(peft(unet, "unet.") | peft(text, "text_encoder."), tmp_path / f"{i}.safetensors")
        assert current_contexts(pipe)
        pipe.load_lora(tmp_path / f"{i}.safetensors", (0.6, -0.4)[i])
        assert not current_contexts(pipe)
        ours(pipe)
    try:
        for i, (unet, text) in enumerate(loras):
            load_reference(ref, f"l{i}", no_alpha(unet), no_alpha(text), with_alphas=False)
        ref.set_adapters(["l0", "l1"], adapter_weights=[0.6, -0.4])
        assert_same_image(ours(pipe), theirs(ref), base[2])
    finally:
        ref.unload_lora_weights()
    assert current_contexts(pipe)  # the prompt cache is in use...
    pipe.unload_loras()
    assert not current_contexts(pipe)  # ...and cleared when the text encoder's weights change
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())
    image, latents = ours(pipe)
    assert np.array_equal(image, base[2][0]) and torch.equal(latents, base[2][1])


def test_weight_zero_is_the_base_image(base, pipe, loras, tmp_path):
    unet, text = loras[1]
    save_file(kohya(unet, "lora_unet_") | kohya(text, "lora_te_text_model_"), tmp_path / "k.safetensors")
    pipe.load_lora(tmp_path / "k.safetensors", 0.0)
    image, latents = ours(pipe)
    assert np.array_equal(image, base[2][0]) and torch.equal(latents, base[2][1])


def bad_files(loras) -> dict[str, tuple[dict, str]]:
    """{case: (a kohya file whose first layers are good, what the error must name)}."""
    unet, _ = loras[0]
    attn = next(n for n in unet if n.endswith("attn2.to_k"))
    up, down, _ = unet[attn]
    key = "lora_unet_" + attn.replace(".", "_")
    sd2 = {f"{key}.lora_down.weight": torch.randn(RANK, 1024), f"{key}.lora_up.weight": up}
    return {
        "LoHa": ({f"{key}.hada_w1_a": up, f"{key}.hada_w1_b": down, f"{key}.alpha": torch.tensor(1.0)}, "LoHa"),
        "LoKr": ({f"{key}.lokr_w1": up, f"{key}.lokr_w2": down}, "LoKr"),
        "DoRA": ({f"{key}.dora_scale": torch.ones(1, up.shape[0])}, "DoRA"),
        "no such layer": (
            kohya({"down_blocks.7.attentions.0.proj_in": unet[attn]}, "lora_unet_"),
            "_blocks_7_attentions_0_proj_in",
        ),
        "SD2 width": (sd2, f"down {(RANK, 1024)}, but the model's weight is {tuple(up.shape[:1]) + (down.shape[1],)}"),
    }


@pytest.mark.parametrize("case", ["LoHa", "LoKr", "DoRA", "no such layer", "SD2 width"])
def test_bad_lora_is_named_and_changes_nothing(pipe, loras, case, tmp_path):
    unet, text = loras[0]
    good = kohya(dict(list(unet.items())[:5]), "lora_unet_") | kohya(text, "lora_te_text_model_")
    bad, named = bad_files(loras)[case]
    save_file(good | bad, tmp_path / "bad.safetensors")
    before = copy.deepcopy(pipe.model.state_dict())
    with pytest.raises(CheckpointError, match=f"bad.safetensors: .*{re.escape(named)}") as error:
        pipe.load_lora(tmp_path / "bad.safetensors")
    assert "\n" not in str(error.value)
    if case in ("LoHa", "LoKr", "DoRA"):
        assert "LyCORIS" in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items()) and not pipe.patcher.backups


# ---------------------------------------------------------------- LCM-LoRA files

# the layers diffusers' train_lcm_distill_lora_sd_wds.py puts an LCM-LoRA on (its LoraConfig's target_modules)
LCM_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]


@pytest.fixture(scope="module")
def lcm_lora(ref):
    """PEFT's LoRA (rank RANK, alpha 2 * RANK; alpha 3 on the time embedding by alpha_pattern) on a copy of diffusers'
    UNet at LCM-LoRA's target modules, with random non-zero weights."""
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, alpha_pattern={"time_emb_proj": 3}, target_modules=LCM_TARGETS)
    unet = get_peft_model(copy.deepcopy(ref.unet), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5 * (0.3 if "lora_B" in name else 1))
    return unet


def kohya_lcm_file(unet) -> dict[str, torch.Tensor]:
    """The file the LCM-LoRA script writes (its get_module_kohya_state_dict, as latent-consistency/lcm-lora-sdv1-5):
    PEFT's keys with lora_unet_ for base_model.model, lora_down / lora_up for lora_A / lora_B, '_' for all but the
    last two dots, and each layer's alpha (here lora_alpha everywhere, as that script's single alpha)."""
    out = {}
    for key, weight in get_peft_model_state_dict(unet).items():
        key = key.replace("base_model.model", "lora_unet").replace("lora_A", "lora_down").replace("lora_B", "lora_up")
        key = key.replace(".", "_", key.count(".") - 2)
        out[key] = weight
        if "lora_down" in key:
            out[key.split(".")[0] + ".alpha"] = torch.tensor(float(unet.peft_config["default"].lora_alpha))
    return out


def our_unet_in_diffusers_names(pipe) -> dict[str, torch.Tensor]:
    return rename(pipe.model.unet.state_dict(), unet_key_map(pipe.cfg.unet))


@pytest.mark.parametrize("layout", ["kohya", "peft", "diffusers"])
def test_lcm_lora_files_merge_as_diffusers_and_peft(base, pipe, lcm_lora, layout, tmp_path):
    """An LCM-LoRA on every module kind it adapts (each present in the tiny UNet): the kohya file as the LCM script
    writes it, and diffusers' save_lora_weights file (unet. keys, the alphas in its lora_adapter_metadata) =
    diffusers' load_lora_weights + fuse_lora; PEFT's own save_pretrained folder (adapter_model.safetensors with
    base_model.model keys, adapter_config.json with the alphas) = PEFT's merge_and_unload. Same merged weights, same
    image."""
    names = [n for n, m in lcm_lora.named_modules() if hasattr(m, "lora_A")]
    assert all(any(n.endswith("." + t) for n in names) for t in LCM_TARGETS)
    ref = reference(base[1], pipe)
    if layout in ("kohya", "diffusers"):
        path = tmp_path / "pytorch_lora_weights.safetensors"
        if layout == "kohya":
            save_file(kohya_lcm_file(lcm_lora), path)
        else:
            layers = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(lcm_lora).items()}
            metadata = lcm_lora.peft_config["default"].to_dict()
            StableDiffusionPipeline.save_lora_weights(tmp_path, layers, unet_lora_adapter_metadata=metadata)
        ref.load_lora_weights(path)
        ref.fuse_lora()
        ref.unload_lora_weights()
    else:
        lcm_lora.save_pretrained(tmp_path / "adapter")
        path = tmp_path / "adapter" / "adapter_model.safetensors"
        assert all(k.startswith("base_model.model.") for k in load_file(path))
        ref.unet.load_state_dict(copy.deepcopy(lcm_lora).merge_and_unload().state_dict())
    pipe.load_lora(path)
    expected, merged = ref.unet.state_dict(), our_unet_in_diffusers_names(pipe)
    assert not [k for k in merged if not torch.allclose(merged[k], expected[k], rtol=0, atol=1e-6)]
    assert len(pipe.patcher.backups) == len(names)
    assert_same_image(ours(pipe), theirs(ref), base[2])


# ---------------------------------------------------------------- textual inversion


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.mark.parametrize("kind", ["a1111 .pt", "diffusers 1-vector", "diffusers 2-vector", "kohya emb_params"])
def test_textual_inversion_matches_diffusers(base, kind, tmp_path):
    pipe = Pipeline(copy.deepcopy(base[0]))
    ref = reference(base[1], pipe)
    width, token = pipe.text_encoder.hidden_size, "<mystyle>"
    if kind == "a1111 .pt":
        path, data = tmp_path / "mystyle.pt", vectors(2, width, 1)
        param = torch.nn.Parameter(data)
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": param}, "name": "other", "step": 99}, path)
        token, ref_token = "mystyle", "mystyle"
    elif kind == "kohya emb_params":
        path, data, ref_token = tmp_path / "kohya.safetensors", vectors(2, width, 2), "kohya"
        save_file({"emb_params": data}, path)
        token = "kohya"
    else:
        path, data, ref_token = (
            tmp_path / "learned_embeds.safetensors",
            vectors(1 if "1-" in kind else 2, width, 3),
            None,
        )
        save_file({token: data[0] if "1-" in kind else data}, path)
    prompt = f"a {token} apple"
    assert pipe.load_embedding(path) == [token] + [f"{token}_{i}" for i in range(1, len(data))]
    ref.load_textual_inversion(str(path), token=ref_token)
    ids = pipe.text_encoder.tokenize(prompt)
    expected = ref.tokenizer(
        ref.maybe_convert_prompt(prompt, ref.tokenizer), padding="max_length", max_length=77, truncation=True
    )
    assert ids.tolist() == [expected.input_ids]
    assert_same_image(ours(pipe, prompt), theirs(ref, prompt), ours(pipe, "a apple"))
    assert len(build_tokenizer()) == 49408  # the shared tokenizer is untouched


def test_textual_inversion_bad_files(base, tmp_path):
    pipe = Pipeline(copy.deepcopy(base[0]))
    width = pipe.text_encoder.hidden_size
    save_file({"<sd2>": torch.randn(1024)}, tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointError, match=f"a 1024-d embedding, but this model's text encoder takes {width}-d"):
        pipe.load_embedding(tmp_path / "sd2.safetensors")
    save_file({"a": torch.randn(width), "b": torch.randn(width)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="two.safetensors: not a textual-inversion embedding"):
        pipe.load_embedding(tmp_path / "two.safetensors")
    save_file({"emb_params": torch.randn(2, width)}, tmp_path / "mystyle.safetensors")
    pipe.load_embedding(tmp_path / "mystyle.safetensors")
    with pytest.raises(CheckpointError, match="the token 'mystyle' is already in the vocabulary"):
        pipe.load_embedding(tmp_path / "mystyle.safetensors")
    assert pipe.load_embedding(tmp_path / "mystyle.safetensors", "mystyle2") == ["mystyle2", "mystyle2_1"]


# ---------------------------------------------------------------- txt2img.py


def png_facts(path):
    with Image.open(path) as image:
        return image.info["parameters"], json.loads(image.info["ldm"])


def test_cli_lora_and_embedding_are_recorded_and_rerun(base, loras, tmp_path, capsys):
    model = base[0]
    save_single_file(model, tmp_path / "tiny.safetensors")
    unet, text = loras[0]
    save_file(kohya(unet, "lora_unet_") | kohya(text, "lora_te_text_model_"), tmp_path / "style.safetensors")
    save_file(peft(loras[1][0], "unet."), tmp_path / "second.safetensors")
    save_file({"emb_params": vectors(2, model.cfg.text_encoder.hidden_size, 5)}, tmp_path / "emoji.safetensors")
    args = [
        "--ckpt",
        tmp_path / "tiny.safetensors",
        "--prompt",
        "an apple, in <emo> style",
        "--steps",
        STEPS,
        "--seed",
        SEED,
        "--lora",
        f"{tmp_path / 'style.safetensors'}:0.7",
        "--lora",
        tmp_path / "second.safetensors",
        "--embedding",
        f"{tmp_path / 'emoji.safetensors'}:<emo>",
        "--outdir",
        tmp_path / "out",
    ]
    assert txt2img.main([str(a) for a in args]) == 0
    text_chunk, facts = png_facts(tmp_path / "out" / "00000.png")
    assert [(f["name"], f["weight"]) for f in facts["loras"]] == [("style", 0.7), ("second", 1.0)]
    assert [(f["token"], f["vectors"]) for f in facts["embeddings"]] == [("<emo>", 2)]
    hashes = ", ".join(f"{f['name']}: {f['hash']}" for f in facts["loras"])
    assert (
        f'Lora hashes: "{hashes}"' in text_chunk
        and f'TI hashes: "<emo>: {facts["embeddings"][0]["hash"]}"' in text_chunk
    )
    assert all(len(f["hash"]) == 12 for f in facts["loras"] + facts["embeddings"])

    # the same image through the Python API, and remade from the JSON facts alone
    pipe = Pipeline(copy.deepcopy(model))
    for lora in facts["loras"]:
        pipe.load_lora(lora["file"], lora["weight"])
    pipe.load_embedding(facts["embeddings"][0]["file"], facts["embeddings"][0]["token"])
    with Image.open(tmp_path / "out" / "00000.png") as image:
        assert np.array_equal(np.asarray(image, dtype=np.float64), ours(pipe, facts["prompt"])[0])
    rerun = [
        "--ckpt",
        tmp_path / "tiny.safetensors",
        "--prompt",
        facts["prompt"],
        "--steps",
        facts["steps"],
        "--seed",
        facts["seed"],
        "--outdir",
        tmp_path / "again",
    ]
    rerun += [a for f in facts["loras"] for a in ("--lora", f"{f['file']}:{f['weight']}")]
    rerun += [a for f in facts["embeddings"] for a in ("--embedding", f"{f['file']}:{f['token']}")]
    assert txt2img.main([str(a) for a in rerun]) == 0
    with Image.open(tmp_path / "out" / "00000.png") as a, Image.open(tmp_path / "again" / "00000.png") as b:
        assert a.tobytes() == b.tobytes()


def test_cli_bad_lora_or_embedding_exits_2(base, loras, tmp_path, capsys):
    save_single_file(base[0], tmp_path / "tiny.safetensors")
    bad, _ = bad_files(loras)["LoHa"]
    save_file(bad, tmp_path / "loha.safetensors")
    save_file({"<sd2>": torch.randn(1024)}, tmp_path / "sd2.safetensors")
    cases = {
        ("--lora", tmp_path / "loha.safetensors"): "LoHa",
        ("--lora", f"{tmp_path / 'loha.safetensors'}:strong"): "must be a finite number, got 'strong'",
        ("--lora", tmp_path / "missing.safetensors"): "not found",
        ("--embedding", tmp_path / "sd2.safetensors"): "a 1024-d embedding",
    }
    for (flag, value), message in cases.items():
        args = [
            "--ckpt",
            tmp_path / "tiny.safetensors",
            "--prompt",
            "x",
            "--steps",
            1,
            flag,
            value,
            "--outdir",
            tmp_path / "out",
        ]
        assert txt2img.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_prompt_lora_tags_merge_files_from_the_lora_dir(base, loras, tmp_path, capsys):
    """A1111's `<lora:NAME:W>` in a prompt merges LORA_DIR/NAME.safetensors at W and is taken out of the text: the
    same image as --lora FILE:W; `<lora:NAME:TE_W:UNET_W>` weighs the text encoder apart; a missing NAME or a weight
    that is no number is one line, exit 2; with --prompt-syntax plain the tag is text."""
    model = base[0]
    save_single_file(model, tmp_path / "tiny.safetensors")
    unet, text = loras[0]
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    style = lora_dir / "style.safetensors"
    save_file(kohya(unet, "lora_unet_") | kohya(text, "lora_te_text_model_"), style)
    runs = iter(range(100))

    def cli_image(*args) -> tuple[np.ndarray, dict]:
        out = tmp_path / f"out{next(runs)}"
        common = ["--ckpt", tmp_path / "tiny.safetensors", "--steps", STEPS, "--seed", SEED, "--lora-dir", lora_dir]
        assert txt2img.main([str(a) for a in common + ["--outdir", out, *args]]) == 0
        with Image.open(out / "00000.png") as image:
            return np.asarray(image.convert("RGB")), json.loads(image.info["ldm"]) | {"text": image.info["parameters"]}

    tagged, facts = cli_image("--prompt", f"{PROMPT} <lora:style:0.7>")
    flagged, _ = cli_image("--prompt", PROMPT, "--lora", f"{style}:0.7")
    plain, _ = cli_image("--prompt", PROMPT)
    assert np.array_equal(tagged, flagged) and not np.array_equal(tagged, plain)  # the tiny model moves little
    assert facts["prompt"] == f"{PROMPT} <lora:style:0.7>"
    assert [(f["name"], f["weight"]) for f in facts["loras"]] == [("style", 0.7)]
    assert f'Lora hashes: "style: {facts["loras"][0]["hash"]}"' in facts["text"]

    split, facts = cli_image("--prompt", f"<lora:style:0.3:0.7>{PROMPT}")
    pipe = Pipeline(copy.deepcopy(model))
    pipe.load_lora(style, 0.7, te_weight=0.3)
    api = np.asarray(pipe.txt2img(PROMPT, steps=STEPS, seed=SEED, progress=False)[0])
    assert np.array_equal(split, api) and not np.array_equal(split, tagged)
    assert facts["loras"][0]["te_weight"] == 0.3

    literal, _ = cli_image("--prompt", f"{PROMPT} <lora:nope:1>", "--prompt-syntax", "plain")
    assert not np.array_equal(literal, plain)  # the tag's characters are prompt text
    capsys.readouterr()
    for prompt, message in [("x <lora:nope:1>", "no nope.safetensors"), ("x <lora:style:much>", "must be numbers")]:
        args = ["--ckpt", tmp_path / "tiny.safetensors", "--prompt", prompt, "--lora-dir", lora_dir, "--steps", 1]
        assert txt2img.main([str(a) for a in args + ["--outdir", tmp_path / "bad"]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: <lora:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_lcm_lora_in_png_facts_is_remade_exactly(base, lcm_lora, tmp_path):
    """An LCM-LoRA file by its `<lora:>` tag: the PNG's facts (prompt with the tag, steps, seed, the file's name and
    hash) make the same PNG again; without the LoRA the image differs."""
    save_single_file(base[0], tmp_path / "tiny.safetensors")
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    save_file(kohya_lcm_file(lcm_lora), lora_dir / "lcm-lora-sdv1-5.safetensors")

    def run(out, prompt, steps, seed):
        args = ["--ckpt", tmp_path / "tiny.safetensors", "--lora-dir", lora_dir, "--prompt", prompt, "--steps", steps]
        assert txt2img.main([str(a) for a in args + ["--seed", seed, "--outdir", tmp_path / out]]) == 0
        return png_facts(tmp_path / out / "00000.png")

    text_chunk, facts = run("first", f"{PROMPT} <lora:lcm-lora-sdv1-5:1>", STEPS, SEED)
    assert [(f["name"], f["weight"]) for f in facts["loras"]] == [("lcm-lora-sdv1-5", 1.0)]
    assert f'Lora hashes: "lcm-lora-sdv1-5: {facts["loras"][0]["hash"]}"' in text_chunk
    run("again", facts["prompt"], facts["steps"], facts["seed"])
    run("plain", PROMPT, STEPS, SEED)
    with Image.open(tmp_path / "first" / "00000.png") as a, Image.open(tmp_path / "again" / "00000.png") as b:
        assert a.tobytes() == b.tobytes()
        with Image.open(tmp_path / "plain" / "00000.png") as plain:
            assert a.tobytes() != plain.tobytes()
