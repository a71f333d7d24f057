"""LCM distilled into the whole UNet (train_unet.py --lcm-full): the UNet's guidance embedding against diffusers'
UNet2DConditionModel(time_cond_proj_dim), sampling against diffusers' LatentConsistencyModelPipeline, and a tiny run:
its file in diffusers, its EMA target network, its resume."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file

import train_unet
from conftest import ROOT, STEPS, assert_same, counted_run, diffusers_run, ours_run, run_in_process, tiny_model
from ldm.checkpoint import load_diffusers_folder, load_model, save_diffusers_folder, save_single_file
from ldm.config import LCMTrainConfig
from ldm.consistency import FullForm, LatentConsistency
from ldm.diffusers_names import rename, unet_key_map
from ldm.diffusion import Diffusion
from ldm.pipeline import InputError, Pipeline
from ldm.training import UNetTrainable
from ldm.unet import guidance_scale_embedding

DIM = 16  # the tiny models' w-embedding width (SD's LCMs: 256)


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """A tiny random model with the w-embedding (its time_cond_proj random and scaled up, not zero), its diffusers
    folder, and diffusers' LatentConsistencyModelPipeline of that folder."""
    model = tiny_model(overrides=(f"unet.time_cond_proj_dim={DIM}",))
    with torch.no_grad():
        model.unet.time_cond_proj.weight.mul_(10)  # as tiny_model's cross-attention: so that w visibly matters
    assert model.unet.time_cond_proj.weight.abs().min() > 0
    folder = tmp_path_factory.mktemp("lcm")
    save_diffusers_folder(model, folder)
    parts = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).components
    ref = LatentConsistencyModelPipeline(**parts | {"scheduler": LCMScheduler.from_config(parts["scheduler"].config)})
    ref.set_progress_bar_config(disable=True)
    return model, folder, ref


@pytest.mark.parametrize("dim", [DIM, 15])
def test_the_guidance_embedding_is_diffusers(dim):
    w = torch.tensor([0.0, 0.5, 4.0, 14.0])
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(guidance_scale_embedding(w, dim), theirs, rtol=0, atol=1e-6)


def test_a_unet_with_the_w_embedding_is_diffusers_through_our_export_and_import(lcm):
    """Our UNet given w = diffusers' UNet2DConditionModel(time_cond_proj_dim) given the same w's embedding as
    timestep_cond, on the weights of our exported folder; reading the folder back gives our weights."""
    model, folder, _ = lcm
    theirs = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    assert theirs.config.time_cond_proj_dim == DIM
    torch.testing.assert_close(theirs.time_embedding.cond_proj.weight, model.unet.time_cond_proj.weight, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    t, w = torch.tensor([999, 259]), torch.tensor([0.0, 7.0])
    with torch.no_grad():
        ours = model.unet(x, t, context, guidance=w)
        ref = theirs(x, t, context, timestep_cond=guidance_scale_embedding(w, DIM)).sample
        assert (ours - model.unet(x, t, context)).abs().max() > 1e-3  # w moves the prediction
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    back = load_diffusers_folder(folder)
    assert back.cfg.unet.time_cond_proj_dim == DIM
    for name, value in model.unet.state_dict().items():
        assert torch.equal(back.unet.state_dict()[name], value), name


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_lcm_sampling_of_such_a_model_is_diffusers_latent_consistency_pipeline(lcm, scale):
    """--sampler lcm = diffusers' LatentConsistencyModelPipeline (w = scale - 1 embedded, no CFG) on the same weights,
    two images; the UNet runs on the images alone at any scale (no unconditional batch)."""
    model, _, ref = lcm
    theirs, latents = diffusers_run(ref, seed=5, n=2, guidance_scale=scale)
    ours, trajectory, batches = counted_run(Pipeline(model), seed=5, n=2, sampler="lcm", scale=scale)
    assert_same(ours, theirs, trajectory[-1], latents)
    assert batches == [2] * STEPS
    other = ours_run(Pipeline(model), seed=5, n=1, sampler="lcm", scale=9.0 - scale)[1][-1]
    assert (other - trajectory[-1][:1]).abs().max() > 1e-3  # the scale reaches the UNet


def test_the_openvino_backend_refuses_such_a_model(lcm):
    """Its OpenVINO graph would take no guidance input: one InputError before any conversion."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino: pip install 'ldm[openvino]'")
    with pytest.raises(InputError, match="a model that embeds the guidance runs on the torch UNet"):
        ours_run(Pipeline(lcm[0], backend="openvino"), seed=0, n=1, sampler="lcm")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A tiny model (its UNet without the w-embedding: the teacher) as a single file, 8 captioned 16x16 images, and
    train_unet.py --lcm-full run on them for 2 steps, a checkpoint at each, validation images at 4 lcm steps."""
    root = tmp_path_factory.mktemp("lcm-full")
    teacher = tiny_model()
    save_single_file(teacher, root / "init.safetensors")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "data" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture number {i}"})
    (root / "data" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert run_in_process(train_unet, full_args(root, "straight", "max_steps=2", "validation.every=2")) == 0
    return root, teacher


def full_args(root, name, *args) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "train-unet-tiny.yaml"),
        "tracker=none",
        f"data.path={root / 'data'}",
        f"init_from={root / 'init.safetensors'}",
        "--lcm-full",
        f"lcm.time_cond_proj_dim={DIM}",
        "batch_size=4",
        "optim.warmup_steps=0",
        "save_every=1",
        "log_every=1",
        "validation.prompts=[picture number 1]",
        f"output_dir={root / name}",
        *args,
    ]


