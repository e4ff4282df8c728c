"""``rclip demo``: RegionCLIP's chain on a generated toy world, on the CPU in a few minutes (design §6, paper §3).

1. **toy world** (``data.toyworld``): single-object "web" images with captions, multi-object training scenes with
   captions and boxes, held-out scenes;
2. **teacher**: a tiny CLIP trained from random weights on the web images' captions (the pretraining stage with
   only the image-text loss, both towers) — the toy's stand-in for OpenAI's CLIP;
3. **concept pool**: nouns of the scene captions (``rclip vocab build``), embedded with the teacher's text tower;
4. **RPN** trained on the base shapes' boxes only (``rpn.training``);
5. **student**: region pretraining from the teacher on the scenes (pseudo labels, distillation, concept contrastive
   and image-text losses);
6. both models name every ground-truth box of the held-out scenes zero-shot (``zeroshot.run_zeroshot``, the path of
   ``rclip zeroshot --gt-boxes``), scored with COCO AP50 and GT-box accuracy, base and novel shapes apart;
7. a picture of held-out scenes labelled by each model, right and wrong marked.

Each stage's recipe is a shipped recipe of its own (``demo`` section); everything is written under one folder and
``force`` replaces only the files this chain writes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rclip_core.errors import RclipError
from rclip_core.recipes import Recipe

if TYPE_CHECKING:  # torch is imported when the chain runs, after its outputs are checked
    import torch

log = logging.getLogger(__name__)

# The recipe sections the demo itself reads; --set on any other is refused, naming the stage keys to use instead.
USED_SECTIONS = ("input", "zeroshot", "toyworld", "text", "demo")

ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager]


@dataclass
class StageScore:
    """Zero-shot GT-box scores of one model on the held-out scenes (accuracies as fractions, AP50 in percent)."""

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


def check_demo_recipe(overrides: list[str]) -> None:
    """Refuse ``--set`` keys of sections the demo does not read itself (they would be silently ignored)."""
    unused = sorted({o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].split(".")[0] not in USED_SECTIONS})
    if unused:
        raise RclipError(f"rclip demo does not read {', '.join(unused)} itself: its stages have their own recipes; "
                         "use --set 'demo.teacher_set=[\"pretrain.steps=100\"]' (or rpn_set, student_set)")


def stage_recipe(name: str, overrides: list[str], *, stage: str) -> Recipe:
    """A stage's recipe (shipped name or file) with its ``demo.<stage>_set`` overrides."""
    from rclip_core.recipes import load_recipe

    try:
        return load_recipe(name, overrides)
    except RclipError as e:
        raise RclipError(f"demo {stage} stage: {e}") from None


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


def build_concepts(captions: Path, clip: torch.nn.Module, out: Path, *, min_freq: int) -> list[str]:
    """``rclip vocab build`` + ``rclip embed``: nouns of the captions seen ``min_freq`` times, embedded with
    ``clip``'s text tower into ``out`` (``concepts.txt`` beside it)."""
    from rclip_core import vocab as V
    from rclip_core.text_embed import SINGLE_TEMPLATE, embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    vocabulary = V.build_vocabulary([captions], V.load_extractor(), min_freq=min_freq)
    if not vocabulary.concepts:
        raise RclipError(f"{captions}: no concept is seen {min_freq} times (demo.vocab_min_freq)")
    V.write_vocabulary(vocabulary, out.with_suffix(".txt"), force=True)
    save_embeddings(embed_names(TextEncoder(clip), vocabulary.concepts, templates=[SINGLE_TEMPLATE]), out,
                    force=True)
    return vocabulary.concepts


@dataclass
class ToyWorld:
    web: object  # toyworld.ToyWorldPaths
    train: object
    val: object


def make_world(recipe: Recipe, out: Path, *, force: bool) -> ToyWorld:
    """Stage 1: the web images, training scenes and held-out scenes under ``out/toyworld``."""
    from rclip_core.data.toyworld import generate_toyworld

    tw = recipe.toyworld
    world = out / "toyworld"
    kw = {"image_size": tw.image_size, "size_scale": tw.size_scale, "force": force}
    web_kw = {**kw, "image_size": tw.web_image_size or tw.image_size, "size_scale": tw.web_size_scale or tw.size_scale}
    web = generate_toyworld(world, num_images=tw.num_web, seed=tw.seed + 100, prefix="web", max_objects=1, **web_kw)
    train = generate_toyworld(world, num_images=tw.num_train, seed=tw.seed, prefix="train",
                              max_objects=tw.max_objects, **kw)
    val = generate_toyworld(world, num_images=tw.num_val, seed=tw.seed + 1, prefix="val", max_objects=tw.max_objects,
                            **kw)
    log.info("toy world: %d web images, %d training and %d held-out scenes in %s", tw.num_web, tw.num_train,
             tw.num_val, world)
    return ToyWorld(web, train, val)


