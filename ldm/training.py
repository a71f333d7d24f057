"""What the training scripts share: a `Run` (the Accelerator, optimizers, EMA, the data stream, logging, checkpoints
and resume, stopping on SIGTERM, Ctrl-C or non-finite steps, the inference file and the end-of-run report) and the
`Trainable` it trains (the whole UNet, a LoRA, a ControlNet, the VAE and its PatchGAN); per-sample noise.

The run's config, folder and checkpoints (atomic writes, resume, a full disk) are in ldm.run_files, the EMA in ldm.ema.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import os
import resource
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm.checkpoint import save_single_file
from ldm.config import ConfigError, LoRAConfig, to_dict
from ldm.controlnet import Control, ControlNet, save_controlnet
from ldm.data import StreamSampler, collate, ignore_stop_signals
from ldm.ema import EMA
from ldm.errors import CheckpointError
from ldm.lora import add_lora, save_lora
from ldm.model import StableDiffusion
from ldm.run_files import checkpoint_trainable_only, list_checkpoints, save_checkpoint, start_run, writing
from ldm.shards import Shards
from ldm.stream import Stream


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


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class TrainState:
    """Where a run is: optimizer steps done, samples drawn from the data stream, files skipped so far, and the
    number of processes that drew them (0: not known, a checkpoint from before it was kept)."""

    def __init__(self, world: int = 1):
        self.step, self.samples_seen, self.skipped, self.world = 0, 0, {}, world

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped": self.skipped, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen, self.skipped = state["step"], state["samples_seen"], dict(state["skipped"])
        self.world = state.get("world", 0)


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


def gather_skipped(state: TrainState) -> None:
    """Every process's skipped files (name -> why) into state.skipped, on every process."""
    for part in gather_object([state.skipped]):
        state.skipped |= part


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
        """Run.end's last call, once the run has dropped its DDP models (see end_training): why the run stopped early,
        if it did, on the main process; the signal handlers as they were; -> the exit code."""
        progress.close()
        if self.why and self.accelerator.is_main_process:
            print(self.why, file=sys.stderr if self.exit_code else sys.stdout)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        end_training(self.accelerator)
        return self.exit_code


# ---------------------------------------------------------------- what trains


class Trainable:
    """What a run trains, as the whole model's file: `module` (what the optimizer steps, the EMA follows and `save`
    writes: a UNet, a VAE, a PatchGAN) inside `model`. `nets` are the modules the gradient goes through: Run.prepare
    wraps them for DDP into `ddp`, in this order (the checkpoints' state/model.safetensors, model_1.safetensors...).
    Called, it runs the first of them; `what` and `file` name the inference file."""

    what, file, trainable_only = "model", "model.safetensors", False

    def __init__(self, model: StableDiffusion | None, module: nn.Module, params: list | None = None, nets=None):
        self.model, self.module = model, module
        self.params = list(module.parameters()) if params is None else params
        self.nets = self.ddp = nets or [module]

    def __call__(self, *inputs):
        return self.ddp[0](*inputs)

    def save(self, path: Path, step: int) -> None:
        save_single_file(self.model, path)


class UNetTrainable(Trainable):
    """The whole UNet of a text-to-image model trains; the VAE and the text encoder stay frozen."""

    def __init__(self, model: StableDiffusion, module: nn.Module | None = None, nets=None):
        super().__init__(model, model.unet if module is None else module, nets=nets)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The prompts' states under the frozen text encoder."""
        with torch.no_grad():
            return self.model.text_encoder(tokens)

    def predict(self, x_t, t, context, hint):
        """The UNet's output for x_t at t (`hint`: the batch's control maps, or None)."""
        return self.ddp[0](x_t, t, context)

    def samples(self, pipe, prompts: list[str], seed: int, options: dict, dataset) -> list[Image.Image]:
        """The validation images, drawn in eval mode (`pipe`: a Pipeline of the model; `dataset`: the training
        images)."""
        self.model.unet.eval(), self.module.eval()
        images = self.draw(pipe, prompts, seed, options, dataset)
        self.model.unet.train(), self.module.train()
        return images

    def draw(self, pipe, prompts: list[str], seed: int, options: dict, dataset) -> list[Image.Image]:
        """Prompt i drawn with seed + i."""
        return pipe.txt2img(prompts, seed=seed, **options)


