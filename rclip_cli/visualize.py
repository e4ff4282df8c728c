"""``rclip visualize``: detect (or name GT boxes) on images and draw the result as PNGs, with an optional HTML page."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import (
    class_embeddings,
    console,
    force_option,
    get_device,
    load_clip,
    make_progress,
    model_options,
    progress_callback,
    recipe_options,
    region_source,
)


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--classes", help='Comma-separated class names, e.g. "cat,dog,traffic light".')
@click.option("--vocab", type=click.Path(dir_okay=False, path_type=Path), help="Names file, one per line.")
@click.option("--embeddings", type=click.Path(dir_okay=False, path_type=Path), help="Embedding file (`rclip embed`).")
@click.option("--rpn", "rpn_ckpt", type=click.Path(dir_okay=False, path_type=Path),
              help="RPN checkpoint for proposals (`rclip rpn train` / `rclip rpn convert`).")
@click.option("--gt-boxes", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of detecting, name the ground-truth boxes of this COCO/LVIS JSON (best class per box).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the PNGs.")
@click.option("--topk", type=int, default=20, show_default=True, help="At most this many boxes per image.")
@click.option("--score-thresh", type=float, default=0.3, show_default=True, help="Draw boxes scoring at least this.")
@click.option("--html", is_flag=True, help="Also write OUT/index.html showing every picture with its labels.")
@force_option
@recipe_options
@model_options
def visualize(inputs, classes, vocab, embeddings, rpn_ckpt, gt_boxes, out, topk, score_thresh, html, force,
              recipe) -> None:
    """Draw zero-shot detections on images (files and/or folders; JPEG/PNG, EXIF rotation, grayscale, RGBA).

    Classes come from --classes, --vocab or --embeddings; regions from --rpn (detection) or --gt-boxes. Writes
    OUT/<image stem>.png per image (unreadable images are skipped and counted) and, with --html, OUT/index.html.

    \b
      rclip visualize photos/ --classes "cat,dog,sofa" --rpn rpn.rclip.pt --weights openai --out vis --html
    """
    from rclip_core.io import check_writable, write_text
    from rclip_core.visualize import html_index, picture_names, render_pictures
    from rclip_core.zeroshot import prepare_images, run_zeroshot

    source = region_source(gt_boxes=gt_boxes, rpn=rpn_ckpt)
    device = get_device()
    clip = load_clip(recipe, device)
    emb = class_embeddings(clip, recipe, classes=classes, vocab=vocab, embeddings=embeddings)
    images = prepare_images(emb.names, source, inputs=inputs, match_names=False)
    for name in [*picture_names([r.file_name for r in images.records]), *(["index.html"] if html else [])]:
        check_writable(out / name, force=force)
    with make_progress() as progress:
        task = progress.add_task("recognising", total=len(images.records), rate="")
        results, summary = run_zeroshot(clip, emb.embeddings, images, source, recipe, device=device,
                                        progress=progress_callback(progress, task, "img"))
    names = dict(zip(images.category_ids, emb.names))
    entries, empty = render_pictures(images.records, images.image_dir, results, names, out, score_thresh=score_thresh,
                                     topk=topk, one_per_box=gt_boxes is not None,
                                     skipped_ids=set(summary.skipped_ids), force=force)
    if html:
        write_text(out / "index.html", html_index(entries), force=force)
    index = f"; index {out / 'index.html'}" if html else ""
    console.print(f"wrote {len(entries)} pictures to {out} ({empty} without detections above {score_thresh}; "
                  f"{len(summary.images_skipped)} unreadable skipped){index}")
