"""``rclip zeroshot``: recognise regions (GT boxes, given proposals, or proposals from an RPN) with text embeddings
→ COCO results JSON."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import (
    console,
    force_option,
    get_device,
    load_clip,
    make_progress,
    model_options,
    progress_callback,
    recipe_options,
    region_source,
    save_outputs_recipe,
)


@click.command()
@click.option("--images", "image_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Image folder: the images named in the annotation file, or every image in it when none is given.")
@click.option("--embeddings", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Class embeddings from `rclip embed` (checked against the model's text tower).")
@click.option("--gt-boxes", type=click.Path(dir_okay=False, path_type=Path),
              help="COCO/LVIS annotation JSON: classify every ground-truth box (the paper's GT-box protocol).")
@click.option("--rpn", "rpn_ckpt", type=click.Path(dir_okay=False, path_type=Path),
              help="RPN checkpoint (`rclip rpn train` / `rclip rpn convert`): propose regions, then classify them.")
@click.option("--proposals", type=click.Path(dir_okay=False, path_type=Path),
              help="Precomputed proposals JSON from `rclip rpn propose` ([{image_id, boxes xyxy, objectness}]).")
@click.option("--annotations", type=click.Path(dir_okay=False, path_type=Path),
              help="With --rpn/--proposals: a COCO/LVIS JSON listing the images and categories (ids kept for eval).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Detections JSON.")
@click.option("--limit", type=int, default=None, help="Only the first N images.")
@click.option("--strict", is_flag=True, help="Stop at an unreadable image instead of skipping it.")
@force_option
@recipe_options
@model_options
def zeroshot(image_dir, embeddings, gt_boxes, rpn_ckpt, proposals, annotations, out, limit, strict, force,
             recipe) -> None:
    """Classify regions zero-shot exactly as the original release: cosine / 0.01, softmax with an all-zero
    background column, score threshold, class-specific NMS, top detections per image; with proposals the score is
    fused with RPN objectness (zeroshot.score_fusion). Regions come from one of --gt-boxes, --rpn or --proposals.
    Writes COCO results (OUT), a summary (OUT_STEM.summary.json) and the recipe; without an annotation file also
    OUT_STEM.images.json (the generated image list and categories, a COCO skeleton).

    \b
      rclip zeroshot --gt-boxes instances_val2017.json --images val2017 --embeddings coco80.pt --out dets.json
      rclip zeroshot --rpn rpn_lvis_866.rclip.pt --images my_photos --embeddings lvis1203.pt --out dets.json
    """
    from rclip_core.io import check_writable, write_json
    from rclip_core.text_embed import load_embeddings
    from rclip_core.text_encoder import TextEncoder
    from rclip_core.zeroshot import prepare_images, run_zeroshot

    source = region_source(gt_boxes=gt_boxes, proposals=proposals, rpn=rpn_ckpt)
    summary_path, images_path = (out.with_name(out.stem + s) for s in (".summary.json", ".images.json"))
    folder_mode = source.kind != "gt" and annotations is None
    for p in (out, summary_path) + ((images_path,) if folder_mode else ()):
        check_writable(p, force=force)
    device = get_device()
    clip = load_clip(recipe, device)
    emb = load_embeddings(embeddings, dim=clip.visual.attnpool.c_proj.out_features,
                          fingerprint=TextEncoder(clip).fingerprint())
    images = prepare_images(emb.names, source, image_dir=image_dir, annotations=annotations,
                            embedding_ids=emb.category_ids, limit=limit, names_source=embeddings)
    with make_progress() as progress:
        task = progress.add_task("zero-shot", total=len(images.records), rate="")
        results, summary = run_zeroshot(clip, emb.embeddings, images, source, recipe, device=device, strict=strict,
                                        progress=progress_callback(progress, task, "img"))
    write_json(out, results, force=force, indent=None)
    if images.folder_mode:
        write_json(images_path, images.skeleton(), force=force)
    write_json(summary_path, {**summary.to_dict(), "boxes": images.box_stats.__dict__, "embeddings": str(embeddings),
                              "mode": source.kind, "region_source": source.describe()}, force=force)
    save_outputs_recipe(recipe, out)
    stats = images.box_stats
    console.print(f"{summary.images} images, {summary.regions} regions → {summary.detections} detections in {out}"
                  f" ({summary.images_per_second} img/s); skipped {len(summary.images_skipped)} "
                  f"unreadable, {summary.images_without_detections} without detections; boxes clipped "
                  f"{stats.clipped}, dropped {stats.dropped}")