class LoRATrainable(UNetTrainable):
    """LoRAs beside the frozen UNet (ldm.lora.add_lora), and the text encoder's with lora.text_encoder: its LoRAs go
    through DDP as the UNet's, so their gradients are averaged too. The checkpoints hold the LoRAs alone (init_from
    gives the frozen weights back on resume); saved as a kohya file."""

    what, file, trainable_only = "LoRA", "lora.safetensors", True

    def __init__(self, model: StableDiffusion, cfg: LoRAConfig, title: str):
        nets = [model.unet] + ([model.text_encoder] if cfg.text_encoder else [])
        super().__init__(model, add_lora(model, cfg), nets)
        self.title = title

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ddp[1](tokens) if len(self.ddp) > 1 else super().encode(tokens)

    def save(self, path: Path, step: int) -> None:
        save_lora(self.module, path, self.title, step)


class ControlNetTrainable(UNetTrainable):
    """A ControlNet beside the frozen model: the frozen UNet, its skips and middle block plus the ControlNet's
    residuals, from the batch's control maps ((B, 3, H, W) in [0, 1]); saved in lllyasviel's layout."""

    what, file = "ControlNet", "controlnet.safetensors"

    def __init__(self, model: StableDiffusion, controlnet: ControlNet, device: torch.device):
        model.unet.requires_grad_(False).to(device)
        super().__init__(model, controlnet)

    def predict(self, x_t, t, context, hint):
        return self.model.unet(x_t, t, context, control=self.ddp[0](x_t, hint.to(x_t.device), t, context))

    def save(self, path: Path, step: int) -> None:
        save_controlnet(self.module, path)

    def draw(self, pipe, prompts: list[str], seed: int, options: dict, dataset) -> list[Image.Image]:
        """For prompt i the control map of training item i, then the image drawn with it and seed + i."""
        images = []
        for i, prompt in enumerate(prompts):
            hint = dataset[(i % len(dataset), seed)]["hint"]
            control = Image.fromarray((hint * 255).round().byte().permute(1, 2, 0).numpy())
            images += [
                control,
                *pipe.txt2img([prompt], seed=seed + i, **options, controls=[Control(self.module, control)]),
            ]
        return images


# ---------------------------------------------------------------- the run