def checkpoint(run_dir, step) -> tuple[dict, dict]:
    """A checkpoint's student UNet (the trained weights) and target network."""
    state = run_dir / "checkpoints" / f"step-{step:06d}" / "state"
    custom = [torch.load(p, weights_only=True) for p in sorted(state.glob("custom_checkpoint_*.pkl"))]
    (target,) = [c for c in custom if "time_cond_proj.weight" in c]
    return load_file(state / "model.safetensors"), target


def test_a_full_lcm_run_saves_a_unet_diffusers_loads_and_its_target_is_the_students_ema(full_run, tmp_path):
    """train_unet.py --lcm-full -> model.safetensors whose UNet (with the w-embedding, trained away from zero)
    diffusers' UNet2DConditionModel(time_cond_proj_dim) loads with the same weights from our export; the target
    network after each step = 0.95 x the one before + 0.05 x the student (it starts as the student: the teacher's
    weights, the w-embedding zero)."""
    root, teacher = full_run
    out = root / "straight"
    assert (out / "validation" / "step-000002.png").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["unet"]["time_cond_proj_dim"] == DIM and config["validation"]["sampler"] == "lcm"
    model = load_model(out / "model.safetensors")
    assert model.cfg.unet.time_cond_proj_dim == DIM and model.unet.time_cond_proj.weight.abs().max() > 0
    save_diffusers_folder(model, tmp_path / "diffusers")
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "diffusers" / "unet").state_dict()
    ours = rename(model.unet.state_dict(), unet_key_map(model.cfg.unet))
    assert ours.keys() == theirs.keys() and "time_embedding.cond_proj.weight" in theirs
    for name, value in ours.items():
        assert torch.equal(theirs[name], value), name

    decay = LCMTrainConfig().target_decay
    assert decay == 0.95  # diffusers' --ema_decay
    previous = teacher.unet.state_dict() | {"time_cond_proj.weight": torch.zeros(32, DIM)}
    for step in (1, 2):
        student, target = checkpoint(out, step)
        assert target.keys() == previous.keys() == student.keys()
        for name, value in target.items():
            torch.testing.assert_close(
                value, decay * previous[name] + (1 - decay) * student[name], rtol=1e-6, atol=1e-6
            )
        assert max((target[k] - student[k]).abs().max() for k in target) > 1e-4  # the target lags the student
        previous = target


