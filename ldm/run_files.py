"""A training run's files: the config it reads, its output folder and its checkpoints.

Training checkpoints are folders <output_dir>/checkpoints/step-000123/ holding `state/` (Accelerate's save_state:
models (or only their trainable tensors: checkpoint_trainable_only), optimizers, grad scaler, RNG states of every
process, and the registered objects such as EMA, LR scheduler and TrainState) plus, beside it, the run's config.json
and its inference file (Trainable.file: model.safetensors, lora.safetensors or controlnet.safetensors). A
checkpoint is written to step-000123.tmp/ and renamed when complete, so a crash or SIGKILL never leaves a broken
latest checkpoint: `--resume latest` takes the newest complete one. A write that fails (the disk is full) removes
its partial folder and stops the run with a one-line CheckpointError naming the previous checkpoint, which is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME
from safetensors.torch import load_file

from ldm.config import ConfigError, ModelConfig, apply_overrides, from_dict, load_yaml, to_dict
from ldm.errors import CheckpointError
from ldm.model import StableDiffusion

CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section."""
    return base | {
        k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v for k, v in over.items()
    }


def read_train_config(
    path: Path,
    overrides: list[str],
    cls,
    load_init: Callable[[str, ModelConfig], StableDiffusion],
    mode_defaults: Callable[[dict], dict] = lambda raw: {},
):
    """Defaults <- mode_defaults(the settings) <- YAML (`model:` may name a model YAML beside it) <- overrides, into
    dataclass `cls`; with init_from, load_init(init_from, the YAML's model config) gives the start model, whose own
    config is the base of `model`. Returns the config and the init_from model, if any."""
    raw = load_yaml(path)
    if isinstance(raw.get("model"), str):
        raw["model"] = load_yaml(Path(path).parent / raw["model"])
    apply_overrides(raw, overrides)
    raw = merge(mode_defaults(raw), raw)
    cfg = from_dict(cls, raw)
    init = None
    if cfg.init_from:
        init = load_init(cfg.init_from, cfg.model)
        cfg = from_dict(cls, raw | {"model": merge(to_dict(init.cfg), raw.get("model", {}))})
    return cfg, init


def start_run(cfg, resume_spec: str | None) -> tuple[Path, Path, Path | None]:
    """Deterministic algorithms if asked -> (output_dir, its checkpoints folder, the checkpoint to resume or None).
    A run resumes only with the model config it was trained with (the checkpoint's config.json)."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output_dir {output_dir}: {e.strerror}") from None
    if not os.access(output_dir, os.W_OK):
        raise ConfigError(f"output_dir {output_dir} is not writable")
    checkpoints = output_dir / "checkpoints"
    if int(os.environ.get("RANK", "0")) == 0:  # the main process (before the Accelerator exists), alone writing there
        remove_cut_writes(output_dir, checkpoints)
    resume = resolve_resume(resume_spec, checkpoints)
    if resume is not None:
        try:
            run = json.loads((resume / "config.json").read_text())
            saved, lora = run["model"], run.get("lora", {"rank": 0})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--resume {resume}: its config.json is unreadable ({type(e).__name__}: {e})") from None
        current = to_dict(cfg.model)
        if saved != current:
            changed = sorted(k for k in saved if saved[k] != current.get(k))
            raise ConfigError(
                f"--resume {resume}: it was trained with another model config (model.{', model.'.join(changed)} differ)"
            )
        controlnet = run.get("controlnet", {}).get("enabled", False)
        if hasattr(cfg, "controlnet") and controlnet != cfg.controlnet.enabled:  # train_unet.py's ControlNet mode
            trained = ("a ControlNet", "the UNet")
            raise ConfigError(
                f"--resume {resume}: it trained {trained[not controlnet]}, "
                f"this run {trained[not cfg.controlnet.enabled]} (controlnet.enabled)"
            )
        if hasattr(cfg, "lora") and lora_layers(lora) != lora_layers(to_dict(cfg.lora)):  # train_unet.py's LoRAs
            raise ConfigError(
                f"--resume {resume}: it trained {lora_layers(lora) or 'the whole UNet'}, "
                f"this run {lora_layers(to_dict(cfg.lora)) or 'the whole UNet'} "
                "(lora.rank, lora.targets, lora.text_encoder)"
            )
    return output_dir, checkpoints, resume


def lora_layers(lora: dict) -> str:
    """What a train_unet.py config's `lora` section trains beside the frozen UNet ('' for the whole UNet)."""
    text = " and the text encoder's attention" if lora.get("text_encoder") else ""
    return f"a LoRA of rank {lora['rank']} on {', '.join(lora['targets'])}{text}" if lora["rank"] else ""


