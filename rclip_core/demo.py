"""``rclip demo``: the whole chain on a generated toy world, on the CPU in a few minutes (design §6).

1. toy world (``data.toyworld``): training scenes, held-out scenes;
2. image-text training of a tiny CLIP from random weights on the captions (the pretraining stage with only the
   image-text loss, both towers trained), on the engine;
3. shape names embedded with its text tower; every ground-truth box of the held-out scenes classified zero-shot
   (``zeroshot.run_zeroshot``, the path ``rclip zeroshot --gt-boxes`` runs) and scored (COCO AP, GT-box accuracy);
4. a picture of held-out scenes with each box's label, right or wrong.

Everything is written under one folder; only files this chain writes are replaced with ``force``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rclip_core.errors import RclipError
from rclip_core.recipes import Recipe

log = logging.getLogger(__name__)

# The keys of the recipe the demo reads; --set on any other section is refused, naming it.
USED_SECTIONS = ("model", "input", "zeroshot", "pretrain", "toyworld", "text")

ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager]


@dataclass
class StageScore:
    """Zero-shot GT-box scores of one model on the held-out scenes."""

    accuracy: float
    accuracy_base: float
    accuracy_novel: float
    ap50: float | None
    ap50_base: float | None
    ap50_novel: float | None
    chance: float
    num_boxes: int


@dataclass
class DemoResult:
    out: Path
    scores: dict[str, StageScore]  # by model: "teacher", "student"
    picture: Path
    seconds: dict[str, float]


def check_demo_recipe(recipe: Recipe, overrides: list[str]) -> None:
    """Refuse ``--set`` keys of sections the demo does not use (they would be silently ignored)."""
    unused = [o for o in overrides if o.split("=", 1)[0].split(".")[0] not in USED_SECTIONS]
    if unused:
        raise RclipError(f"rclip demo does not use {', '.join(sorted({u.split('=')[0] for u in unused}))}; "
                         f"it reads the sections {', '.join(USED_SECTIONS)}")
    if recipe.model.variant != "tiny":
        raise RclipError(f"rclip demo trains the tiny CLIP from scratch on CPU; model.variant {recipe.model.variant!r}"
                         " is not supported here")


def score(gt_json: Path, dets: list[dict]) -> StageScore:
    """COCO AP50 (all / base / novel) and GT-box accuracy of zero-shot results."""
    from rclip_core.evaluation import evaluate, gt_box_accuracy
    from rclip_core.io import read_json

    gt = read_json(gt_json)
    metrics = evaluate(gt, dets)
    acc = gt_box_accuracy(gt, dets)
    split = acc["per_split"]
    return StageScore(accuracy=acc["accuracy"], accuracy_base=split.get("base", {}).get("accuracy", float("nan")),
                      accuracy_novel=split.get("novel", {}).get("accuracy", float("nan")),
                      ap50=metrics["metrics"]["AP50"], ap50_base=metrics["splits"].get("AP50_base"),
                      ap50_novel=metrics["splits"].get("AP50_novel"), chance=acc["chance"],
                      num_boxes=acc["num_boxes"])


def zero_shot_on(clip: torch.nn.Module, recipe: Recipe, instances: Path, images_dir: Path, out_json: Path, *,
                 device: str) -> list[dict]:
    """Embed the shape names with ``clip``'s text tower and classify every GT box of ``instances``, as
    ``rclip embed`` + ``rclip zeroshot --gt-boxes`` do; the results are written to ``out_json``."""
    from rclip_core.data.coco import load_detection_annotations
    from rclip_core.io import write_json
    from rclip_core.text_embed import TEMPLATE_SETS, embed_names
    from rclip_core.text_encoder import TextEncoder
    from rclip_core.zeroshot import RegionSource, prepare_images, run_zeroshot

    _, categories, _ = load_detection_annotations(instances)
    emb = embed_names(TextEncoder(clip), [c["name"] for c in categories],
                      templates=TEMPLATE_SETS[recipe.text.templates], category_ids=[c["id"] for c in categories])
    source = RegionSource("gt", instances)
    images = prepare_images(emb.names, source, image_dir=images_dir)
    results, _ = run_zeroshot(clip, emb.embeddings, images, source, recipe, device=device)
    write_json(out_json, results, indent=None)
    return results


def run_demo(recipe: Recipe, out: str | Path, *, device: str = "cpu", force: bool = False,
             progress: ProgressFactory | None = None) -> DemoResult:
    """Run the chain of the module docstring under ``out``.

    Args:
        recipe: the demo recipe (``recipes/demo_tiny_toyworld.yaml`` and ``--set``).
        out: the run folder.
        force: replace this chain's own earlier outputs (nothing else in ``out`` is touched).
        progress: ``progress(description, total)`` → a context manager yielding an engine hook (a progress bar).
    """
    import time

    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.toyworld import generate_toyworld
    from rclip_core.io import check_writable
    from rclip_core.pretrain import run_pretrain

    out = Path(out)
    teacher_dir = out / "teacher"
    outputs = [out / "demo.png", out / "metrics.json", out / "dets_teacher.json", teacher_dir / "checkpoint.pt"]
    for p in outputs:
        check_writable(p, force=force)
    bar = progress or (lambda description, total: contextlib.nullcontext(None))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    tw = recipe.toyworld
    world = out / "toyworld"
    kw = {"image_size": tw.image_size, "max_objects": tw.max_objects, "force": force}
    train = generate_toyworld(world, num_images=tw.num_train, seed=tw.seed, prefix="train", **kw)
    val = generate_toyworld(world, num_images=tw.num_val, seed=tw.seed + 1, prefix="val", **kw)
    log.info("toy world: %d training and %d held-out scenes in %s", tw.num_train, tw.num_val, world)
    seconds["toyworld"] = time.perf_counter() - t0

    t = time.perf_counter()
    recipe.pretrain.captions, recipe.pretrain.images = str(train.captions_json), str(train.images_dir)
    with bar("teacher: image-text", recipe.pretrain.steps) as hook:
        run_pretrain(recipe, out_dir=teacher_dir, device=device, hooks=[hook] if hook else [])
    seconds["teacher"] = time.perf_counter() - t
    teacher = create_clip("tiny", str(teacher_dir / "checkpoint.pt"))

    t = time.perf_counter()
    dets = zero_shot_on(teacher, recipe, val.instances_json, val.images_dir, out / "dets_teacher.json", device=device)
    teacher_score = score(val.instances_json, dets)
    seconds["zeroshot"] = time.perf_counter() - t

    from rclip_core.io import write_json

    write_json(out / "metrics.json", {"teacher": teacher_score.__dict__, "seconds": seconds})
    picture = draw_demo(val, {"teacher": dets}, out / "demo.png")
    return DemoResult(out=out, scores={"teacher": teacher_score}, picture=picture, seconds=seconds)


def draw_demo(val, dets_by_model: dict[str, list[dict]], path: Path, n: int = 8) -> Path:
    """Held-out scenes labelled by each model (one row per model): every GT box with the model's best class, green
    when right, red when wrong (with the true name)."""
    from PIL import Image

    from rclip_core.data.coco import load_detection_annotations
    from rclip_core.data.transforms import read_image
    from rclip_core.io import atomic_open
    from rclip_core.visualize import draw_gt_verdicts, tile

    records, categories, _ = load_detection_annotations(val.instances_json)
    names = {c["id"]: c["name"] for c in categories}
    tiles = []
    for model_name, dets in dets_by_model.items():
        for rec in records[:n]:
            image = read_image(val.images_dir / rec.file_name)
            tiles.append(draw_gt_verdicts(image, rec, [d for d in dets if d["image_id"] == rec.id], names,
                                          title=model_name))
    grid = tile(tiles, nrow=n)
    with atomic_open(path, "wb") as f:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG")
    return path