def test_a_full_lcm_run_resumes_exactly(full_run):
    """Stopped after step 1 and resumed = uninterrupted, bit for bit: the saved UNet and the target network."""
    root, _ = full_run
    assert run_in_process(train_unet, full_args(root, "resumed", "max_steps=1", "validation.every=0")) == 0
    resumed = full_args(root, "resumed", "max_steps=2", "validation.every=0", "--resume", "latest")
    assert run_in_process(train_unet, resumed) == 0
    straight, again = (
        load_file(root / "straight" / "model.safetensors"),
        load_file(root / "resumed" / "model.safetensors"),
    )
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    for a, b in zip(checkpoint(root / "straight", 2), checkpoint(root / "resumed", 2)):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["lora.rank=4"], "(lcm.full) distills the UNet of init_from: it needs lcm.enabled and init_from, without"),
        (["lcm.target_decay=1"], "lcm.target_decay must be in [0, 1), got 1.0"),
        (["model.unet.time_cond_proj_dim=1"], "unet.time_cond_proj_dim must be a whole number >= 2 or null, got 1"),
        (["--learn-sigma"], "latent consistency distillation (--lcm) distills a model without learn_sigma"),
    ],
)
def test_bad_full_lcm_input_is_one_line_and_exit_code_2(full_run, capsys, args, message):
    root, _ = full_run
    assert run_in_process(train_unet, full_args(root, "bad", *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_one_full_distillation_step_is_the_recipes(lcm, tmp_path):
    """LatentConsistency.loss with FullForm = one step of diffusers' train_lcm_distill_sd_wds.py written out here on
    diffusers' UNet2DConditionModels: the student given timestep_cond = the w-embedding, the teacher (no embedding)
    guided in the form c + w (c - u) for one DDIM step of the 50-step solver, the target network (here not the
    student: it lags it) given the embedding at the solver's next point; same weights, latents, noise, points, w."""
    student_model, folder, _ = lcm
    teacher_model = tiny_model()
    save_diffusers_folder(teacher_model, tmp_path / "teacher")
    nets = FullForm(UNetTrainable(student_model), teacher_model.unet, 0.95, torch.device("cpu"))
    with torch.no_grad():
        for p in nets.target_unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    lcm = LatentConsistency(Diffusion(student_model.cfg), LCMTrainConfig(enabled=True, full=True))
    index, w = torch.tensor([0, 31]), torch.tensor([5.5, 13.0]).reshape(2, 1, 1, 1)
    start = lcm.grid[index]
    gen = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        text = student_model.text_encoder
        context, uncond = text(text.tokenize(["a red apple", "a blue car"])), text(text.tokenize(["", ""]))
    ours = lcm.loss(nets, Diffusion(student_model.cfg).q_sample(latents, start, noise), start, w, context, uncond)

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    teacher = UNet2DConditionModel.from_pretrained(tmp_path / "teacher" / "unet")
    target_unet = UNet2DConditionModel.from_config(unet.config)
    target_unet.load_state_dict(rename(nets.target_unet.state_dict(), unet_key_map(student_model.cfg.unet)))
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    boundary = LCMScheduler.from_config(scheduler.config)
    alphas = scheduler.alphas_cumprod
    alphas_prev = torch.cat([alphas[:1], alphas[lcm.grid[:-1]]])  # the script's DDIMSolver.ddim_alpha_cumprods_prev

    def x0_eps(out, t, x):  # the script's get_predicted_original_sample / get_predicted_noise for epsilon
        a, s = alphas[t].sqrt().reshape(-1, 1, 1, 1), (1 - alphas[t]).sqrt().reshape(-1, 1, 1, 1)
        return (x - s * out) / a, out

    def consistency(out, t, x):
        c = [boundary.get_scalings_for_boundary_condition_discrete(int(i)) for i in t]
        c_skip, c_out = (torch.tensor([float(s[j]) for s in c]).reshape(-1, 1, 1, 1) for j in (0, 1))
        return c_skip * x + c_out * x0_eps(out, t, x)[0]

    w_embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w.flatten(), embedding_dim=DIM)
    with torch.no_grad():
        noisy = scheduler.add_noise(latents, noise, start)
        student = consistency(unet(noisy, start, context, timestep_cond=w_embedding).sample, start, noisy)
        x0_c, eps_c = x0_eps(teacher(noisy, start, context).sample, start, noisy)
        x0_u, eps_u = x0_eps(teacher(noisy, start, uncond).sample, start, noisy)
        pred_x0, pred_noise = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        a_prev = alphas_prev[index].reshape(-1, 1, 1, 1)
        x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise  # DDIMSolver.ddim_step
        end = (start - 20).clamp(min=0)
        target = consistency(target_unet(x_prev, end, context, timestep_cond=w_embedding).sample, end, x_prev)
        theirs = torch.mean(torch.sqrt((student - target) ** 2 + 0.001**2) - 0.001)
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-4, atol=0)
    ours.backward()
    assert nets.trainable.module.time_cond_proj.weight.grad.abs().max() > 0  # the w-embedding learns
    assert all(p.grad is None for p in [*nets.target_unet.parameters(), *nets.teacher_unet.parameters()])