def checkpoint_trainable_only(accelerator: Accelerator) -> None:
    """From now on the Accelerator's checkpoints hold, of each prepared model, only the parameters that train (a LoRA
    run: the LoRAs, not the frozen UNet and text encoder they sit on, which init_from gives back on resume):
    save_state writes those alone into state/model[_i].safetensors and load_state puts them back; a file with other
    tensors is a CheckpointError. The optimizer, EMA, RNG states and the rest are saved as ever."""

    def trainable(model: nn.Module) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def keep_trainable(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        for model, state in zip(models, weights):  # weights: the state dicts Accelerate is about to write
            for key in state.keys() - trainable(model):
                del state[key]

    def load_trainable(models: list[nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors"
            state = load_file(path)
            if state.keys() != trainable(model):
                raise CheckpointError(
                    f"{path} holds {len(state)} tensors, not the {len(trainable(model))} this run trains "
                    "(resume with the LoRA settings it was trained with)"
                )
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded: Accelerate's own load would ask for every tensor of the models

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary and half-deleted folders are not listed)."""
    found = [
        (int(m.group(1)), p) for p in Path(root).glob("step-*") if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str | None, root: Path) -> Path | None:
    """--resume latest -> the newest complete checkpoint under root (None when there is none yet);
    PATH -> that checkpoint."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if path.name == "state":
        path = path.parent
    if path.name.endswith(".tmp"):
        raise ConfigError(
            f"--resume {spec}: an unfinished checkpoint (its write was cut short); "
            "use a complete one, or --resume latest"
        )
    if not (path / "state").is_dir():
        raise ConfigError(f"--resume {spec}: not a training checkpoint (no state/ folder inside)")
    return path


def save_checkpoint(
    accelerator: Accelerator, root: Path, step: int, keep_last: int, write_extra: Callable[[Path], None]
) -> Path:
    """Write checkpoint step-<step> atomically on every process's behalf; keep the newest `keep_last`.

    Every process takes part (each saves its RNG state; with FSDP/DeepSpeed each its shard); the main process
    alone calls write_extra(folder) and renames step-N.tmp to step-N once all have finished.
    """
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    previous = list_checkpoints(root)
    intact = (
        f"the previous checkpoint {previous[-1]} is intact (--resume latest continues from it)"
        if previous
        else "there is no earlier checkpoint"
    )
    try:
        with writing(root, f"checkpoint {final.name}", intact):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp / "state"))
            if accelerator.is_main_process:
                write_extra(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial checkpoint stays behind, taking up the space
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a step saved again after a resume from an older checkpoint
            _remove(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def writing(folder: Path, what: str, intact: str):
    """A failed write under `folder` for want of space (or another OS error) -> a one-line CheckpointError:
    "<why> while writing <what>: <intact>". torch.save and safetensors report a full disk without an errno,
    so for their errors the free space decides."""
    try:
        yield
    except Exception as e:
        if isinstance(e, OSError):
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        elif shutil.disk_usage(folder).free < 2**20:
            full = True
        else:
            raise
        why = "the disk is full" if full else " ".join(str(e).split())
        raise CheckpointError(f"{why} while writing {what}: {intact}") from None


def remove_cut_writes(output_dir: Path, checkpoints: Path) -> None:
    """Remove what writes of an earlier run of output_dir, killed midway, left behind, saying so: names of our own
    making only, never a user's file."""
    ours = [
        (
            output_dir,
            r"\.(model|lora|controlnet)\.safetensors\.[a-z0-9_]{8}\.tmp",
        ),  # atomic_save's temp file (by mkstemp)
        (checkpoints, r"step-\d+\.tmp|\.step-\d+\.deleting"),
    ]  # a checkpoint not yet renamed; one being removed
    for folder, pattern in ours:
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if re.fullmatch(pattern, path.name) and not path.is_symlink():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                print(f"removed {path}: left by a write that was cut short")


def _remove(folder: Path) -> None:
    """Rename first, so that a crash halfway through never leaves a partial folder under a checkpoint's name."""
    trash = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)
    shutil.rmtree(trash)
