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
    save_outputs_recipe,
)
from rclip_core.errors import RclipError


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
    from rclip_core import inference
    from rclip_core.data.coco import (
        BoxStats,
        RegionDataset,
        attach_proposals,
        images_in_folder,
        load_detection_annotations,
    )
    from rclip_core.detector import build_zeroshot_detector
    from rclip_core.io import check_writable, write_json
    from rclip_core.text_embed import load_embeddings
    from rclip_core.text_encoder import TextEncoder

    if sum(x is not None for x in (gt_boxes, rpn_ckpt, proposals)) != 1:
        raise RclipError("give exactly one region source: --gt-boxes, --rpn or --proposals")
    if gt_boxes and annotations:
        raise RclipError("--annotations goes with --rpn/--proposals; --gt-boxes already names the annotation file")
    summary_path, images_path = (out.with_name(out.stem + s) for s in (".summary.json", ".images.json"))
    ann = gt_boxes or annotations
    for p in (out, summary_path) + (() if ann else (images_path,)):
        check_writable(p, force=force)
    device = get_device()
    clip = load_clip(recipe, device)
    emb = load_embeddings(embeddings, dim=clip.visual.attnpool.c_proj.out_features,
                          fingerprint=TextEncoder(clip).fingerprint())
    if ann:
        records, categories, box_stats = load_detection_annotations(ann)
        cat_ids = inference.category_ids_for(emb.names, categories, embeddings)
    else:
        records, box_stats = images_in_folder(image_dir), None
        cat_ids = emb.category_ids or list(range(1, len(emb.names) + 1))
        categories = [{"id": i, "name": n} for i, n in zip(cat_ids, emb.names)]
    records = records[:limit] if limit is not None else records
    box_stats = box_stats or BoxStats()
    zs, inp = recipe.zeroshot, recipe.input
    with make_progress() as progress:
        if rpn_ckpt:
            from rclip_core.rpn import load_rpn
            from rclip_core.rpn.data import ProposalImages
            from rclip_core.rpn.proposals import run_proposals

            task = progress.add_task("proposals", total=len(records), rate="")
            # Proposals come back in original-image pixels, so the CLIP branch below rescales them like GT boxes.
            images = ProposalImages(records, image_dir, min_size=inp.min_size, max_size=inp.max_size)
            proposals, _ = run_proposals(load_rpn(rpn_ckpt), images, device=device, strict=strict,
                                         progress=progress_callback(progress, task, "img"))
        if proposals is not None:
            attach_proposals(records, proposals, box_stats)
        dataset = RegionDataset(records, image_dir, min_size=inp.min_size, max_size=inp.max_size,
                                pixel_mean=inp.pixel_mean, pixel_std=inp.pixel_std, use_proposals=gt_boxes is None,
                                num_proposals=zs.num_proposals)
        task = progress.add_task("zero-shot", total=len(dataset), rate="")
        results, summary = inference.run_detection(
            build_zeroshot_detector(clip, emb.embeddings, recipe), dataset, category_ids=cat_ids,
            batch_size=zs.batch_size, num_workers=zs.num_workers, device=device, strict=strict,
            progress=progress_callback(progress, task, "img"))
    write_json(out, results, force=force, indent=None)
    if not ann:
        write_json(images_path, {"images": [{"id": r.id, "file_name": r.file_name} for r in records],
                                 "categories": categories}, force=force)
    mode = "gt" if gt_boxes else "rpn" if rpn_ckpt else "proposals"
    write_json(summary_path, {**summary.to_dict(), "boxes": box_stats.__dict__, "embeddings": str(embeddings),
                              "mode": mode}, force=force)
    save_outputs_recipe(recipe, out)
    console.print(f"{summary.images} images, {summary.regions} regions → {summary.detections} detections in {out}"
                  f" ({summary.to_dict()['images_per_second']} img/s); skipped {len(summary.images_skipped)} "
                  f"unreadable, {summary.images_without_detections} without detections; boxes clipped "
                  f"{box_stats.clipped}, dropped {box_stats.dropped}")
