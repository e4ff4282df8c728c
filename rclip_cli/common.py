"""Shared pieces of the commands: logging, device choice, recipe options, progress bars, output guards."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rclip_core.errors import RclipError

# Progress and logs go to stderr, so stdout stays clean for results that may be piped.
console = Console(stderr=True)


def setup_logging(level: str) -> None:
    """Route the library's ``logging`` through rich on stderr."""
    root = logging.getLogger()
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    # open_clip warns on the root logger whenever it builds a model without its own weights; rclip logs what it
    # loaded itself, so that line only confuses.
    handler.addFilter(lambda rec: not rec.getMessage().startswith("No pretrained weights loaded"))
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("rclip_core").setLevel(level.upper())
    logging.getLogger("rclip").setLevel(level.upper())


def get_device(ctx: click.Context | None = None) -> str:
    """The ``--device`` given to the group, else cuda when available, else cpu."""
    import torch

    ctx = ctx or click.get_current_context(silent=True)
    dev = (ctx.find_root().obj or {}).get("device") if ctx else None
    if dev:
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise RclipError(f"--device {dev}: CUDA is not available on this machine")
        return dev
    return "cuda" if torch.cuda.is_available() else "cpu"


def raw_recipe_options(fn: Callable) -> Callable:
    """``--recipe FILE|NAME`` and repeatable ``--set key=value``, handed over unbuilt (``recipe_path``,
    ``overrides``), for commands that lay them over another recipe (a checkpoint's, the demo's)."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a recipe value, e.g. --set zeroshot.nms_thresh=0.3 (repeatable).")(fn)
    return click.option("--recipe", "recipe_path", default=None, metavar="FILE|NAME",
                        help="Recipe YAML, or the name of a shipped recipe (e.g. zeroshot_rn50_coco_gt; see "
                             "recipes/); omitted keys take the documented defaults.")(fn)


def recipe_options(fn: Callable) -> Callable:
    """``--recipe`` and ``--set`` (see :func:`raw_recipe_options`); the command receives ``recipe`` (built)."""

    @raw_recipe_options
    @functools.wraps(fn)
    def wrapper(*args: Any, recipe_path: str | None, overrides: tuple[str, ...], **kwargs: Any) -> Any:
        from rclip_core.recipes import load_recipe

        return fn(*args, recipe=load_recipe(recipe_path, overrides), **kwargs)

    return wrapper


def force_option(fn: Callable) -> Callable:
    return click.option("--force", is_flag=True, help="Overwrite existing outputs.")(fn)


def make_progress(transient: bool = False) -> Progress:
    """A rich progress bar on stderr: description, bar, n/total, rate, elapsed, remaining (shown by rank 0 alone
    under torchrun)."""
    import os

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=int(os.environ.get("RANK", "0") or 0) != 0,
    )


def model_options(fn: Callable) -> Callable:
    """``--variant`` and ``--weights``: shortcuts for ``--set model.variant=...`` / ``--set model.weights=...``.
    Apply it *below* :func:`recipe_options` (nearer the function), so the recipe exists when they are merged."""

    @click.option("--variant", default=None, help="CLIP variant: RN50, RN50x4 or tiny (default: the recipe's, RN50).")
    @click.option("--weights", default=None,
                  help="open_clip tag (e.g. openai; needs network), or a local .pt/.pth/.safetensors file "
                       "(ours, OpenAI's, or from `rclip weights convert`). Default: the recipe's; none = random.")
    @functools.wraps(fn)
    def wrapper(*args: Any, variant: str | None, weights: str | None, recipe: Any, **kwargs: Any) -> Any:
        if variant is not None:
            recipe.model.variant = variant
        if weights is not None:
            recipe.model.weights = weights
        return fn(*args, recipe=recipe, **kwargs)

    return wrapper


def load_clip(recipe: Any, device: str):
    """The open_clip CLIP of ``recipe.model`` on ``device``, in eval mode."""
    from rclip_core.clip_backbone import create_clip

    return create_clip(recipe.model.variant, recipe.model.weights).to(device).eval()


def recipe_sidecar(out: Path) -> Path:
    """Where the resolved recipe of an output is saved: ``<out>.recipe.yaml``."""
    return out.with_name(out.name + ".recipe.yaml")


def save_outputs_recipe(recipe: Any, out: Path) -> None:
    from rclip_core.recipes import save_recipe

    save_recipe(recipe, recipe_sidecar(out), force=True)


def progress_callback(progress: Progress, task: Any, unit: str) -> Callable[[int], None]:
    """A callback ``(n_done) -> None`` that moves ``task`` and shows the rate in ``unit``/s."""
    import time

    start = time.perf_counter()

    def update(done: int) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        progress.update(task, completed=done, rate=f"{rate:.1f} {unit}/s")

    return update


def class_embeddings(clip: Any, recipe: Any, *, classes: str | None, vocab: Path | None, embeddings: Path | None):
    """Class embeddings from exactly one of: comma-separated ``classes``, a ``vocab`` names file (both embedded now
    with the recipe's templates), or an ``embeddings`` file (checked against ``clip``'s text tower)."""
    from rclip_core import text_embed as te
    from rclip_core.text_encoder import TextEncoder

    if sum(x is not None for x in (classes, vocab, embeddings)) != 1:
        raise RclipError("give exactly one of --classes, --vocab, --embeddings")
    encoder = TextEncoder(clip)
    if embeddings is not None:
        return te.load_embeddings(embeddings, dim=encoder.out_dim, fingerprint=encoder.fingerprint())
    names = te.names_from_text(vocab) if vocab is not None else [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        raise RclipError("--classes: the class list is empty")
    return te.embed_names(encoder, te.dedupe(names), templates=te.TEMPLATE_SETS[recipe.text.templates],
                          batch_size=recipe.text.batch_size, truncate=recipe.text.truncate)


def region_source(*, gt_boxes: Path | None = None, proposals: Path | None = None, rpn: Path | None = None):
    """The one region source among the given options (exactly one is required)."""
    from rclip_core.zeroshot import RegionSource

    given = [(k, p) for k, p in (("gt", gt_boxes), ("proposals", proposals), ("rpn", rpn)) if p is not None]
    if len(given) != 1:
        raise RclipError("give exactly one region source: --gt-boxes, --rpn or --proposals")
    return RegionSource(*given[0])


class TrainingProgress:
    """A rich progress bar for the training engine (an ``after_step`` hook): step, losses, lr, ETA."""

    def __init__(self, description: str, total: int, start: int = 0) -> None:
        self.progress = make_progress()
        self.task = self.progress.add_task(description, total=total, completed=start, rate="")

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def after_step(self, info: Any) -> None:
        shown = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in info.losses.items())
        self.progress.update(self.task, completed=info.step, rate=f"{shown} lr {info.lr:.2g}")


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


def prepare_run_dir(out: Path, recipe_path: str, overrides: tuple[str, ...], *, resume: bool, force: bool):
    """The recipe of a training run in ``out``, after the checks every training command makes before any work:

    - ``--resume``: ``out/checkpoint.pt`` must exist and hold the same recipe (the differing keys are named; with
      ``--force`` the new recipe wins);
    - a fresh run: an ``out`` holding a checkpoint is refused unless ``--force`` (which replaces only the run's own
      files: checkpoint, metrics, recipe).

    Writes ``out/recipe.yaml`` (rank 0). Returns the built recipe.
    """
    from rclip_core import distributed as D
    from rclip_core.checkpoint import load_checkpoint
    from rclip_core.engine import CHECKPOINT_NAME
    from rclip_core.recipes import load_recipe, recipe_to_dict, save_recipe

    recipe = load_recipe(recipe_path, overrides)
    ckpt = out / CHECKPOINT_NAME
    if resume:
        if not ckpt.is_file():
            raise RclipError(f"nothing to resume: {ckpt} does not exist")
        stored = load_checkpoint(ckpt, training=True).get("recipe") or {}
        differs = recipe_differences(stored, recipe_to_dict(recipe))
        if differs and not force:
            shown = ", ".join(differs[:6]) + (f" ... ({len(differs)} in all)" if len(differs) > 6 else "")
            raise RclipError(f"--resume: the recipe differs from {ckpt}'s in {shown}; pass --force to continue with "
                             "the new values")
    elif ckpt.exists() and not force:
        raise RclipError(f"{out} already holds a run ({ckpt}); pass --resume to continue it or --force to start over")
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "recipe.yaml", force=True)
    return recipe
