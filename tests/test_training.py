"""Shared training pieces: EMA against diffusers' EMAModel, atomic checkpoints and resume, SIGTERM."""
import os
import signal

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers.training_utils import EMAModel

from ldm.config import ConfigError
from ldm.training import EMA, StopOnSigterm, TrainState, list_checkpoints, resolve_resume, save_checkpoint


@pytest.mark.parametrize("start_step, warmup", [(0, True), (3, True), (2, False)])
def test_ema_matches_diffusers_ema_model(start_step, warmup):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    ours = EMA(model, decay=0.9, warmup=warmup, start_step=start_step)
    ref = EMAModel([p.float() for p in model.parameters()], decay=0.9, update_after_step=start_step, use_ema_warmup=False)
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
        save_checkpoint(accelerator, root, step, keep_last=2, write_extra=lambda d: (d / "model.txt").write_text("inference model"))
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

    saved = (model.weight.detach().clone(), ema.shadow["weight"].clone(), optimizer.state_dict()["state"][0]["exp_avg"].clone())
    with torch.no_grad():
        model.weight.zero_()
        ema.shadow["weight"].zero_()
    state.step = 0
    accelerator.load_state(str(root / "step-000005" / "state"))
    assert torch.equal(model.weight, saved[0]) and torch.equal(ema.shadow["weight"], saved[1])
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved[2])
    assert (state.step, state.samples_seen, ema.updates) == (5, 20, 5)


def test_sigterm_becomes_a_flag(accelerator):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopOnSigterm()
        assert not stop.should_stop(accelerator)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(accelerator)
    finally:
        signal.signal(signal.SIGTERM, previous)
