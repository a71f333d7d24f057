"""State dicts on disk: read a .safetensors file or a PyTorch checkpoint (no code runs), write one atomically, load
one strictly into a module. No model imports: the checkpoint formats (ldm.checkpoint) and the add-ons (LoRA,
embeddings, ControlNet, the LPIPS weights) read and write through this floor.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.errors import CheckpointError


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, or of a PyTorch checkpoint read with weights_only=True (no code
    runs). The format is told by the file's first bytes: a safetensors header (8-byte length, then JSON), a zip
    archive (torch.save) or a pickle (torch.save's legacy format)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(10)
    if path.suffix == ".safetensors" or head[8:10] == b'{"':
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"{path} is not a safetensors file, a PyTorch checkpoint or a diffusers folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = torch_reason(e)
        if "Unsupported global" in reason:  # weights_only refuses every global but tensors and plain containers
            raise CheckpointError(f"{path}: refused to load, the pickle holds more than tensors ({reason})") from None
        detail = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state dict of tensors inside")
    return state, {}


def torch_reason(e: Exception) -> str:
    """What torch.load's error says went wrong, in one line, without its advice (never: set weights_only=False)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    sentences = [s.strip() for line in text.splitlines() for s in line.split(". ") if s.strip()]
    return next((s for s in sentences if not any(w in s for w in ("weights_only", "safe_globals", "allowlist"))), "")


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), failing with one clear line naming the first offending key.

    Float tensors of another float dtype (fp16 files) are cast; non-finite values are loaded with a warning. A model
    with weights on the meta device (StableDiffusion(cfg, empty=True)) takes the tensors of `state` as its own
    (assign): they are cast in place in `state`, one at a time, so loading never holds two copies of the weights.
    """
    expected = model.state_dict()
    assign = any(v.is_meta for v in expected.values())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing and unexpected:
        raise CheckpointError(
            f"{source} does not fit the configured architecture: "
            f"missing tensor '{missing[0]}' ({len(missing)} in all), "
            f"unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all); pass the right --config"
        )
    if missing:
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    for key, value in state.items():
        want = expected[key]
        if value.shape != want.shape:
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {tuple(value.shape)}, the model expects {tuple(want.shape)}"
            )
        if value.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{key}' has dtype {value.dtype}, the model expects {want.dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            warnings.warn(f"{source}: tensor '{key}' contains NaN or Inf values", stacklevel=2)
        if assign and value.dtype != want.dtype:
            state[key] = value.to(want.dtype)
    model.load_state_dict(state, strict=True, assign=assign)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers never see a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); a saved model gets the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
