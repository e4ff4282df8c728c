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

# Moved to the core (torch-free) and importable from here as before, for the commands that use them.
from rclip_core.io import check_outputs  # noqa: F401
from rclip_core.run_dir import prepare_run_dir, recipe_differences  # noqa: F401

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

        recipe = load_recipe(recipe_path, overrides)
        recipe.rclip_given = (recipe_path, tuple(overrides))  # for a detector checkpoint's own test settings
        return fn(*args, recipe=recipe, **kwargs)

    return wrapper


def training_run_options(out_help: str, section: str) -> Callable[[Callable], Callable]:
    """``RECIPE``, ``--out``, ``--resume``, ``--force`` and ``--set`` of a training command (``rclip pretrain``,
    ``rclip finetune``): the run folder's contract, the same in each (``section`` names its recipe section in the
    ``--set`` example)."""

    def decorate(fn: Callable) -> Callable:
        options = [
            click.argument("recipe_path", metavar="RECIPE"),
            click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help=out_help),
            click.option("--resume", is_flag=True,
                         help="Continue OUT/checkpoint.pt (the recipe must match the checkpoint's)."),
            click.option("--force", is_flag=True,
                         help="Start over in an OUT holding a run (replaces only its checkpoint, metrics and recipe), "
                              "or resume with a changed recipe."),
            click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                         help=f"Override a recipe value, e.g. --set {section}.steps=1000 (repeatable)."),
        ]
        for option in reversed(options):  # click lists options in decorator order, top first
            fn = option(fn)
        return fn

    return decorate


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

    @click.option("--variant", default=None,
                  help="CLIP variant: RN50, RN50x4 or tiny (default: the recipe's, else the one a --weights file "
                       "records or its shapes show, else RN50).")
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


def load_clip(recipe: Any, device: str, *, visual_only: bool = False):
    """The open_clip CLIP of ``recipe.model`` on ``device``, in eval mode; ``visual_only`` (a command given class
    embeddings): with a weights file, its visual tower alone (``create_clip``'s ``visual_only``)."""
    from rclip_core.clip_backbone import create_clip

    clip = create_clip(recipe.model.variant, recipe.model.weights, visual_only=visual_only)
    recipe.model.variant = clip.rclip_variant  # the resolved variant is what the saved recipe records
    if recipe.model.weights is not None:  # a finetuned detector (`rclip finetune`): its heads come along
        from rclip_core.finetune import read_detector

        clip.rclip_detector = read_detector(recipe.model.weights)
        path, overrides = getattr(recipe, "rclip_given", ("given", ()))
        if clip.rclip_detector is not None and path is None:
            # No --recipe: the detector's own test settings (soft-NMS, detections per image, score fusion, input
            # size) from its stored recipe, with this command's --set laid over them.
            from rclip_core.recipes import load_recipe

            stored = clip.rclip_detector.recipe
            own = load_recipe(None, overrides, base={k: stored[k] for k in ("zeroshot", "input") if k in stored})
            recipe.zeroshot, recipe.input = own.zeroshot, own.input
    return clip.to(device).eval()


def default_regions(regions: str | None, recipe: Any) -> str:
    """The region source of a detecting command: ``regions`` as given, else a finetuned detector's own RPN (when
    ``--weights`` is a detector checkpoint), else selective search (no weights needed)."""
    if regions is not None:
        return regions
    weights = recipe.model.weights
    if weights is not None and Path(weights).is_file() and not weights.endswith(".safetensors"):
        from rclip_core.checkpoint import read_torch_file
        from rclip_core.finetune import is_detector_checkpoint

        if is_detector_checkpoint(read_torch_file(weights, what="weights file")):
            return f"rpn:{weights}"
    return "selective-search"


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
        seconds = max(time.perf_counter() - start, 1e-9)
        # Slow work (a photo through RN50 on a CPU) reads better as seconds per item than as "0.0 img/s".
        shown = f"{done / seconds:.1f} {unit}/s" if done >= seconds else f"{seconds / max(done, 1):.1f} s/{unit}"
        progress.update(task, completed=done, rate=shown)

    return update


def classes_option(fn: Callable) -> Callable:
    """``--classes SPEC``: a comma list, a names file, a COCO/LVIS JSON's categories or a built-in list name. The
    older spellings ``--names``, ``--vocab``, ``--builtin`` and ``--classes-from`` are aliases for one release. The
    command receives ``classes``."""

    @click.option("--classes", "classes", default=None, metavar="LIST|FILE|NAME",
                  help='Class names: "cat,dog,traffic light", a names file (one per line), a COCO/LVIS JSON (its '
                       "categories, ids kept), or a built-in list (coco80, coco65, coco48, coco17, lvis1203, lvis866).")
    @click.option("--names", "alias_names", default=None, hidden=True)
    @click.option("--vocab", "alias_vocab", default=None, hidden=True)
    @click.option("--builtin", "alias_builtin", default=None, hidden=True)
    @click.option("--classes-from", "alias_classes_from", default=None, hidden=True)
    @functools.wraps(fn)
    def wrapper(*args: Any, classes: str | None, alias_names: str | None, alias_vocab: str | None,
                alias_builtin: str | None, alias_classes_from: str | None, **kwargs: Any) -> Any:
        given = {flag: v for flag, v in (("--classes", classes), ("--names", alias_names), ("--vocab", alias_vocab),
                                         ("--builtin", alias_builtin), ("--classes-from", alias_classes_from))
                 if v is not None}
        if len(given) > 1:
            raise RclipError(f"give exactly one of {', '.join(given)}: they all name the classes (--classes; the "
                             "others are its old names)")
        if given and "--classes" not in given:
            flag = next(iter(given))
            logging.getLogger("rclip").warning("%s is now --classes (the old name works for one release)", flag)
        if "--builtin" in given:
            given["--builtin"] = "builtin:" + given["--builtin"]  # a list name, never a one-class list
        return fn(*args, classes=next(iter(given.values()), None), **kwargs)

    return wrapper


