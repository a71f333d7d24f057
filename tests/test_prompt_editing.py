"""Prompt editing, alternation and AND on whole images, against diffusers on the same random weights.

Prompt editing and alternation: diffusers' StableDiffusionPipeline given the texts of each step (worked out by hand
from A1111's rules, ldm.prompts.schedule) as its own text encoder encodes them, swapped in `callback_on_step_end`
(prompt_embeds, the negative half in front) before the step that uses them. AND: a loop written here on diffusers'
UNet2DConditionModel and its scheduler, combining the UNet's outputs as A1111's composable diffusion does.
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from conftest import LATENT_ATOL, a1111, assert_same, cli, generators, tiny_model
from ldm.checkpoint import save_diffusers_folder, save_single_file
from ldm.pipeline import InputError, Pipeline
from ldm.prompts import prompt_contexts
from ldm.samplers import make_scheduler

N = 6  # steps
SCALE = 7.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model = tiny_model()
    folder = tmp_path_factory.mktemp("tiny")
    save_diffusers_folder(model, folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return Pipeline(model), ref


def embeds(ref, texts: list[str]) -> torch.Tensor:
    """diffusers' own text encoding of each text: (len(texts), 77, d)."""
    return ref.encode_prompt(texts, "cpu", 1, False)[0]


def ours(pipe, prompts, negative_prompt="", seed=3, **options):
    """Our images and final latents (DDIM, N steps, scale SCALE unless options say otherwise)."""
    trajectory = []
    options = {"steps": N, "scale": SCALE, "sampler": "ddim"} | options
    images = pipe.txt2img(
        prompts, negative_prompt=negative_prompt, seed=seed, progress=False, trajectory=trajectory, **options
    )
    return images, trajectory[-1]


def steps(*spans: tuple[int, str]) -> list[str]:
    """The text of each of the N steps from (how many steps, text) spans."""
    texts = [text for count, text in spans for _ in range(count)]
    assert len(texts) == N
    return texts


# prompts, negative prompt -> each image's text at steps 0..5, the negative prompt's (6 steps)
EDITS = {
    "fraction": (["a [red:green:0.5] apple"], "", [steps((4, "a red apple"), (2, "a green apple"))], None),
    "step": (["a [red:green:2] apple"], "", [steps((3, "a red apple"), (3, "a green apple"))], None),
    "to": (["a [green:2] apple"], "", [steps((3, "a  apple"), (3, "a green apple"))], None),
    "from": (["a [red::0.5] apple"], "", [steps((4, "a red apple"), (2, "a  apple"))], None),
    "nested": (
        ["a [red:[green:blue:4]:1] apple"],
        "",
        [steps((2, "a red apple"), (3, "a green apple"), (1, "a blue apple"))],
        None,
    ),
    "negative": (["a red apple"], "[dark:bright:0.5]", None, steps((4, "dark"), (2, "bright"))),
    "alternation": (
        ["a [red|green|blue] apple"],
        "",
        [["a red apple", "a red apple", "a green apple", "a blue apple", "a red apple", "a green apple"]],
        None,
    ),
    "batch": (  # two prompts with their own schedules in one sub-batch, and an edited negative prompt
        ["a [red:green:3] apple", "a [cat|dog]"],
        "[dark::1]",
        [steps((4, "a red apple"), (2, "a green apple")), ["a cat", "a cat", "a dog", "a cat", "a dog", "a cat"]],
        steps((2, "dark"), (4, "")),
    ),
}