def _hooks(h) -> list:
    return [h] if h is not None else []


def train_teacher(recipe: Recipe, world: ToyWorld, out_dir: Path, *, device: str, bar: ProgressFactory,
                  overrides: list[str] = ()) -> Path:
    """Stage 2: image-text training from scratch on the web captions; returns the checkpoint."""
    from rclip_core.pretrain import run_pretrain

    teacher_recipe = stage_recipe(recipe.demo.teacher, [*recipe.demo.teacher_set, *overrides], stage="teacher")
    p = teacher_recipe.pretrain
    p.captions, p.images, p.seed = str(world.web.captions_json), str(world.web.images_dir), recipe.toyworld.seed
    with bar("2/5 teacher: image-text", p.steps) as h:
        run_pretrain(teacher_recipe, out_dir=out_dir, device=device, hooks=_hooks(h))
    return out_dir / "checkpoint.pt"


def train_toy_rpn(recipe: Recipe, world: ToyWorld, out_dir: Path, *, device: str, bar: ProgressFactory,
                  overrides: list[str] = ()) -> Path:
    """Stage 4: the RPN on the base shapes' boxes of the training scenes; returns the checkpoint."""
    from rclip_core.data.coco import DetectionDataset
    from rclip_core.recipes import recipe_to_dict
    from rclip_core.rpn.data import load_training_records
    from rclip_core.rpn.model import build_rpn
    from rclip_core.rpn.training import train_rpn

    rpn_recipe = stage_recipe(recipe.demo.rpn, [*recipe.demo.rpn_set, *overrides], stage="rpn")
    cfg = rpn_recipe.rpn
    cfg.train.seed = recipe.toyworld.seed
    data = load_training_records(world.train.instances_json, categories=cfg.train.categories)
    rpn = build_rpn(cfg, seed=cfg.train.seed)  # the random initialisation follows the run's seed
    dataset = DetectionDataset(data.records, world.train.images_dir, min_sizes=cfg.train.min_sizes,
                               max_size=cfg.train.max_size, hflip=cfg.train.hflip)
    with bar("3/5 RPN on base shapes", cfg.train.steps) as h:
        train_rpn(rpn, dataset, cfg.train, recipe=recipe_to_dict(rpn_recipe), out_dir=out_dir, device=device,
                  hooks=_hooks(h))
    return out_dir / "checkpoint.pt"


def train_student(recipe: Recipe, world: ToyWorld, out_dir: Path, *, teacher: Path, concepts: Path, rpn: Path,
                  device: str, bar: ProgressFactory, overrides: list[str] = ()) -> Path:
    """Stage 5: region pretraining from the teacher on the training scenes; returns the checkpoint."""
    from rclip_core.pretrain import run_pretrain

    student_recipe = stage_recipe(recipe.demo.student, [*recipe.demo.student_set, *overrides], stage="student")
    student_recipe.model.weights = str(teacher)
    p = student_recipe.pretrain
    p.captions, p.images, p.seed = str(world.train.captions_json), str(world.train.images_dir), recipe.toyworld.seed
    p.concepts, p.rpn = str(concepts), str(rpn)
    with bar("4/5 student: region pretraining", p.steps) as h:
        run_pretrain(student_recipe, out_dir=out_dir, device=device, hooks=_hooks(h))
    return out_dir / "checkpoint.pt"


def evaluate_model(checkpoint: Path, recipe: Recipe, world: ToyWorld, out_json: Path, *, device: str
                   ) -> tuple[list[dict], StageScore]:
    """Stage 6: zero-shot GT-box detections of the held-out scenes and their scores."""
    from rclip_core.clip_backbone import create_clip

    dets = zero_shot_on(create_clip(None, str(checkpoint)), recipe, world.val.instances_json, world.val.images_dir,
                        out_json, device=device)
    return dets, score(world.val.instances_json, dets)