def classes_options(fn: Callable) -> Callable:
    """:func:`classes_option` and ``--embeddings FILE`` (cached embeddings instead)."""
    fn = classes_option(fn)
    return click.option("--embeddings", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Cached class embeddings from `rclip embed` (checked against the model's text "
                             "tower).")(fn)


def class_embeddings(clip: Any, recipe: Any, classes: Any, embeddings: Path | None):
    """The class embeddings of a command: ``classes`` (from :func:`rclip_core.data.class_lists.class_source`)
    embedded with ``clip``'s text tower and the recipe's templates, or the ``embeddings`` file."""
    from rclip_core.clip_visual import VisualCLIP
    from rclip_core.text_embed import class_embeddings as embed

    text = recipe.text
    if isinstance(clip, VisualCLIP):  # given embeddings: checked against the stored fingerprint
        encoder = clip.text
    else:
        from rclip_core.text_encoder import TextEncoder

        encoder = TextEncoder(clip)
    return embed(encoder, classes, embeddings, templates=text.templates, batch_size=text.batch_size,
                 truncate=text.truncate)


def regions_options(fn: Callable) -> Callable:
    """``--regions SPEC`` and its shortcuts ``--gt-boxes FILE``, ``--proposals FILE``, ``--rpn CKPT``; the command
    receives ``regions`` (a spec string or None)."""

    @click.option("--regions", default=None, metavar="SPEC",
                  help="Where regions come from: gt:ANN.json (ground-truth boxes), proposals:FILE.json, rpn:CKPT "
                       "(an rclip / converted original RPN), selective-search[:quality] (OpenCV, no weights), "
                       "torchvision-rpn[:FILE] (torchvision's COCO Faster R-CNN RPN, from torch's cache or FILE).")
    @click.option("--gt-boxes", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Shortcut for --regions gt:FILE: name every ground-truth box of a COCO/LVIS JSON.")
    @click.option("--proposals", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Shortcut for --regions proposals:FILE (`rclip rpn propose` output).")
    @click.option("--rpn", "rpn_ckpt", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Shortcut for --regions rpn:CKPT (`rclip rpn train` / `rclip rpn convert`).")
    @functools.wraps(fn)
    def wrapper(*args: Any, regions: str | None, gt_boxes: Path | None, proposals: Path | None,
                rpn_ckpt: Path | None, **kwargs: Any) -> Any:
        given = [s for s in (regions, gt_boxes and f"gt:{gt_boxes}", proposals and f"proposals:{proposals}",
                             rpn_ckpt and f"rpn:{rpn_ckpt}") if s]
        if len(given) > 1:
            raise RclipError("give one region source: --regions, --gt-boxes, --proposals or --rpn")
        return fn(*args, regions=given[0] if given else None, **kwargs)

    return wrapper


def limit_options(fn: Callable) -> Callable:
    """``--limit N`` (only the first N images) and ``--strict`` (stop at an unreadable image), for commands that run
    over a folder or an annotation file's images."""
    fn = click.option("--strict", is_flag=True, help="Stop at an unreadable image instead of skipping it.")(fn)
    return click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images.")(fn)


def device_option(fn: Callable) -> Callable:
    """``--device`` after the subcommand too (the same as ``rclip --device``)."""

    def remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            root = ctx.find_root()
            root.ensure_object(dict)
            root.obj["device"] = value

    return click.option("--device", default=None, expose_value=False, callback=remember, is_eager=True,
                        help="Torch device (cpu, cuda, cuda:1); the same as `rclip --device`.")(fn)


def random_weights_note(clip: Any) -> str:
    """A suffix for a command's final line when the model had no trained weights."""
    return " — RANDOM WEIGHTS: the labels mean nothing (pass --weights)" if getattr(
        clip, "rclip_random_weights", False) else ""


class TrainingProgress:
    """A rich progress bar for the training engine (an ``after_step`` hook): step, losses, lr, ETA."""

    def __init__(self, description: str, total: int, start: int = 0) -> None:
        self.progress = make_progress()
        self.task = self.progress.add_task(description, total=total, completed=start, rate="")
        self.stepped = False

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # A run refused before its first step (bad data found while building) leaves its error alone on the screen,
        # not under an empty 0/N bar.
        if exc_type is not None and not self.stepped:
            self.progress.live.transient = True
            self.progress.live.stop()  # Progress.stop would add a blank line where stderr is not a terminal
        else:
            self.progress.stop()

    def after_step(self, info: Any) -> None:
        self.stepped = True
        shown = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in info.losses.items())
        self.progress.update(self.task, completed=info.step, rate=f"{shown} lr {info.lr:.2g}")


def check_inputs(*paths: tuple[str, Path | None], folders: tuple[tuple[str, Path | None], ...] = ()) -> None:
    """Refuse missing input files and folders in one line naming the flag, before any heavy import or model build.
    ``paths``: (flag, file or None); ``folders``: (flag, folder or None)."""
    for flag, p in paths:
        if p is not None and not Path(p).is_file():
            raise RclipError(f"{flag}: file not found: {p}")
    for flag, p in folders:
        if p is not None and not Path(p).is_dir():
            raise RclipError(f"{flag}: folder not found: {p}")
