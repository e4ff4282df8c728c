"""A training run's folder (``rclip pretrain``, ``rclip rpn train``; the engine writes into it): its file names and
the checks every training command makes before any work — torch is imported only to read a checkpoint on resume, so
an existing run is refused at once.

``OUT/checkpoint.pt`` (the latest, with the full resolved recipe), ``OUT/metrics.jsonl`` (one line per step) and
``OUT/recipe.yaml`` (the recipe as resolved at the start).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rclip_core.errors import RclipError

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
RECIPE_NAME = "recipe.yaml"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def recipe_differences(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def prepare_run_dir(out: str | os.PathLike, recipe_path: str | None, overrides: tuple[str, ...] | list[str], *,
                    resume: bool, force: bool, check: Callable[[Any], None] | None = None):
    """The recipe of a training run in ``out``, after the checks every training command makes before any work:

    - a fresh run: an ``out`` holding a run's file (checkpoint, metrics or recipe, e.g. of a run that crashed
      before its first checkpoint) is refused unless ``force``, which replaces only those files;
    - ``resume``: ``out/checkpoint.pt`` must exist. Without ``recipe_path`` the run continues with the checkpoint's
      recipe (``overrides`` applied to it); the result must equal the stored recipe, or the differing keys are named
      (with ``force`` the new values win).

    ``check(recipe)`` refuses unusable inputs. Nothing is written: the engine writes the run's files (recipe,
    metrics, checkpoint) once training starts, so a run refused or failing before that leaves no folder behind.
    Returns the built recipe.
    """
    from rclip_core.recipes import load_recipe, recipe_to_dict

    out = Path(out)
    ckpt = out / CHECKPOINT_NAME
    if not resume and not force:
        held = [out / n for n in (CHECKPOINT_NAME, METRICS_NAME, RECIPE_NAME) if (out / n).exists()]
        if held:
            raise RclipError(f"{out} already holds a run ({held[0]}); pass --resume to continue it or --force to "
                             "start over")
    if resume and not ckpt.is_file():
        raise RclipError(f"nothing to resume: {ckpt} does not exist")
    if resume:
        from rclip_core.checkpoint import load_checkpoint

        stored = load_checkpoint(ckpt, training=True).get("recipe") or {}
        # A recipe given again is compared whole; --set alone changes the checkpoint's own recipe.
        recipe = load_recipe(recipe_path, overrides, base=None if recipe_path is not None else stored)
        differs = recipe_differences(stored, recipe_to_dict(recipe))
        if differs and not force:
            shown = ", ".join(differs[:6]) + (f" ... ({len(differs)} in all)" if len(differs) > 6 else "")
            raise RclipError(f"--resume: the recipe differs from {ckpt}'s in {shown}; pass --force to continue with "
                             "the new values")
    else:
        recipe = load_recipe(recipe_path, overrides)
    if check is not None:
        check(recipe)
    return recipe
