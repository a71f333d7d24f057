"""Shared training pieces: EMA against diffusers' EMAModel, atomic checkpoints and resume, stopping (signals,
non-finite steps), what cut writes leave."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from ldm.config import ConfigError, TrainUNetConfig, to_dict
from ldm.ema import EMA
from ldm.run_files import list_checkpoints, resolve_resume, save_checkpoint, start_run
from ldm.training import Stop, TrainState


@pytest.mark.parametrize("start_step, warmup", [(0, True), (3, True), (2, False)])
def test_ema_matches_diffusers_ema_model(start_step, warmup):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    ours = EMA(model, decay=0.9, warmup=warmup, start_step=start_step)
    ref = EMAModel(
        [p.float() for p in model.parameters()], decay=0.9, update_after_step=start_step, use_ema_warmup=False
    )
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        if warmup:
            ref.step([p.float() for p in model.parameters()])
        else:  # diffusers always warms up: without warmup, decay is the constant once copying stops
            ref.optimization_step += 1
            d = 0.0 if ref.optimization_step - start_step - 1 <= 0 else 0.9
            ref.shadow_params = [s - (1 - d) * (s - p.float()) for s, p in zip(ref.shadow_params, model.parameters())]
        for s, r in zip(ours.shadow.values(), ref.shadow_params):
            assert s.dtype == torch.float32
            torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-6)


def test_ema_applied_to_swaps_in_and_back():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model)
    before = model.weight.detach().clone()
    ema.shadow["weight"].add_(1.0)
    with ema.applied_to(model):
        torch.testing.assert_close(model.weight, before + 1.0)
    assert torch.equal(model.weight, before)


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path, accelerator):
    model, state = torch.nn.Linear(3, 2), TrainState()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model)
    accelerator.register_for_checkpointing(state, ema)
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        ema.update(model)
        state.step, state.samples_seen = step, 4 * step
        save_checkpoint(
            accelerator, root, step, keep_last=2, write_extra=lambda d: (d / "model.txt").write_text("inference model")
        )
    assert [p.name for p in list_checkpoints(root)] == ["step-000004", "step-000005"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000005"]
    assert (root / "step-000005" / "model.txt").read_text() == "inference model"

    (root / "step-000006.tmp" / "state").mkdir(parents=True)  # what a kill mid-write leaves behind
    (root / "step-000006.tmp" / "state" / "optimizer.bin").write_bytes(b"\x00" * 10)
    assert resolve_resume("latest", root) == root / "step-000005"
    assert resolve_resume(str(root / "step-000004" / "state"), root) == root / "step-000004"
    assert resolve_resume("latest", tmp_path / "nothing") is None and resolve_resume(None, root) is None
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        resolve_resume(str(tmp_path), root)

    saved = (
        model.weight.detach().clone(),
        ema.shadow["weight"].clone(),
        optimizer.state_dict()["state"][0]["exp_avg"].clone(),
    )
    with torch.no_grad():
        model.weight.zero_()
        ema.shadow["weight"].zero_()
    state.step = 0
    accelerator.load_state(str(root / "step-000005" / "state"))
    assert torch.equal(model.weight, saved[0]) and torch.equal(ema.shadow["weight"], saved[1])
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved[2])
    assert (state.step, state.samples_seen, ema.updates) == (5, 20, 5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_after_its_step(accelerator, sig):
    """SIGTERM or Ctrl-C: a flag read after the step (exit 0); after a first Ctrl-C the next one is the default's (the
    kernel ends the process at once); the handlers are given back at the end."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = Stop(accelerator, max_nan_skips=3)
    try:
        assert not stop.after_step(1, skipped_step=False)
        os.kill(os.getpid(), sig)
        assert stop.after_step(2, skipped_step=False)
        name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C (SIGINT)"
        assert stop.why == f"{name}: stopped at step 2 after saving; continue with --resume latest"
        assert signal.getsignal(signal.SIGINT) == (signal.SIG_DFL if sig == signal.SIGINT else stop._handle)
    finally:
        assert stop.end(tqdm(disable=True)) == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_too_many_non_finite_steps_in_a_row_stop_the_run(accelerator):
    stop = Stop(accelerator, max_nan_skips=2)
    assert not any(stop.after_step(step, skipped) for step, skipped in enumerate([True, True, False, True, True], 1))
    assert stop.after_step(6, skipped_step=True) and stop.end(tqdm(disable=True)) == 1
    assert stop.why.startswith("error: non-finite gradients for 3 steps in a row at step 6: try a lower optim.lr")


CUT_WRITE = """
import os, sys, torch
import ldm.io
real = ldm.io.save_file
def save_file(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    os.kill(os.getpid(), 9)  # killed before the rename
ldm.io.save_file = save_file
ldm.io.atomic_save({"x": torch.ones(3)}, sys.argv[1], {})
"""


def test_a_new_run_removes_what_cut_writes_left_and_nothing_else(tmp_path):
    """A final write killed midway leaves its hidden temp file; a checkpoint write, its step-N.tmp folder; a removal,
    its .step-N.deleting folder. The next run of the output dir removes those, and no file of another name."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", CUT_WRITE, str(out / "model.safetensors")], capture_output=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.safetensors.") and left[0].endswith(".tmp")
    for name in ("step-000003.tmp/state", ".step-000001.deleting", "step-000002/state"):
        (out / "checkpoints" / name).mkdir(parents=True)
    users = [
        ".model.safetensors.tmp",
        ".model.safetensors.my-copy.tmp",
        "model.safetensors.tmp",
        "notes.tmp",
        "checkpoints/x.tmp",
    ]
    for name in users:
        (out / name).write_text("mine")
    cfg = TrainUNetConfig(output_dir=str(out))
    (out / "checkpoints" / "step-000002" / "config.json").write_text(json.dumps({"model": to_dict(cfg.model)}))
    assert start_run(cfg, "latest") == (out, out / "checkpoints", out / "checkpoints" / "step-000002")
    kept = sorted(users + ["checkpoints/step-000002/config.json"])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "x.tmp"]
