"""``rclip rpn``: train the region proposal network on base categories, propose regions, convert released RPNs."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import (
    TrainingProgress,
    check_inputs,
    console,
    device_option,
    force_option,
    get_device,
    limit_options,
    make_progress,
    progress_callback,
    raw_recipe_options,
    recipe_options,
    save_outputs_recipe,
)
from rclip_core.errors import RclipError
from rclip_core.io import check_outputs


@click.group()
def rpn() -> None:
    """Region proposals: `train` an RPN on base categories, `propose` boxes for `rclip zeroshot --proposals`,
    `convert` the original release's rpn_*.pth (detectron2) files."""


@rpn.command()
@click.option("--annotations", "--train-ann", "train_ann", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="COCO/LVIS instances JSON; novel categories are dropped (rpn.train.categories: base). "
                   "--train-ann is its old name.")
@click.option("--images", "image_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the images named in --annotations.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint.pt, recipe.yaml, metrics.jsonl.")
@click.option("--steps", type=int, default=None, help="Training steps (default: the recipe's rpn.train.steps).")
@click.option("--resume", is_flag=True, help="Continue OUT/checkpoint.pt with its recipe (--steps may extend it).")
@force_option
@device_option
@raw_recipe_options
def train(train_ann: Path, image_dir: Path, out: Path, steps: int | None, resume: bool, force: bool,
          recipe_path: str | None, overrides: tuple[str, ...]) -> None:
    """Train the RPN (SGD, warm-up, step schedule; checkpoints every rpn.train.checkpoint_every steps).

    \b
        rclip rpn train --recipe recipes/rpn_r10c4_toyworld_base.yaml --annotations instances_train.json \\
            --images images --out runs/rpn
    """
    from rclip_core.run_dir import CHECKPOINT_NAME, prepare_run_dir

    ckpt = out / CHECKPOINT_NAME
    check_inputs(("--annotations", train_ann), folders=(("--images", image_dir),))
    recipe = prepare_run_dir(out, recipe_path, overrides, resume=resume, force=force)

    from rclip_core.data.coco import DetectionDataset
    from rclip_core.recipes import recipe_to_dict
    from rclip_core.rpn.data import load_training_records
    from rclip_core.rpn.model import build_rpn
    from rclip_core.rpn.training import train_rpn

    cfg = recipe.rpn
    cfg.train.steps = steps if steps is not None else cfg.train.steps
    data = load_training_records(train_ann, categories=cfg.train.categories)
    missing = [r.file_name for r in data.records if not (image_dir / r.file_name).is_file()]
    if missing:
        raise RclipError(f"{len(missing)} training image(s) not found in {image_dir}, e.g. {missing[0]}")
    console.print(f"training data: {data.summary()}")
    model = build_rpn(cfg, imagenet_init=cfg.imagenet_init and not resume, seed=cfg.train.seed)
    dataset = DetectionDataset(data.records, image_dir, min_sizes=cfg.train.min_sizes, max_size=cfg.train.max_size,
                               hflip=cfg.train.hflip)
    with TrainingProgress("rpn train", cfg.train.steps) as bar:
        result = train_rpn(model, dataset, cfg.train, recipe=recipe_to_dict(recipe), out_dir=out, resume=resume,
                           device=get_device(), hooks=[bar])
    if result.start_step >= cfg.train.steps:
        console.print(f"{ckpt} is already at step {result.start_step}; pass --steps to train longer")
    else:
        console.print(f"trained steps {result.start_step + 1}..{cfg.train.steps} (final loss "
                      f"{result.history[-1]['loss']:.4f}); wrote {ckpt} and {out / 'metrics.jsonl'}")


@rpn.command()
@click.option("--images", "image_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Image folder (every image in it, with generated ids, unless --annotations lists them).")
@click.option("--annotations", type=click.Path(dir_okay=False, path_type=Path),
              help="COCO/LVIS JSON whose images (and ids) to propose on.")
@click.option("--rpn", "--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="rclip RPN checkpoint (`rclip rpn train` / `rclip rpn convert`); --checkpoint is its old name.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Proposals JSON.")
@limit_options
@force_option
@device_option
@raw_recipe_options
def propose(image_dir: Path, annotations: Path | None, checkpoint: Path, out: Path, limit: int | None, strict: bool,
            force: bool, recipe_path: str | None, overrides: tuple[str, ...]) -> None:
    """Write RPN proposals ([{image_id, boxes xyxy in original pixels, objectness raw logits}], best first) for
    `rclip zeroshot --proposals` and `rclip eval --proposals`. The model is the checkpoint's; --recipe / --set change
    inference settings (input size, top-k, NMS) on top of its recipe.

    \b
        rclip rpn propose --images val2017 --annotations instances_val2017.json \\
            --rpn rpn_lvis_866.rclip.pt --recipe recipes/rpn_r50fpn_lvis_zsinf.yaml --out proposals.json
    """
    check_outputs(out, force=force)  # before torch is imported
    check_inputs(("--rpn", checkpoint), ("--annotations", annotations), folders=(("--images", image_dir),))
    from rclip_core.data.coco import DetectionDataset, images_in_folder, load_detection_annotations
    from rclip_core.io import write_json
    from rclip_core.recipes import load_recipe
    from rclip_core.rpn.convert import load_rpn_state, read_rpn_checkpoint
    from rclip_core.rpn.proposals import run_proposals
    from rclip_core.runtime import num_workers

    if annotations is not None:
        records = load_detection_annotations(annotations)[0]
    else:
        records = images_in_folder(image_dir)
    records = records[:limit] if limit is not None else records
    state, stored = read_rpn_checkpoint(checkpoint)
    recipe = load_recipe(recipe_path, overrides, base=stored)
    model = load_rpn_state(state, recipe.rpn, str(checkpoint))
    dataset = DetectionDataset(records, image_dir, min_sizes=recipe.input.min_size, max_size=recipe.input.max_size)
    with make_progress() as progress:
        task = progress.add_task("proposals", total=len(dataset), rate="")
        results, summary = run_proposals(model, dataset, batch_size=recipe.rpn.batch_size,
                                         num_workers=num_workers(recipe.rpn.num_workers), device=get_device(),
                                         strict=strict, with_file_names=annotations is None,
                                         progress=progress_callback(progress, task, "img"))
    write_json(out, results, force=force, indent=None)
    save_outputs_recipe(recipe, out)
    per_image = summary.regions / summary.images if summary.images else 0.0
    console.print(f"{summary.images} images → {summary.regions} proposals ({per_image:.0f} per image) in {out} "
                  f"({summary.images_per_second} img/s); skipped {len(summary.images_skipped)} "
                  f"unreadable image(s)")


@rpn.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "dst", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The rclip RPN checkpoint to write (for `rclip rpn propose --checkpoint`).")
@force_option
@recipe_options
def convert(src: Path, dst: Path, force: bool, recipe) -> None:
    """Convert the original release's RPN SRC (rpn_*.pth, the offline RPN inside a RegionCLIP checkpoint, or the
    offline_rpn entry of `rclip weights convert` output) into an rclip RPN checkpoint.

    \b
    Layout (C4 / FPN), depth, head convs and FPN norm are read from the keys; other rpn.* values (stride in 1x1,
    anchors, input convention) must match how the weights were trained: the defaults are detectron2's.
    """
    check_outputs(dst, force=force)  # before torch is imported
    from rclip_core.rpn.convert import convert_rpn_checkpoint

    for line in convert_rpn_checkpoint(src, dst, recipe=recipe, force=force).lines():
        click.echo(line)