def diffusers_edited(ref, texts: list[list[str]], negatives: list[str], seed: int):
    """diffusers' images and final latents (N steps), image i's text at UNet call s texts[i][s], the negative prompt's
    negatives[s]: the embeddings of call s + 1 swapped in at the end of call s."""

    def contexts(step: int) -> torch.Tensor:
        return torch.cat([embeds(ref, [negatives[step]] * len(texts)), embeds(ref, [t[step] for t in texts])])

    final = {}

    def swap(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        if i + 1 < len(negatives):
            tensors["prompt_embeds"] = contexts(i + 1)
        return tensors

    first = contexts(0)
    images = ref(
        prompt_embeds=first[len(texts) :],
        negative_prompt_embeds=first[: len(texts)],
        num_inference_steps=N,
        guidance_scale=SCALE,
        generator=generators(seed, len(texts)),
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    ).images
    return images, final["latents"]


@pytest.mark.parametrize("case", EDITS)
def test_prompt_editing_and_alternation_match_diffusers_with_embeddings_swapped_per_step(models, case):
    """Each form of A1111's schedule gives diffusers' image with the embeddings swapped as the schedule says; the
    swap matters (the image of the first texts alone is another, beyond 10x the tolerance)."""
    pipe, ref = models
    prompts, negative, texts, negatives = EDITS[case]
    texts = texts or [[p] * N for p in prompts]
    negatives = negatives or [negative] * N
    ref.scheduler = make_scheduler("ddim", pipe.cfg)
    images, latents = ours(pipe, prompts, negative)
    theirs, their_latents = diffusers_edited(ref, texts, negatives, seed=3)
    assert_same(images, theirs, latents, their_latents)
    unedited = ours(pipe, [t[0] for t in texts], negatives[0])[1]
    assert (latents - unedited).abs().max() > 10 * LATENT_ATOL


def test_a_second_order_sampler_schedules_over_twice_the_steps(models):
    """Heun: A1111's schedule runs over total_steps = 2N = 12 (second-order samplers), counted by the UNet's 2N - 1
    calls (diffusers' Heun timesteps): [red:green:0.5] switches after call int(0.5 * 12) = 6."""
    pipe, ref = models
    ref.scheduler = make_scheduler("heun", pipe.cfg)
    images, latents = ours(pipe, ["a [red:green:0.5] apple"], sampler="heun")
    theirs, their_latents = diffusers_edited(ref, [["a red apple"] * 7 + ["a green apple"] * 4], [""] * 11, seed=3)
    assert_same(images, theirs, latents, their_latents)


@pytest.mark.parametrize("scale", [SCALE, 1.0])
def test_and_with_weights_is_composable_diffusion_on_diffusers_unet(models, scale):
    """A prompt with AND and weights beside one without, in one sub-batch: each image is the loop written here on
    diffusers' UNet and DDIM scheduler, e = e_u + s * sum_i w_i (e_c_i - e_u) (A1111's combine_denoised), at any
    scale (1 too: AND still needs the negative prompt's prediction)."""
    pipe, ref = models
    prompts = ["a red apple AND a wooden table:0.6 AND blue sky :-0.3", "a cat"]
    subs = [[("a red apple", 1.0), (" a wooden table", 0.6), (" blue sky", -0.3)], [("a cat", 1.0)]]
    _, latents = ours(pipe, prompts, "blurry", seed=4, scale=scale)
    scheduler = make_scheduler("ddim", pipe.cfg)
    for image, sub in enumerate(subs):
        scheduler.set_timesteps(N)
        z = torch.randn(latents[:1].shape, generator=torch.Generator().manual_seed(4 + image))
        z = z * scheduler.init_noise_sigma
        uncond, cond = embeds(ref, ["blurry"]), embeds(ref, [text for text, _ in sub])
        weights = torch.tensor([w for _, w in sub]).view(-1, 1, 1, 1)
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(z, t)
                e_u = ref.unet(x, t, encoder_hidden_states=uncond).sample
                e_c = ref.unet(x.expand(len(sub), -1, -1, -1), t, encoder_hidden_states=cond).sample
                e = e_u + scale * (weights * (e_c - e_u)).sum(0, keepdim=True)
                z = scheduler.step(e, t, z).prev_sample
        assert (latents[image] - z[0]).abs().max() <= LATENT_ATOL
    first_alone = ours(pipe, ["a red apple", "a cat"], "blurry", seed=4, scale=scale)[1]
    assert (latents[0] - first_alone[0]).abs().max() > 10 * LATENT_ATOL


def test_and_runs_one_batched_unet_call_per_step(models):
    """The negative prompt's row and one row per sub-prompt: one UNet call of 1 + 3 rows a step."""
    pipe, _ = models
    batches = []
    handle = pipe.unet.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    ours(pipe, ["a AND b AND c"])
    handle.remove()
    assert batches == [4] * N


@pytest.mark.parametrize("options", [{"cfg_end": 0.5}, {"guess_mode": True}])
def test_and_refuses_a_cfg_end_and_guess_mode(models, options):
    pipe, _ = models
    message = r"^AND needs the negative prompt's prediction on every step: cfg end 1, no guess mode$"
    with pytest.raises(InputError, match=message):
        ours(pipe, ["a AND b"], **options)


def test_each_distinct_text_is_encoded_once(models, monkeypatch):
    """Alternation over 6 steps and an edited negative prompt: 2 + 2 texts, each through the text encoder once."""
    pipe, _ = models
    pipe.conditioner.cache.clear()
    encoded = []

    def recording(text_encoder, prompts, *args):
        encoded.extend(prompts)
        return prompt_contexts(text_encoder, prompts, *args)

    monkeypatch.setattr("ldm.conditioning.prompt_contexts", recording)
    ours(pipe, ["a [red|green] apple"], "[dark:bright:2]")
    assert sorted(encoded) == ["a green apple", "a red apple", "bright", "dark"]


def test_prompts_without_the_new_syntax_are_one_context_as_before(models, monkeypatch):
    """Emphasis, BREAK, stray brackets and colons, plain syntax: one context for every step, today's encode_prompts
    call, bit for bit; syntax "plain" reads edits, alternation and AND as text."""
    pipe, _ = models
    calls = []
    encode = pipe.conditioner.encode_prompts
    monkeypatch.setattr(pipe.conditioner, "encode_prompts", lambda *args: calls.append(args) or encode(*args))
    prompts = ["a (red:1.3) apple BREAK on a table", "a ]b[ c: d", "(x) [y]"]
    for syntax, batch in (("a1111", prompts), ("plain", ["a [red:green:2] apple AND [b|c]:0.5"])):
        calls.clear()
        conditioning = pipe.conditioner(batch, "blurry", True, syntax, steps=N)
        assert len(calls) == 1 and len(conditioning.schedule) == 1 and conditioning.weights is None
        assert torch.equal(conditioning.context(0), encode(batch, "blurry", True, syntax))


def test_the_png_keeps_the_prompt_as_typed_which_remakes_the_image(tmp_path):
    """txt2img writes the prompts with their syntax into A1111's parameters text; read back, they remake the image;
    --prompt-syntax plain reads the same text literally: another image."""
    ckpt = tmp_path / "tiny.safetensors"
    save_single_file(tiny_model(), ckpt)
    prompt, negative = "a [red:green:0.5] apple, [white|yellow] AND a leaf:0.5", "[blurry::2]"
    run = ["--ckpt", ckpt, "--steps", N, "--seed", 1, "--sampler", "ddim"]
    assert cli(*run, "--prompt", prompt, "--negative-prompt", negative, "--outdir", tmp_path / "a") == 0
    text = a1111(Image.open(tmp_path / "a" / "00000.png").text["parameters"])
    assert (text["Prompt"], text["Negative prompt"], text["Steps"]) == (prompt, negative, str(N))
    again = ["--prompt", text["Prompt"], "--negative-prompt", text["Negative prompt"]]
    assert cli(*run, *again, "--outdir", tmp_path / "b") == 0
    assert cli(*run, *again, "--prompt-syntax", "plain", "--outdir", tmp_path / "c") == 0
    a, b, c = (np.asarray(Image.open(tmp_path / name / "00000.png")) for name in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
