"""What the training scripts share: the Accelerator, EMA, per-sample noise, checkpoints and resume, stopping
(SIGTERM, Ctrl-C, non-finite steps), logging.

Training checkpoints are folders <output_dir>/checkpoints/step-000123/ holding `state/` (Accelerate's save_state:
models (or only their trainable tensors: checkpoint_trainable_only), optimizers, grad scaler, RNG states of every
process, and the registered objects such as EMA, LR scheduler and TrainState) plus whatever the script writes beside
it (train_unet.py: model.safetensors, the inference checkpoint, or lora.safetensors). A checkpoint is written to
step-000123.tmp/ and renamed when complete, so a crash or SIGKILL never leaves a broken latest checkpoint: `--resume
latest` takes the newest complete one. A write that fails (the disk is full) removes its partial folder and stops
the run with a one-line CheckpointError naming the previous checkpoint, which is intact.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import SAFE_MODEL_NAME, ProjectConfiguration, gather_object
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ldm.config import ConfigError, ModelConfig, apply_overrides, from_dict, load_yaml, to_dict
from ldm.data import StreamSampler, collate, ignore_stop_signals
from ldm.errors import CheckpointError
from ldm.model import StableDiffusion

CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def make_accelerator(
    output_dir: str | Path, mixed_precision: str, grad_accum: int, tracker: str, compile: bool
) -> Accelerator:
    """One Accelerator for 1..N processes (DDP; FSDP / DeepSpeed come from `accelerate config`), logging to
    <output_dir>/metrics.jsonl always and to TensorBoard or W&B as chosen."""
    if tracker != "none" and importlib.util.find_spec(tracker) is None:
        raise ConfigError(f"tracker '{tracker}' is not installed (pip install {tracker}), or set tracker=none")
    trackers = [JSONLTracker(Path(output_dir) / "metrics.jsonl")] + ([tracker] if tracker != "none" else [])
    return Accelerator(
        # several processes on a machine without GPUs (accelerate launch --multi_gpu, torchrun):
        # DDP over gloo on the CPU
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
        dynamo_backend="inductor" if compile else "no",
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(hours=2))
        ],  # the main process may build a latent cache meanwhile
    )


class JSONLTracker(GeneralTracker):
    """Each log call as one JSON line ({"step": ..., name: value}): a record that needs no viewer to read back."""

    name, requires_logging_directory, main_process_only = "jsonl", False, True

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def flat_config(values: dict, prefix: str = "") -> dict:
    """A nested config dict -> {"optim/lr": 0.0001, ...} of scalars (lists as strings): what trackers accept as
    hyperparameters."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}/")
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


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


def resume_state(
    accelerator: Accelerator, resume: Path | None, resume_spec: str | None, checkpoints: Path, state: TrainState
) -> None:
    """Load everything registered with the Accelerator from `resume`, saying so."""
    if resume is not None:
        accelerator.load_state(str(resume / "state"))
        accelerator.print(f"resumed from {resume} at step {state.step}")
    elif resume_spec == "latest":
        accelerator.print(f"no checkpoint in {checkpoints} yet: starting at step 0")


def stream_batches(dataset, cfg, accelerator: Accelerator, start: int):
    """This process's batches of the endless data stream from position `start` (see ldm.data.StreamSampler)."""
    sampler = StreamSampler(
        len(dataset), cfg.batch_size, accelerator.process_index, accelerator.num_processes, cfg.seed, start
    )
    loader = DataLoader(
        dataset,
        cfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        worker_init_fn=ignore_stop_signals,
        pin_memory=accelerator.device.type == "cuda",
    )
    return iter(loader)


def optimizer_step(
    accelerator: Accelerator, optimizer, params, max_grad_norm: float
) -> tuple[torch.Tensor | None, bool]:
    """After the last micro-batch's backward: clip (0: only measure), step, zero.
    -> (grad norm, whether the step was skipped for non-finite gradients)."""
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm or math.inf)
    finite = grad_norm is None or bool(torch.isfinite(grad_norm))
    if finite or accelerator.scaler is not None:  # fp16: the grad scaler skips the step (and lowers its scale) itself
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, not finite or optimizer.step_was_skipped


def log_image(accelerator: Accelerator, name: str, image, step: int) -> None:
    """One PIL image to every tracker that shows images (TensorBoard, W&B)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class EMA:
    """Exponential moving average of a module's parameters, kept in float32 whatever the module's dtype.

    After each optimizer step, update(): shadow = d * shadow + (1 - d) * weights with d = 0 (a plain copy) for
    the first `start_step` + 1 updates, then d = min(decay, (1 + n) / (10 + n)) after n further updates when
    `warmup` (CompVis' LitEma; the schedule of diffusers' EMAModel), else d = decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, start_step: int = 0):
        self.decay, self.warmup, self.start_step, self.updates = decay, warmup, start_step, 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        n = self.updates - self.start_step - 1
        if n <= 0:
            return 0.0
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        params = dict(model.named_parameters())
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - self.current_decay()
        )

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Inside the block the module holds the EMA weights; its own come back after."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, value in self.shadow.items():
                params[n].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    params[n].copy_(value)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "start_step": self.start_step,
            "updates": self.updates,
            "shadow": self.shadow,
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup, self.start_step, self.updates = (
            state["decay"],
            state["warmup"],
            state["start_step"],
            state["updates"],
        )
        for n, value in state["shadow"].items():
            self.shadow[n].copy_(value)