class Run:
    """One training run, shared by the trainers, so the order of its steps exists once:

        run = Run(cfg, "train_unet", args.resume, fine_tune)   # output_dir, Accelerator, seed
        ... the models, the data ...
        run.prepare(trainable)                                 # optimizer, LR schedule, DDP, EMA, resume
        for batch in run.batches(dataset):                     # stops at max_steps, on a signal, on NaN steps
            with run.accumulate():
                loss = ...
                run.step(loss, {"loss": loss})                 # backward; optimizer step at the last micro-batch
        return run.end()                                       # the inference file, the report -> exit code

    Between batches it does, after each optimizer step: the LR schedules, EMA, progress, logging, validation images,
    the stop conditions and the checkpoints. A fine-tune (`fine_tune`: its weights are a usable model at every step)
    stopped by a signal also writes its inference file into output_dir, where the next command looks for it."""

    def __init__(self, cfg, name: str, resume_spec: str | None, fine_tune: bool, shown: str = "loss"):
        self.cfg, self.name, self.resume_spec, self.fine_tune, self.shown = cfg, name, resume_spec, fine_tune, shown
        self.output_dir, self.checkpoints, self.resume = start_run(cfg, resume_spec)
        self.accelerator = make_accelerator(
            self.output_dir, cfg.mixed_precision, cfg.grad_accum, cfg.tracker, cfg.compile
        )
        self.device, self.ema = self.accelerator.device, None
        self.state = TrainState(self.accelerator.num_processes)
        set_seed(cfg.seed)  # the same fresh weights on every process

    def prepare(self, *trainables: Trainable, extra_state: tuple = ()) -> None:
        """An AdamW and an LR schedule for each part (the first is the model; the VAE's PatchGAN is a second), their
        nets wrapped for DDP, the first part's EMA, and everything registered for checkpoints; then the resume.
        The LR schedules are stepped once per step by the run, not per process."""
        cfg, accelerator = self.cfg, self.accelerator
        o = cfg.optim
        optimizers = [
            torch.optim.AdamW(t.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
            for t in trainables
        ]
        self.schedulers = [
            get_scheduler(o.lr_scheduler, opt, num_warmup_steps=o.warmup_steps, num_training_steps=cfg.max_steps)
            for opt in optimizers
        ]
        prepared = accelerator.prepare(*[net for t in trainables for net in t.nets], *optimizers)
        self.optimizers, i = prepared[len(prepared) - len(trainables) :], 0
        for t in trainables:
            t.ddp, i = prepared[i : i + len(t.nets)], i + len(t.nets)
        inside = {id(p) for t in trainables for net in t.nets for p in net.parameters()}
        self.outside = [[p for p in t.params if id(p) not in inside] for t in trainables]  # averaged by hand
        self.trainables, self.trained = trainables, trainables[0]
        if self.trained.trainable_only:
            checkpoint_trainable_only(accelerator)
        if cfg.ema.enabled:
            self.ema = EMA(self.trained.module, cfg.ema.decay, cfg.ema.warmup, cfg.ema.start_step)
        accelerator.register_for_checkpointing(
            *self.schedulers, self.state, *extra_state, *([self.ema] if self.ema else [])
        )
        if self.resume is not None:
            accelerator.load_state(str(self.resume / "state"))
            accelerator.print(f"resumed from {self.resume} at step {self.state.step}")
        elif self.resume_spec == "latest":
            accelerator.print(f"no checkpoint in {self.checkpoints} yet: starting at step 0")

    def ema_weights(self):
        """A block in which the trained module holds its EMA weights (if the run keeps an EMA)."""
        return self.ema.applied_to(self.trained.module) if self.ema else contextlib.nullcontext()

    def accumulate(self):
        """The block of one micro-batch: DDP synchronises the gradients at the last one of a step only."""
        return self.accelerator.accumulate(*[net for t in self.trainables for net in t.ddp])

    def loader(self, dataset) -> DataLoader:
        """This process's batches from where the run is: webdataset shards (ldm.shards.Shards, an iterable of
        batches) or a `datasets` stream (ldm.stream.Stream, the same), or a dataset read by index through
        ldm.data.StreamSampler."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        options = dict(
            num_workers=cfg.data.num_workers,
            worker_init_fn=ignore_stop_signals,
            pin_memory=accelerator.device.type == "cuda",
        )
        if isinstance(dataset, (Shards, Stream)):
            if state.world and state.world != accelerator.num_processes:
                accelerator.print(
                    f"note: the checkpoint drew its shards on {state.world} process(es), this run has "
                    f"{accelerator.num_processes}: it goes on from sample {state.samples_seen} of the stream, but the "
                    "shards are shared out anew, so the samples of each step from here on differ from what a run on "
                    f"{state.world} would draw (resume on {state.world} for exactly that order)"
                )
            state.world, dataset.start = accelerator.num_processes, state.samples_seen
            return DataLoader(dataset, batch_size=None, **options)
        rank, world = accelerator.process_index, accelerator.num_processes
        sampler = StreamSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed, state.samples_seen)
        return DataLoader(dataset, cfg.batch_size, sampler=sampler, collate_fn=collate, **options)

    def order_record(self):
        """data.record_order: <output_dir>/data-order-RANK.jsonl opened for appending, cut back to the rows of the
        steps this run starts from (so it always describes the run that made the weights); else None."""
        if not self.cfg.data.record_order:
            return None
        path = self.output_dir / f"data-order-{self.accelerator.process_index}.jsonl"
        kept = [
            line
            for line in (path.read_text().splitlines() if path.exists() and self.resume is not None else [])
            if json.loads(line)["step"] <= self.state.step
        ]
        path.write_text("".join(line + "\n" for line in kept))
        return path.open("a")

    def batches(self, dataset, note: str = "", draw: Callable[[], list[Image.Image]] | None = None, every: int = 0):
        """This process's batches of the endless data stream (see Run.loader) from where the run is, until it stops.
        With `draw`, every `every` steps a row of validation images from the EMA weights, saved and logged."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        state.skipped |= dict(dataset.skipped)  # found while listing the folder (or building the cache or index)
        stream, record = iter(self.loader(dataset)), self.order_record()
        count = "a stream of" if isinstance(dataset, Stream) else len(dataset)
        accelerator.print(
            f"{count} training images{note}, {accelerator.num_processes} process(es) on {self.device.type}; "
            f"global batch {cfg.batch_size * cfg.grad_accum * accelerator.num_processes} = batch_size "
            f"{cfg.batch_size} x grad_accum {cfg.grad_accum} x {accelerator.num_processes} process(es), "
            f"optim.lr {cfg.optim.lr:g} per global batch (not scaled with it)"
        )
        accelerator.init_trackers(self.name, config=flat_config(to_dict(cfg)))
        self.stop = Stop(accelerator, cfg.max_nan_skips)  # SIGTERM, Ctrl-C, too many non-finite steps
        self.progress = tqdm(
            total=cfg.max_steps, initial=state.step, disable=not accelerator.is_main_process, dynamic_ncols=True
        )
        self.window, self.window_images, self.window_start, self.stepped = {}, 0, time.perf_counter(), []
        while state.step < cfg.max_steps:
            batch = next(stream)
            state.samples_seen += cfg.batch_size * accelerator.num_processes
            state.skipped |= dict(batch["skipped"])
            if record:
                rows = [{"step": state.step + 1, "rank": accelerator.process_index, "key": k} for k in batch["key"]]
                if "crop" in batch:  # shards: the image's size before and its crop in the batch's size
                    sizes = zip(batch["size"], batch["original_size"], batch["crop"])
                    for row, (size, original, crop) in zip(rows, sizes):
                        row |= {"size": list(size), "original_size": list(original), "crop": list(crop)}
                record.write("".join(json.dumps(row) + "\n" for row in rows))
                record.flush()
            yield batch
            self.window_images += cfg.batch_size
            if accelerator.sync_gradients and self.after_step(draw, every):
                return

    def step(self, loss: torch.Tensor, logs: dict[str, torch.Tensor], part: int = 0) -> None:
        """One micro-batch's backward of part `part`'s loss, its logs into the window; after the last micro-batch of a
        step, that part's optimizer step (clipped, skipped when non-finite; gradients of parameters outside DDP, such
        as the VAE's logvar, averaged over the processes by hand)."""
        accelerator = self.accelerator
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            for p in self.outside[part]:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, "mean")
            done = optimizer_step(
                accelerator, self.optimizers[part], self.trainables[part].params, self.cfg.optim.max_grad_norm
            )
            if part == 0:  # the model's step decides: its grad norm is logged, its skips count
                self.grad_norm, self.skipped_step = done
            self.stepped.append(part)
        for name, value in logs.items():  # sums and counts of the finite values: a term may join mid-run
            total, count = self.window.get(name, (0.0, 0))
            value = value.item()
            self.window[name] = (total + value, count + 1) if math.isfinite(value) else (total, count)

    def after_step(self, draw, every: int) -> bool:
        """The step is done: LR schedules (of the parts that stepped), EMA, progress, logs, validation, stop
        conditions, checkpoint. -> whether the run stops here."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        state.step += 1
        for part in self.stepped:
            self.schedulers[part].step()
        self.stepped = []
        if self.ema and not self.skipped_step:
            self.ema.update(self.trained.module)
        self.progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            self.log_window()
        if draw and every and state.step % every == 0:
            if accelerator.is_main_process:
                self.validate(draw)
            accelerator.wait_for_everyone()
        stopping = self.stop.after_step(state.step, self.skipped_step)
        if state.step % cfg.save_every == 0 or state.step == cfg.max_steps or stopping:
            self.save_checkpoint()
        return stopping

    def log_window(self) -> None:
        """The means since the last log, over every process, and the speed, to the trackers and the progress bar."""
        elapsed, names = time.perf_counter() - self.window_start, sorted(self.window)
        means = self.accelerator.reduce(
            torch.tensor([self.window[k][0] / max(self.window[k][1], 1) for k in names], device=self.device), "mean"
        )
        logs = dict(zip(names, means.tolist())) | {
            "lr": self.schedulers[0].get_last_lr()[0],
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else math.nan,
            "images_per_s_per_device": self.window_images / elapsed,
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        if self.ema:
            logs["ema_decay"] = self.ema.current_decay()
        self.accelerator.log(logs, step=self.state.step)
        self.progress.set_postfix(
            {self.shown: f"{logs[self.shown]:.4f}", "img_s": f"{logs['images_per_s_per_device']:.1f}"}
        )
        self.window, self.window_images, self.window_start = {}, 0, time.perf_counter()

    def validate(self, draw: Callable[[], list[Image.Image]]) -> None:
        """draw()'s images from the EMA weights as one row: <output_dir>/validation/step-N.png, and to the trackers."""
        with self.ema_weights(), self.accelerator.autocast():
            images = draw()
        grid = Image.new("RGB", (sum(im.width for im in images), images[0].height))
        for i, im in enumerate(images):
            grid.paste(im, (i * im.width, 0))
        path = self.output_dir / "validation" / f"step-{self.state.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.log_image("validation", grid)

    def log_image(self, name: str, image: Image.Image) -> None:
        """One image to every tracker that shows images (TensorBoard, W&B)."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: np.asarray(image)[None]}, self.state.step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({name: [image]}, self.state.step)

    def write_model(self, folder: Path) -> Path:
        """The inference file with the EMA weights (Trainable.save) and the run's config.json, into folder."""
        with self.ema_weights():
            self.trained.save(folder / self.trained.file, self.state.step)
        (folder / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        return folder / self.trained.file

    def save_checkpoint(self) -> None:
        """The skipped files gathered into the saved state, then save_checkpoint at this step with the inference
        file beside the state."""
        gather_skipped(self.state)
        try:
            path = save_checkpoint(
                self.accelerator, self.checkpoints, self.state.step, self.cfg.keep_last, self.write_model
            )
        except CheckpointError:  # the disk is full: the error's line goes below the progress bar, not into it
            self.progress.close()
            raise
        if self.accelerator.is_main_process:
            self.progress.write(f"saved checkpoint {path}")  # on a line of its own, above the progress bar

    def end(self, finish: Callable[[], str] | None = None) -> int:
        """The run's last call -> the exit code. Run to max_steps: finish() (the VAE's scale factor and evaluation; it
        says what stays intact if the write fails), the inference file into output_dir, what was skipped. Stopped:
        which file holds the weights of the last step (into output_dir too for a fine-tune stopped by a signal)."""
        self.progress.close()  # the last step was saved (or, resumed at max_steps, there was none to run)
        trained, main = self.trained, self.accelerator.is_main_process
        last = list_checkpoints(self.checkpoints)[-1] / trained.file if main else None
        if not self.stop.why:
            gather_skipped(self.state)
            if main:
                intact = finish() if finish else f"{last} is the same {trained.what}"
                with writing(self.output_dir, self.output_dir / trained.file, intact):
                    self.write_model(self.output_dir)
                print(skipped_report(self.state.skipped))
                print(f"wrote {self.output_dir / trained.file}")
        elif main:
            if self.fine_tune and not self.stop.exit_code:
                with writing(self.output_dir, self.output_dir / trained.file, f"{last} is the same {trained.what}"):
                    last = self.write_model(self.output_dir)
            print(f"the weights of step {self.state.step}: {last}")
        self.accelerator.wait_for_everyone()
        for t in self.trainables:
            t.ddp = t.nets  # the DDP wrappers go before the process group (pytorch#56297: see end_training)
        return self.stop.end(self.progress)
