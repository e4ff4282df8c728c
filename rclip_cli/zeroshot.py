"""``rclip zeroshot``: recognise regions (GT boxes or given proposals) with text embeddings → COCO results JSON."""

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
    save_outputs_recipe,
)
from rclip_core.errors import RclipError


@click.command()
@click.option("--images", "image_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the images named in the annotation file.")
@click.option("--embeddings", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Class embeddings from `rclip embed` (checked against the model's text tower).")
@click.option("--gt-boxes", type=click.Path(dir_okay=False, path_type=Path),
              help="COCO/LVIS annotation JSON: classify every ground-truth box (the paper's GT-box protocol).")
@click.option("--proposals", type=click.Path(dir_okay=False, path_type=Path),
              help="Precomputed proposals JSON ([{image_id, boxes xyxy, objectness}]); needs --annotations.")
@click.option("--annotations", type=click.Path(dir_okay=False, path_type=Path),
              help="With --proposals: the COCO/LVIS JSON that lists the images and categories.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Detections JSON.")
@click.option("--limit", type=int, default=None, help="Only the first N images.")
@click.option("--strict", is_flag=True, help="Stop at an unreadable image instead of skipping it.")
@force_option
@recipe_options
@model_options
def zeroshot(image_dir, embeddings, gt_boxes, proposals, annotations, out, limit, strict, force, recipe) -> None:
    """Classify regions zero-shot exactly as the original release: cosine / 0.01, softmax with an all-zero
    background column, score threshold, class-specific NMS, top detections per image; with proposals the score is
    fused with RPN objectness. Writes COCO results (OUT), a summary (OUT.summary.json) and the recipe.

        rclip zeroshot --gt-boxes instances_val2017.json --images val2017 --embeddings coco80.pt --out dets.json
    """
    from rclip_core import inference
    from rclip_core.data.coco import RegionDataset, attach_proposals, load_detection_annotations
    from rclip_core.detector import build_zeroshot_detector
    from rclip_core.io import check_writable, write_json
    from rclip_core.text_embed import load_embeddings
    from rclip_core.text_encoder import TextEncoder

    if (gt_boxes is None) == (proposals is None):
        raise RclipError("give exactly one of --gt-boxes or --proposals (proposals from an RPN come later)")
    ann = gt_boxes or annotations
    if ann is None:
        raise RclipError("--proposals needs --annotations (the image list and categories)")
    summary_path = out.with_name(out.stem + ".summary.json")
    for p in (out, summary_path):
        check_writable(p, force=force)
    records, categories, box_stats = load_detection_annotations(ann)
    records = records[:limit] if limit is not None else records
    if proposals:
        attach_proposals(records, proposals, box_stats)
    device = get_device()
    clip = load_clip(recipe, device)
    emb = load_embeddings(embeddings, dim=clip.visual.attnpool.c_proj.out_features,
                          fingerprint=TextEncoder(clip).fingerprint())
    cat_ids = inference.category_ids_for(emb.names, categories, embeddings)
    detector = build_zeroshot_detector(clip, emb.embeddings, recipe)
    zs, inp = recipe.zeroshot, recipe.input
    dataset = RegionDataset(records, image_dir, min_size=inp.min_size, max_size=inp.max_size,
                            pixel_mean=inp.pixel_mean, pixel_std=inp.pixel_std, use_proposals=proposals is not None,
                            num_proposals=zs.num_proposals)
    with make_progress() as progress:
        task = progress.add_task("zero-shot", total=len(dataset), rate="")
        results, summary = inference.run_detection(
            detector, dataset, category_ids=cat_ids, batch_size=zs.batch_size, num_workers=zs.num_workers,
            device=device, strict=strict, progress=progress_callback(progress, task, "img"))
    write_json(out, results, force=force, indent=None)
    write_json(summary_path, {**summary.to_dict(), "boxes": box_stats.__dict__, "embeddings": str(embeddings),
                              "mode": "gt" if gt_boxes else "proposals"}, force=force)
    save_outputs_recipe(recipe, out)
    skipped = len(summary.images_skipped)
    console.print(f"{summary.images} images, {summary.regions} regions → {summary.detections} detections in {out}"
                  f" ({summary.to_dict()['images_per_second']} img/s); skipped {skipped} unreadable image(s); "
                  f"boxes clipped {box_stats.clipped}, dropped {box_stats.dropped}")