def check_demo(recipe: Recipe, out: str | Path, *, force: bool) -> None:
    """Refuse a bad stage recipe or an existing output of the chain (unless ``force``), before any work or heavy
    import."""
    from rclip_core.io import check_outputs

    for stage, name, sets in (("teacher", recipe.demo.teacher, recipe.demo.teacher_set),
                              ("rpn", recipe.demo.rpn, recipe.demo.rpn_set),
                              ("student", recipe.demo.student, recipe.demo.student_set)):
        stage_recipe(name, list(sets), stage=stage)
    check_outputs(*(Path(out) / n for n in ("demo.png", "metrics.json", "dets_teacher.json", "dets_student.json",
                                            "concepts.pt", "concepts.txt", "teacher/checkpoint.pt",
                                            "rpn/checkpoint.pt", "student/checkpoint.pt")), force=force)


def run_demo(recipe: Recipe, out: str | Path, *, device: str = "cpu", force: bool = False,
             progress: ProgressFactory | None = None, max_steps: int | None = None) -> DemoResult:
    """Run the chain of the module docstring under ``out``.

    Args:
        recipe: the demo recipe (``demo_tiny_toyworld`` and ``--set``); its ``demo`` section names the stages'.
        out: the run folder.
        force: replace this chain's own earlier outputs (nothing else in ``out`` is touched).
        progress: ``progress(description, total)`` → a context manager yielding an engine hook (a progress bar).
        max_steps: cap every training stage at this many steps (a quick smoke run).
    """
    from rclip_core.io import write_json

    out = Path(out)
    cap = [f"pretrain.steps={max_steps}"] if max_steps else []
    check_demo(recipe, out, force=force)
    from rclip_core.clip_backbone import create_clip

    bar = progress or (lambda description, total: contextlib.nullcontext(None))
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    world = make_world(recipe, out, force=force)
    seconds["toyworld"], t = time.perf_counter() - t, time.perf_counter()
    teacher = train_teacher(recipe, world, out / "teacher", device=device, bar=bar, overrides=cap)
    seconds["teacher"], t = time.perf_counter() - t, time.perf_counter()
    concepts = build_concepts(world.train.captions_json, create_clip(None, str(teacher)), out / "concepts.pt",
                              min_freq=recipe.demo.vocab_min_freq)
    log.info("concept pool: %d concepts (%s)", len(concepts), ", ".join(concepts[:12]))
    seconds["concepts"], t = time.perf_counter() - t, time.perf_counter()
    rpn = train_toy_rpn(recipe, world, out / "rpn", device=device, bar=bar,
                        overrides=[f"rpn.train.steps={max_steps}"] if max_steps else [])
    seconds["rpn"], t = time.perf_counter() - t, time.perf_counter()
    student = train_student(recipe, world, out / "student", teacher=teacher, concepts=out / "concepts.pt", rpn=rpn,
                            device=device, bar=bar, overrides=cap)
    seconds["student"], t = time.perf_counter() - t, time.perf_counter()
    dets, scores = {}, {}
    for name, ckpt in (("teacher", teacher), ("student", student)):
        dets[name], scores[name] = evaluate_model(ckpt, recipe, world, out / f"dets_{name}.json", device=device)
    seconds["evaluation"] = time.perf_counter() - t
    write_json(out / "metrics.json", {k: v.__dict__ for k, v in scores.items()} | {"seconds": seconds,
                                                                                    "concepts": concepts})
    picture = draw_demo(world.val, dets, scores, out / "demo.png")
    return DemoResult(out=out, scores=scores, picture=picture, seconds=seconds)


def draw_demo(val, dets_by_model: dict[str, list[dict]], scores: dict[str, StageScore], path: Path,
              n: int = 6) -> Path:
    """Held-out scenes labelled by each model (one row per model): every GT box with the model's best class, green
    when right, red with the true name when wrong; each row titled with the model's held-out accuracy."""
    from PIL import Image

    from rclip_core.data.coco import load_detection_annotations
    from rclip_core.data.transforms import read_image
    from rclip_core.io import atomic_open
    from rclip_core.visualize import draw_gt_verdicts, tile

    records, categories, _ = load_detection_annotations(val.instances_json)
    names = {c["id"]: c["name"] for c in categories}
    tiles = []
    for model_name, dets in dets_by_model.items():
        s = scores[model_name]
        title = f"{model_name}: {100 * s.accuracy:.0f}% of held-out boxes right"
        for rec in records[:n]:
            image = read_image(val.images_dir / rec.file_name)
            tiles.append(draw_gt_verdicts(image, rec, [d for d in dets if d["image_id"] == rec.id], names,
                                          title=title, size=320))
    grid = tile(tiles, nrow=n)
    with atomic_open(path, "wb") as f:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------------------
