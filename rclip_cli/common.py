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
    root.handlers[:] = [RichHandler(console=console, show_path=False, show_time=False, markup=False)]
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


def recipe_options(fn: Callable) -> Callable:
    """``--recipe FILE`` and repeatable ``--set key=value``; the command receives ``recipe`` (a built Recipe)."""

    @click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Recipe YAML (see recipes/); omitted keys take the documented defaults.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a recipe value, e.g. --set zeroshot.nms_thresh=0.3 (repeatable).")
    @functools.wraps(fn)
    def wrapper(*args: Any, recipe_path: Path | None, overrides: tuple[str, ...], **kwargs: Any) -> Any:
        from rclip_core.recipes import load_recipe

        return fn(*args, recipe=load_recipe(recipe_path, overrides), **kwargs)

    return wrapper


def force_option(fn: Callable) -> Callable:
    return click.option("--force", is_flag=True, help="Overwrite existing outputs.")(fn)


def make_progress(transient: bool = False) -> Progress:
    """A rich progress bar on stderr: description, bar, n/total, rate, elapsed, remaining."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )
