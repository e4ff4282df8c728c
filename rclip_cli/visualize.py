"""``rclip visualize``: detect (or name GT boxes) on photos and draw the result as PNGs, a detections JSON and an
optional HTML page."""

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
    make_progress,
    model_options,
    progress_callback,
    random_weights_note,
    recipe_options,
    regions_options,
)

DEFAULT_OUT = Path("rclip-vis")
DEFAULT_CLASSES = "coco80"


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@classes_options
@regions_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Folder for the pictures, detections.json and index.html (in the working directory by default).")
@click.option("--topk", type=click.IntRange(min=1), default=20, show_default=True,
              help="At most this many boxes per image.")
@click.option("--score-thresh", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Draw boxes scoring at least this.")
@click.option("--html", is_flag=True, help="Also write OUT/index.html showing every picture with its labels.")
@force_option
@device_option
@recipe_options
@model_options
def visualize(inputs, classes, embeddings, regions, out, topk, score_thresh, html, force, recipe) -> None:
    """Draw zero-shot detections on photos (files and/or folders; JPEG/PNG, EXIF rotation, grayscale, RGBA).

    Classes come from --classes (default: the 80 COCO names) or --embeddings; regions from --regions (default:
    OpenCV selective search, which needs no weights), an RPN (--rpn) or ground-truth boxes (--gt-boxes, each box
    marked right or wrong). Writes OUT/<image>.png per image (a/pic.jpg and b/pic.jpg become a_pic_jpg.png and
    b_pic_jpg.png), OUT/detections.json and, with --html, OUT/index.html; an existing file there is kept unless
    --force, and nothing else in OUT is touched. Without --weights the model has random weights: every picture and
    the page say so.

    \b
      rclip visualize photo.jpg --classes "cat,dog,sofa" --weights openai
      rclip visualize photos/ --rpn rpn.rclip.pt --classes lvis1203 --weights rn50.rclip.pt --out vis --html
    """
    from rclip_cli.common import default_regions
    from rclip_core.data.class_lists import class_source
    from rclip_core.data.files import image_files, picture_outputs
    from rclip_core.io import check_outputs
    from rclip_core.region_spec import RegionSource

    source = RegionSource.parse(default_regions(regions, recipe))
    check_inputs(("--regions", source.path))
    files = image_files(inputs)
    png_names, outputs = picture_outputs(files, html=html)
    check_outputs(*(out / name for name in outputs), force=force)  # all before torch is imported
    wanted = class_source(classes, embeddings, default=DEFAULT_CLASSES)

    from rclip_cli.common import class_embeddings, load_clip
    from rclip_core.text_embed import class_list_of
    from rclip_core.visualize import RANDOM_WEIGHTS_NOTICE, write_visualization
    from rclip_core.zeroshot import prepare_images, run_zeroshot

    images = prepare_images(class_list_of(wanted, embeddings).names, source, inputs=files, match_names=False)
    source.check_available()  # inputs all read and checked: now the models
    device = get_device()
    clip = load_clip(recipe, device, visual_only=embeddings is not None)  # no text tower needed
    emb = class_embeddings(clip, recipe, wanted, embeddings)
    with make_progress() as progress:
        task = progress.add_task("recognising", total=len(images.records), rate="")
        results, summary = run_zeroshot(clip, emb.embeddings, images, source, recipe, device=device,
                                        progress=progress_callback(progress, task, "img"))
    notice = RANDOM_WEIGHTS_NOTICE if clip.rclip_random_weights else None
    pictures, empty = write_visualization(out, images, results, summary, class_names=emb.names, png_names=png_names,
                                          region_source=source.describe(), notice=notice, score_thresh=score_thresh,
                                          topk=topk, gt_mode=source.kind == "gt", html=html, force=force)
    index = f"; index {out / 'index.html'}" if html else ""
    console.print(f"wrote {pictures} pictures to {out} ({len(emb.names)} classes, regions from "
                  f"{source.describe()}; {empty} without detections above {score_thresh}; "
                  f"{len(summary.images_skipped)} unreadable skipped){index}{random_weights_note(clip)}")