# open-vocabulary transfer on the toy world (README "Toy-world proof"; benchmarks/toyworld_finetune.py)


def train_toy_detector(world: ToyWorld, out_dir: Path, *, student: Path, rpn: Path, seed: int, device: str = "cpu",
                       overrides: list[str] = (), hooks=()) -> Path:
    """``rclip finetune finetune_tiny_toyworld`` from the region-pretrained ``student`` with the toy ``rpn``, on
    the base shapes' boxes of the training scenes; returns the detector checkpoint."""
    from rclip_core.finetune import run_finetune
    from rclip_core.recipes import load_recipe

    recipe = load_recipe("finetune_tiny_toyworld", [
        f"model.weights={student}", f"finetune.rpn={rpn}", f"finetune.annotations={world.train.instances_json}",
        f"finetune.images={world.train.images_dir}", f"finetune.seed={seed}", *overrides])
    run_finetune(recipe, out_dir=out_dir, device=device, hooks=hooks)
    return out_dir / "checkpoint.pt"


def _ap50(gt_json: Path, dets: list[dict]) -> dict[str, float | None]:
    from rclip_core.evaluation import evaluate
    from rclip_core.io import read_json

    r = evaluate(read_json(gt_json), dets)
    return {"ap50": r["metrics"]["AP50"], "ap50_base": r["splits"].get("AP50_base"),
            "ap50_novel": r["splits"].get("AP50_novel")}


def existing_world(out: Path) -> ToyWorld:
    """The toy world an ``rclip demo --out OUT`` run wrote (paths only; nothing is generated)."""
    from rclip_core.data.toyworld import ToyWorldPaths

    root = Path(out) / "toyworld"

    def split(prefix: str) -> ToyWorldPaths:
        return ToyWorldPaths(root, root / "images", root / f"instances_{prefix}.json", root / f"captions_{prefix}.json",
                             0)

    return ToyWorld(split("web"), split("train"), split("val"))


def detect_shapes(weights: Path, world: ToyWorld, *, rpn: Path, recipe_name: str, overrides: list[str] = (),
                  device: str = "cpu", random_novel_seed: int | None = None) -> dict[str, float | None]:
    """AP50 (all / base / novel) on the held-out scenes of the detector (or plain CLIP) ``weights`` naming every
    shape by its text embedding, with regions from ``rpn`` (the path of ``rclip zeroshot --weights W --rpn R``).

    ``random_novel_seed``: replace the novel shapes' text embeddings by random unit vectors (seeded): what the
    detector does without the open vocabulary.
    """
    import torch

    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.coco import load_detection_annotations
    from rclip_core.finetune import read_detector
    from rclip_core.recipes import load_recipe
    from rclip_core.region_spec import RegionSource
    from rclip_core.text_embed import TEMPLATE_SETS, embed_names
    from rclip_core.text_encoder import TextEncoder
    from rclip_core.zeroshot import prepare_images, run_zeroshot

    recipe = load_recipe(recipe_name, list(overrides))
    clip = create_clip(None, str(weights))
    clip.rclip_detector = read_detector(weights)
    _, categories, _ = load_detection_annotations(world.val.instances_json)
    emb = embed_names(TextEncoder(clip), [c["name"] for c in categories],
                      templates=TEMPLATE_SETS[recipe.text.templates]).embeddings
    if random_novel_seed is not None:
        g = torch.Generator().manual_seed(random_novel_seed)
        for i, c in enumerate(categories):
            if c.get("split") == "novel":
                emb[i] = torch.nn.functional.normalize(torch.randn(emb.shape[1], generator=g), dim=0)
    source = RegionSource("rpn", rpn)
    images = prepare_images([c["name"] for c in categories], source, image_dir=world.val.images_dir,
                            annotations=world.val.instances_json)
    dets, _ = run_zeroshot(clip, emb, images, source, recipe, device=device)
    return _ap50(world.val.instances_json, dets)
