"""``rclip zeroshot``: recognise regions (GT boxes, proposals, an RPN, selective search) with text embeddings
→ COCO results JSON."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import (
    check_inputs,
    classes_options,
    console,
    device_option,
    force_option,
    get_device,
    limit_options,
    make_progress,
    model_options,
    progress_callback,
    random_weights_note,
    recipe_options,
    regions_options,
)
from rclip_core.io import check_outputs


@click.command()
@click.option("--images", "image_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Image folder: the images named in the annotation file, or every image in it when none is given.")
@classes_options
@regions_options
@click.option("--annotations", type=click.Path(dir_okay=False, path_type=Path),
              help="With proposals or an RPN: a COCO/LVIS JSON listing the images and categories (ids kept for eval).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Detections JSON.")
@limit_options
@force_option
@device_option
@recipe_options
@model_options
def zeroshot(image_dir, classes, embeddings, regions, annotations, out, limit, strict, force, recipe) -> None:
    """Classify regions zero-shot exactly as the original release: cosine / 0.01, softmax with an all-zero
    background column, score threshold, class-specific NMS, top detections per image; with an RPN's proposals the
    score is fused with objectness (zeroshot.score_fusion). Classes: --classes (embedded on the fly) or
    --embeddings. Writes COCO results (OUT), a summary (OUT_STEM.summary.json) and the recipe; without an
    annotation file also OUT_STEM.images.json (the generated image list and categories, a COCO skeleton).

    \b
      rclip zeroshot --gt-boxes instances_val2017.json --images val2017 --embeddings coco80.pt --out dets.json
      rclip zeroshot --rpn rpn_lvis_866.rclip.pt --images my_photos --classes lvis1203 --out dets.json
      rclip zeroshot --regions selective-search --images my_photos --classes "cat,dog" --out dets.json
      rclip zeroshot --weights runs/ovcoco/checkpoint.pt --recipe runs/ovcoco/recipe.yaml --images val2017 \
          --annotations instances_val2017.json --classes coco65 --out dets.json   (a finetuned detector: its RPN)
    """
    from rclip_cli.common import default_regions
    from rclip_core.region_spec import RegionSource

    source = RegionSource.parse(default_regions(regions, recipe))
    summary_path, images_path = (out.with_name(out.stem + s) for s in (".summary.json", ".images.json"))
    folder_mode = source.kind != "gt" and annotations is None
    check_outputs(out, summary_path, *((images_path,) if folder_mode else ()), force=force)
    check_inputs(("--annotations", annotations), ("--regions", source.path), folders=(("--images", image_dir),))
    from rclip_core.data.class_lists import class_source

    wanted = class_source(classes, embeddings)  # all before torch is imported

    from rclip_cli.common import class_embeddings, load_clip
    from rclip_core.io import write_json
    from rclip_core.text_embed import class_list_of
    from rclip_core.zeroshot import prepare_images, run_zeroshot

    listed = class_list_of(wanted, embeddings)
    images = prepare_images(listed.names, source, image_dir=image_dir, annotations=annotations,
                            embedding_ids=listed.category_ids, limit=limit, names_source=embeddings or "--classes")
    source.check_available()  # inputs all read and checked: now the models
    device = get_device()
    clip = load_clip(recipe, device, visual_only=embeddings is not None)  # no text tower needed
    emb = class_embeddings(clip, recipe, wanted, embeddings)
    with make_progress() as progress:
        task = progress.add_task("zero-shot", total=len(images.records), rate="")
        results, summary = run_zeroshot(clip, emb.embeddings, images, source, recipe, device=device, strict=strict,
                                        progress=progress_callback(progress, task, "img"))
    write_json(out, results, force=force, indent=None)
    if images.folder_mode:
        write_json(images_path, images.skeleton(), force=force)
    write_json(summary_path, {**summary.to_dict(), "boxes": images.box_stats.__dict__,
                              "classes": str(embeddings or classes), "mode": source.kind,
                              "region_source": source.describe(), "random_weights": clip.rclip_random_weights},
               force=force)
    from rclip_cli.common import save_outputs_recipe

    save_outputs_recipe(recipe, out)
    stats = images.box_stats
    console.print(f"{summary.images} images, {summary.regions} regions ({source.describe()}) → {summary.detections} "
                  f"detections in {out} ({summary.images_per_second} img/s); skipped {len(summary.images_skipped)} "
                  f"unreadable, {summary.images_without_detections} without detections; boxes clipped "
                  f"{stats.clipped}, dropped {stats.dropped}{random_weights_note(clip)}")
