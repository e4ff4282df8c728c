"""``rclip visualize``: detect (or name GT boxes) on images and draw the result as PNGs, with an optional HTML page."""

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
)
from rclip_core.errors import RclipError


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
    from rclip_cli.common import class_embeddings
    from rclip_core import inference
    from rclip_core.data.coco import (
        BoxStats,
        RegionDataset,
        attach_proposals,
        images_from_paths,
        load_detection_annotations,
    )
    from rclip_core.data.transforms import read_image
    from rclip_core.detector import build_zeroshot_detector
    from rclip_core.io import atomic_open, check_writable, write_text
    from rclip_core.visualize import html_index, render, select_detections

    if (rpn_ckpt is None) == (gt_boxes is None):
        raise RclipError("give one region source: --rpn CKPT (detect) or --gt-boxes ANN (name given boxes)")
    device = get_device()
    clip = load_clip(recipe, device)
    emb = class_embeddings(clip, recipe, classes=classes, vocab=vocab, embeddings=embeddings)
    if gt_boxes:
        records, categories, stats = load_detection_annotations(gt_boxes)
        found = {Path(r.file_name).name: r.file_name for r in images_from_paths(inputs)}
        records = [r for r in records if Path(r.file_name).name in found]
        for r in records:  # annotation file names are matched by base name to the given files
            r.file_name = found[Path(r.file_name).name]
        if not records:
            raise RclipError(f"none of the given images is in {gt_boxes}")
    else:
        records, stats = images_from_paths(inputs), BoxStats()
    cat_ids = list(range(1, len(emb.names) + 1))
    pngs = {r.id: out / (Path(r.file_name).stem + ".png") for r in records}
    for p in [*pngs.values(), *([out / "index.html"] if html else [])]:
        check_writable(p, force=force)
    inp, zs = recipe.input, recipe.zeroshot
    root = Path(".")  # records carry absolute paths (root / absolute == absolute)
    with make_progress() as progress:
        if rpn_ckpt:
            from rclip_core.rpn import load_rpn
            from rclip_core.rpn.data import ProposalImages
            from rclip_core.rpn.proposals import run_proposals

            task = progress.add_task("proposals", total=len(records), rate="")
            images = ProposalImages(records, root, min_size=inp.min_size, max_size=inp.max_size)
            props, _ = run_proposals(load_rpn(rpn_ckpt), images, device=device,
                                     progress=progress_callback(progress, task, "img"))
            attach_proposals(records, props, stats)
        dataset = RegionDataset(records, root, min_size=inp.min_size, max_size=inp.max_size,
                                pixel_mean=inp.pixel_mean, pixel_std=inp.pixel_std, use_proposals=rpn_ckpt is not None,
                                num_proposals=zs.num_proposals)
        task = progress.add_task("recognising", total=len(dataset), rate="")
        results, summary = inference.run_detection(
            build_zeroshot_detector(clip, emb.embeddings, recipe), dataset, category_ids=cat_ids,
            batch_size=zs.batch_size, device=device, progress=progress_callback(progress, task, "img"))
    names = dict(zip(cat_ids, emb.names))
    by_image: dict[int, list[dict]] = {}
    for d in results:
        by_image.setdefault(d["image_id"], []).append(d)
    skipped = set(summary.skipped_ids)
    entries, empty = [], 0
    for rec in records:
        if rec.id in skipped:
            continue
        path = root / rec.file_name
        dets = select_detections(by_image.get(rec.id, []), score_thresh=score_thresh, topk=topk,
                                 one_per_box=gt_boxes is not None)
        empty += not dets
        image = read_image(path)
        with atomic_open(pngs[rec.id], "wb", force=force) as f:
            render(image, dets, names, zoom=max(1, 256 // max(image.size))).save(f, format="PNG")
        entries.append({"image": pngs[rec.id].name, "source": str(rec.file_name),
                        "labels": [f"{names[d['category_id']]} {d['score']:.2f}" for d in dets]})
    if html:
        write_text(out / "index.html", html_index(entries), force=force)
    index = f"; index {out / 'index.html'}" if html else ""
    console.print(f"wrote {len(entries)} pictures to {out} ({empty} without detections above {score_thresh}; "
                  f"{len(summary.images_skipped)} unreadable skipped){index}")

