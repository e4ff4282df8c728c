"""Our checkpoint format, the one reader of torch files, and strict state-dict loading that names every problem.

Checkpoint: ``{"model": state_dict, "recipe": dict, "step": int, "optimizer"?, "scheduler"?, "rng"?,
"rclip_version": str, ...}``. Every ``torch.load`` in rclip goes through :func:`read_torch_file`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rclip_core import __version__
from rclip_core.errors import RclipError

TRAINING_KEYS = ("model", "optimizer", "scheduler", "step")


def read_torch_file(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """``torch.load`` a file safely (``weights_only``, on the CPU) with one-line errors naming the file.

    OpenAI's released CLIP ``.pt`` files are TorchScript archives; they are read through ``torch.jit.load`` and
    returned as their state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise RclipError(f"{what} not found: {p}")
    try:
        # Memory-mapped: tensors are read from disk only when used (a converted checkpoint also holds the teacher,
        # the offline RPN and the box predictor, which inference never touches).
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy (non-zip) file cannot be mapped; anything else fails again below, reported
        pass
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as first:  # torch raises several unrelated types for a bad file
        try:
            return torch.jit.load(str(p), map_location="cpu").state_dict()
        except Exception:
            raise RclipError(f"{p}: not a readable {what} ({_why_unreadable(p, first)})") from None


def _why_unreadable(path: Path, error: Exception) -> str:
    """A short reason for a failed ``torch.load`` (torch's own messages run to several lines of advice)."""
    import zipfile

    text = str(error)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if not head.startswith(b"\x80"):  # neither a zip archive nor a legacy pickle
            return "not a PyTorch file"
    if "Weights only load failed" in text:
        return ("it holds Python objects besides tensors, which rclip does not unpickle; only tensor checkpoints "
                "are read")
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:120]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, an rclip checkpoint, a ``{"state_dict"|"model": ...}`` wrapper,
    a bare state dict, or an OpenAI TorchScript archive."""
    p = Path(path)
    if not p.is_file():
        raise RclipError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise RclipError(f"{p}: not a readable safetensors file ({e})") from None
    return state_dict_of(read_torch_file(p), p)


def state_dict_of(obj: Any, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file: an rclip checkpoint's ``model``, a ``state_dict`` wrapper, or itself; of
    a detector checkpoint (``rclip finetune``, ``rclip_core.finetune``) its CLIP part (``clip.*``)."""
    if isinstance(obj, dict) and isinstance(obj.get("detector"), dict) and isinstance(obj.get("model"), dict):
        return {k.removeprefix("clip."): v for k, v in obj["model"].items() if k.startswith("clip.")}
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RclipError(f"{source}: does not hold a state dict of tensors")
    return obj


def load_checkpoint(path: str | os.PathLike, *, module: nn.Module | None = None, training: bool = False) -> dict:
    """Read an rclip checkpoint; optionally load its ``model`` into ``module`` strictly.

    Args:
        training: require what resuming needs (model, optimizer, scheduler, step).

    Raises:
        RclipError: unreadable, not an rclip checkpoint, or (with ``module``) keys or shapes that do not fit.
    """
    p = Path(path)
    obj = read_torch_file(p)
    needed = TRAINING_KEYS if training else ("model",)
    if not isinstance(obj, dict) or any(k not in obj for k in needed):
        kind = "resumable training checkpoint" if training else "rclip checkpoint"
        raise RclipError(f"{p}: not a {kind} (needs {', '.join(needed)})")
    if module is not None:
        check_state_dict(module, obj["model"], str(p))
        module.load_state_dict(obj["model"], strict=True)
    return obj


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`RclipError` naming missing keys, unexpected keys and shape mismatches (first few of each)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise RclipError(f"{source} does not fit the model: " + "; ".join(problems))


def load_model_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load ``path`` into ``module`` strictly (see :func:`check_state_dict`)."""
    state = read_state_dict(path)
    check_state_dict(module, state, str(path))
    module.load_state_dict(state, strict=True)


def save_checkpoint(path: str | os.PathLike, model: nn.Module | dict, *, recipe: dict | None = None, step: int = 0,
                    force: bool = True, **extra: Any) -> Path:
    """Write a checkpoint atomically. ``model`` is a module or a state dict; ``extra`` adds optimizer etc."""
    from rclip_core.io import torch_save
    from rclip_core.text_encoder import text_fingerprint

    state = model.state_dict() if isinstance(model, nn.Module) else model
    obj = {"model": state, "recipe": recipe or {}, "step": step, "rclip_version": __version__, **extra}
    fingerprint = text_fingerprint(state)
    if fingerprint is not None:  # computed once here, so loading never hashes the text tower again
        obj["text_fingerprint"] = fingerprint
    return torch_save(obj, path, force=force)