class TrainState:
    """Where a run is: optimizer steps done, samples drawn from the data stream, files skipped so far."""

    def __init__(self):
        self.step, self.samples_seen, self.skipped = 0, 0, {}

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen, self.skipped = state["step"], state["samples_seen"], dict(state["skipped"])


def skipped_report(skipped: dict[str, str]) -> str:
    """The end-of-run summary of the data: a line per skipped file with its reason, then the count of each reason.
    A name that is not UTF-8 is shown with escapes."""
    lines = [f"skipped {name}: {why}" for name, why in sorted(skipped.items())]
    counts = collections.Counter(why.split(" (")[0] for why in skipped.values())
    lines.append(
        f"{len(skipped)} files skipped"
        + (f" ({', '.join(f'{n} {why}' for why, n in sorted(counts.items()))})" if skipped else "")
    )
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


def per_sample_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn_like_per_sample(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """(len(generators), *shape) standard normal noise, row i from generator i (on CPU: same on every device)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


# ---------------------------------------------------------------- checkpoints


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


def gather_skipped(state: TrainState) -> None:
    """Every process's skipped files (name -> why) into state.skipped, on every process."""
    for part in gather_object([state.skipped]):
        state.skipped |= part


def checkpoint_run(
    accelerator: Accelerator,
    root: Path,
    state: TrainState,
    keep_last: int,
    write_extra: Callable[[Path], None],
    progress,
) -> None:
    """A trainer's checkpoint: the skipped files gathered into the saved state, then save_checkpoint at state.step."""
    gather_skipped(state)
    try:
        path = save_checkpoint(accelerator, root, state.step, keep_last, write_extra)
    except CheckpointError:  # the disk is full: the error's line goes below the progress bar, not into it
        progress.close()
        raise
    if accelerator.is_main_process:
        progress.write(f"saved checkpoint {path}")  # on a line of its own, above the progress bar


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
        (output_dir, r"\.(model|lora)\.safetensors\.[a-z0-9_]{8}\.tmp"),  # atomic_save's temp file (by mkstemp)
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


def end_training(accelerator: Accelerator) -> None:
    """accelerator.end_training(), once the caller has dropped its DDP models (`del model_ddp` first).

    A DDP model's reducer holds the process group. Freed after destroy_process_group, it would destroy the group
    itself while holding the GIL and wait for gloo's worker threads, one of which may still need the GIL to free the
    last collective's tensors: the process hangs at exit (pytorch/pytorch#56297). Freed first, it leaves the group
    to destroy_process_group, which releases the GIL while it waits."""
    accelerator.free_memory()  # the Accelerator's own references to the prepared models; collects the DDP wrappers
    accelerator.end_training()


class Stop:
    """Why a run stops before max_steps, decided after each step alike on every process, so all stop at one step:
    SIGTERM or Ctrl-C (SIGINT) -> save a checkpoint, exit 0; more than `max_nan_skips` non-finite steps in a row ->
    save the last good state (the skipped steps changed nothing), exit 1. A second Ctrl-C ends the process at once:
    the checkpoints on disk are complete (written atomically), and the next run removes what the cut write left.

    Under `accelerate launch` / torchrun the launcher gets the Ctrl-C and passes SIGINT on to every process, then
    kills them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default: raise it if a checkpoint takes longer)."""

    def __init__(self, accelerator: Accelerator, max_nan_skips: int):
        self.accelerator, self.max_nan_skips = accelerator, max_nan_skips
        self.signals, self.nan_in_a_row, self.why, self.exit_code = set(), 0, "", 0
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signals.add(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C: the kernel ends the process
            if self.accelerator.is_main_process:  # os.write: print() must not be re-entered from a handler
                os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to exit at once)\n")

    def after_step(self, step: int, skipped_step: bool) -> bool:
        """Whether the run stops now, `step` being done (or skipped for non-finite gradients)."""
        self.nan_in_a_row = self.nan_in_a_row + 1 if skipped_step else 0
        received = [float(s in self.signals) for s in (signal.SIGTERM, signal.SIGINT)]
        if self.accelerator.num_processes > 1:  # a signal to one process stops them all
            received = self.accelerator.reduce(torch.tensor(received, device=self.accelerator.device), "sum").tolist()
        if self.nan_in_a_row > self.max_nan_skips:
            self.exit_code = 1
            self.why = (
                f"error: non-finite gradients for {self.nan_in_a_row} steps in a row at step {step}: "
                "try a lower optim.lr (the last good state is saved above)"
            )
        elif any(received):
            name = "SIGTERM" if received[0] else "Ctrl-C (SIGINT)"
            self.why = f"{name}: stopped at step {step} after saving; continue with --resume latest"
        return bool(self.why)

    def end(self, progress) -> int:
        """A trainer's last call, once it has dropped its DDP models (see end_training): why the run stopped early,
        if it did, on the main process; the signal handlers as they were; -> the exit code."""
        progress.close()
        if self.why and self.accelerator.is_main_process:
            print(self.why, file=sys.stderr if self.exit_code else sys.stdout)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        end_training(self.accelerator)
        return self.exit_code
