"""Our checkpoint format and strict state-dict loading that names every problem.

Checkpoint: ``{"model": state_dict, "recipe": dict, "step": int, "optimizer"?, "scheduler"?, "rclip_version": str}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rclip_core import __version__
from rclip_core.errors import RclipError


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
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as first:
        try:  # OpenAI's released .pt files are TorchScript archives
            obj = torch.jit.load(str(p), map_location="cpu").state_dict()
        except Exception:
            raise RclipError(f"{p}: not a readable checkpoint ({str(first).splitlines()[0]})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RclipError(f"{p}: does not hold a state dict of tensors")
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

    state = model.state_dict() if isinstance(model, nn.Module) else model
    obj = {"model": state, "recipe": recipe or {}, "step": step, "rclip_version": __version__, **extra}
    return torch_save(obj, path, force=force)
